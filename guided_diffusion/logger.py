"""ADM's logger interface (configure, log, logkv, logkv_mean, dumpkvs, get_dir), kept small.

Key-value rows go to progress.csv and log.txt in the log folder (``--log_dir``, $OPENAI_LOGDIR, or a
time-stamped folder in the system temp dir, as ADM); only rank 0 writes unless told otherwise.
"""

from __future__ import annotations

import csv
import datetime
import os
import tempfile
from collections import defaultdict

DEBUG, INFO, WARN, ERROR, DISABLED = 10, 20, 30, 40, 50


class _Logger:
    def __init__(self, folder: str | None, formats: tuple[str, ...], rank: int = 0):
        self.folder = folder
        self.rank = rank
        self.level = INFO
        self.values: dict[str, float] = {}
        self.sums = defaultdict(float)
        self.counts = defaultdict(int)
        self._csv_keys: list[str] = []
        self._text = open(os.path.join(folder, "log.txt"), "a") if folder and "log" in formats else None
        self._csv_path = os.path.join(folder, "progress.csv") if folder and "csv" in formats else None
        self._stdout = "stdout" in formats

    def log(self, *args, level=INFO):
        if level < self.level:
            return
        line = " ".join(str(a) for a in args)
        if self._stdout:
            print(line, flush=True)
        if self._text:
            self._text.write(line + "\n")
            self._text.flush()

    def dumpkvs(self) -> dict:
        row = dict(self.values)
        for key, total in self.sums.items():
            row[key] = total / self.counts[key]
        self.values.clear()
        self.sums.clear()
        self.counts.clear()
        if not row:
            return row
        width = max(len(k) for k in row)
        table = "\n".join(f"| {k:<{width}} | {_fmt(v):>12} |" for k, v in sorted(row.items()))
        self.log("-" * (width + 19) + "\n" + table + "\n" + "-" * (width + 19))
        if self._csv_path:
            self._write_csv(row)
        return row

    def _write_csv(self, row):
        new_keys = [k for k in sorted(row) if k not in self._csv_keys]
        rows = []
        if new_keys and os.path.exists(self._csv_path):
            with open(self._csv_path, newline="") as f:
                rows = list(csv.DictReader(f))
        self._csv_keys += new_keys
        mode = "w" if new_keys else "a"
        with open(self._csv_path, mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._csv_keys)
            if new_keys:
                writer.writeheader()
                writer.writerows(rows)
            writer.writerow(row)


def _fmt(v) -> str:
    return f"{v:<8.3g}" if isinstance(v, float) else str(v)


_current = _Logger(None, ("stdout",))


def configure(dir: str | None = None, format_strs=None, rank: int | None = None) -> None:
    """Start logging to ``dir`` (created). Ranks other than 0 log nothing unless ``format_strs`` says."""
    global _current
    if rank is None:
        from . import dist_util

        rank = dist_util.get_rank()
    if dir is None:
        dir = os.getenv("OPENAI_LOGDIR") or os.path.join(
            tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f")
        )
    os.makedirs(dir, exist_ok=True)
    if format_strs is None:
        format_strs = ("stdout", "log", "csv") if rank == 0 else ()
    _current = _Logger(dir, tuple(format_strs), rank)
    log(f"Logging to {dir}")


def get_dir() -> str | None:
    return _current.folder


def log(*args, level=INFO):
    _current.log(*args, level=level)


def warn(*args):
    _current.log(*args, level=WARN)


def set_level(level):
    _current.level = level


def logkv(key, val):
    _current.values[key] = val


def logkv_mean(key, val):
    _current.sums[key] += float(val)
    _current.counts[key] += 1


def getkvs() -> dict:
    return dict(_current.values)


def dumpkvs() -> dict:
    return _current.dumpkvs()

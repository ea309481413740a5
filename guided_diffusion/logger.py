"""ADM's logger (the OpenAI-baselines interface that guided-diffusion ships), written afresh.

Key-value diagnostics are collected with ``logkv`` / ``logkv_mean`` and written as one row by
``dumpkvs`` to every configured output; ``log`` writes free text to the outputs that take text.
Outputs, by name (``format_strs`` of ``configure``, or $OPENAI_LOG_FORMAT):

* ``stdout``: a table per row on standard output (text too);
* ``log``: the same table (and text) in ``log{suffix}.txt``;
* ``json``: one JSON object per row in ``progress{suffix}.json``;
* ``csv``: ``progress{suffix}.csv``, a header of every key seen so far (new keys are appended in
  sorted order and earlier rows padded), one line per row, an absent value left empty;
* ``tensorboard``: scalar events in ``tb{suffix}/events.out.tfevents.*`` (written without TensorFlow).

``configure(dir)`` picks the folder: ``dir``, else $OPENAI_LOGDIR, else a time-stamped folder in the
system temp dir. A process of rank r > 0 adds ``-rank{r:03d}`` to the suffix and by default writes
only its ``log`` ($OPENAI_LOG_FORMAT_MPI); rank 0 writes ``stdout,log,csv``. With ``comm`` (an MPI
communicator), ``dumpkvs`` averages each key over the ranks, weighted by how often each rank logged it.

Differences from ADM: before ``configure`` is called, the logger writes to stdout only and
``get_dir()`` is None (ADM would create a folder in the temp dir on first use). An empty ``dir`` or
$OPENAI_LOGDIR counts as not given. ``configure(..., append=True)`` continues the files already in
the folder (a resumed training run keeps its history; ADM truncates them): text and JSON lines are
appended, a CSV keeps its header and grows it, a row cut short by a kill or a full disk is dropped.
A CSV whose header grows is rewritten to a temporary file and renamed, so a kill never loses the
earlier rows. A file that cannot be written (a full disk, a folder that is not writable) is one
UsageError line naming it.
"""

from __future__ import annotations

import datetime
import errno
import functools
import json
import os
import socket
import struct
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from contextlib import contextmanager

from adm_common.errors import UsageError
from adm_common.files import disk_full_error, temp_path_for, writing

DEBUG = 10
INFO = 20
WARN = 30
ERROR = 40
DISABLED = 50

_MAX_CELL = 30  # longest key or value shown in a table cell


class KVWriter:
    """An output that takes rows of key-value pairs."""

    def writekvs(self, kvs):
        raise NotImplementedError

    def close(self):
        pass


class SeqWriter:
    """An output that takes free text (a sequence of strings, written space-separated on one line)."""

    def writeseq(self, seq):
        raise NotImplementedError

    def close(self):
        pass


class HumanOutputFormat(KVWriter, SeqWriter):
    """Readable tables and text, to a file name (opened for writing) or an open text stream."""

    def __init__(self, filename_or_file, append=False):
        if isinstance(filename_or_file, (str, os.PathLike)):
            self.path = os.fspath(filename_or_file)
            self.file = _open_text(self.path, append)
            self.own_file = True
        else:
            self.path = None
            if not hasattr(filename_or_file, "write"):
                raise TypeError(f"HumanOutputFormat needs a file name or a writable stream, got {filename_or_file!r}")
            self.file = filename_or_file
            self.own_file = False

    def writekvs(self, kvs):
        cells = {}
        for key, value in sorted(kvs.items()):
            shown = "%-8.3g" % value if hasattr(value, "__float__") else str(value)
            cells[self._truncate(str(key))] = self._truncate(shown)
        if not cells:
            print("WARNING: tried to write empty key-value dict")
            return
        key_width = max(len(k) for k in cells)
        value_width = max(len(v) for v in cells.values())
        rule = "-" * (key_width + value_width + 7)
        rows = [rule]
        for key, value in sorted(cells.items(), key=lambda item: item[0].lower()):
            rows.append(f"| {key.ljust(key_width)} | {value.ljust(value_width)} |")
        rows.append(rule)
        self._write("\n".join(rows) + "\n")

    def _truncate(self, s):
        return s if len(s) <= _MAX_CELL else s[: _MAX_CELL - 3] + "..."

    def writeseq(self, seq):
        self._write(" ".join(seq) + "\n")

    def _write(self, text):
        if self.path is None:
            self.file.write(text)
            self.file.flush()
            return
        with writing(self.path):
            self.file.write(text)
            self.file.flush()

    def close(self):
        if self.own_file:
            _close_quietly(self.file)


class _CurrentStdout:
    """Writes to whatever sys.stdout is at the time of writing (pytest and notebooks replace it)."""

    def write(self, text):
        return sys.stdout.write(text)

    def flush(self):
        sys.stdout.flush()


_STDOUT = _CurrentStdout()


def _plain(value):
    """A value JSON can hold: numpy and torch scalars become floats."""
    return float(value) if hasattr(value, "dtype") else value


class JSONOutputFormat(KVWriter):
    """One JSON object per row (JSON lines)."""

    def __init__(self, filename, append=False):
        self.path = os.fspath(filename)
        if append:
            _drop_partial_line(self.path)  # a cut JSON line would not parse
        self.file = _open_text(self.path, append, mode="at" if append else None)

    def writekvs(self, kvs):
        with writing(self.path):
            self.file.write(json.dumps({key: _plain(value) for key, value in kvs.items()}) + "\n")
            self.file.flush()

    def close(self):
        _close_quietly(self.file)


class CSVOutputFormat(KVWriter):
    """A CSV table whose header grows as new keys appear (earlier rows are padded with empty cells).

    With ``append``, an existing file is continued: its header gives the keys, a last row cut short
    is dropped. A growing header rewrites the file through a temporary file and a rename.
    """

    def __init__(self, filename, append=False):
        self.path = os.fspath(filename)
        self.keys = []
        self.sep = ","
        if append:
            _drop_partial_line(self.path)
            try:
                with open(self.path, "rt") as f:
                    header = f.readline().rstrip("\n")
            except FileNotFoundError:
                header = ""
            except OSError as exc:
                raise _unwritable(self.path, exc) from None
            self.keys = header.split(self.sep) if header else []
        self.file = _open_text(self.path, append, mode="a+t" if append else "w+t")

    def writekvs(self, kvs):
        new_keys = sorted(set(kvs) - set(self.keys))
        if new_keys:
            self._grow_header(new_keys)
        cells = ["" if kvs.get(k) is None else str(kvs[k]) for k in self.keys]
        with writing(self.path):
            self.file.write(self.sep.join(cells) + "\n")
            self.file.flush()

    def _grow_header(self, new_keys):
        """The file with ``new_keys`` added to the header and every earlier row padded, replaced whole."""
        self.file.seek(0)
        old_lines = self.file.read().splitlines()[1:]  # every row but the old header
        keys = self.keys + new_keys
        text = self.sep.join(keys) + "\n" + "".join(line + self.sep * len(new_keys) + "\n" for line in old_lines)
        tmp = temp_path_for(self.path)
        try:
            with writing(self.path):
                with open(tmp, "wt") as f:
                    f.write(text)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self.keys = keys
        _close_quietly(self.file)
        self.file = _open_text(self.path, True, mode="a+t")

    def close(self):
        _close_quietly(self.file)


def _make_log_dir(folder) -> None:
    """Create the log folder, or say in one line why it cannot be."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"log folder {folder} is a file, not a folder; choose another log folder")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            raise disk_full_error(folder) from None
        raise UsageError(f"cannot create the log folder {folder} ({exc.strerror or exc}); "
                         "choose a writable log folder") from None


def _unwritable(path, exc: OSError) -> UsageError:
    """A log file the OS refuses, as one line (a full disk says so)."""
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return disk_full_error(path)
    return UsageError(f"cannot write the log file {path} ({exc.strerror or exc}); choose a writable log folder")


def _open_text(path, append, mode=None):
    """``path`` opened for writing text: emptied (ADM's), or continued after its last complete line."""
    if append and mode is None:
        _end_with_newline(path)
    try:
        return open(path, mode or ("at" if append else "wt"))
    except OSError as exc:
        raise _unwritable(path, exc) from None


def _end_with_newline(path) -> None:
    """A text file that a kill or a full disk cut in the middle of a line ends that line."""
    try:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if end:
                f.seek(end - 1)
                if f.read(1) != b"\n":
                    with writing(path):
                        f.write(b"\n")
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _unwritable(path, exc) from None


def _drop_partial_line(path, chunk: int = 1 << 16) -> None:
    """Remove a last line without its newline (a row a kill or a full disk cut short)."""
    try:
        with open(path, "rb+") as f:
            end = f.seek(0, os.SEEK_END)
            if not end:
                return
            f.seek(end - 1)
            if f.read(1) == b"\n":
                return
            pos = end
            while pos > 0:
                start = max(0, pos - chunk)
                f.seek(start)
                block = f.read(pos - start)
                cut = block.rfind(b"\n")
                if cut >= 0:
                    f.truncate(start + cut + 1)
                    return
                pos = start
            f.truncate(0)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _unwritable(path, exc) from None


def _close_quietly(file) -> None:
    """Close a log file; a flush that a full disk refuses at exit must not hide the error that ended the run."""
    try:
        file.close()
    except OSError:
        pass


# -- TensorBoard event files, without TensorFlow ----------------------------------------------------
#
# An event file is a sequence of TFRecords: little-endian uint64 length, its masked CRC-32C, the
# payload, the payload's masked CRC-32C. Each payload is a serialized tensorflow.Event protobuf
# (wall_time = 1: double, step = 2: int64, file_version = 3: string, summary = 5: Summary), a
# Summary being repeated Value (tag = 1: string, simple_value = 2: float).


def _crc32c_table():
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), as TFRecord framing uses it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        low = n & 0x7F
        n >>= 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def _event_bytes(wall_time: float, step: int, *, file_version: str | None = None, scalars=None) -> bytes:
    out = _varint(1 << 3 | 1) + struct.pack("<d", wall_time) + _varint(2 << 3 | 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(
            _length_delimited(1, _length_delimited(1, str(tag).encode()) + _varint(2 << 3 | 5) + struct.pack("<f", v))
            for tag, v in scalars
        )
        out += _length_delimited(5, values)
    return out


def _record(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", _masked_crc(length)) + payload + struct.pack("<I", _masked_crc(payload))


class TensorBoardOutputFormat(KVWriter):
    """Every row as TensorBoard scalars at steps 1, 2, 3, ... in ``dir``/events.out.tfevents.*."""

    def __init__(self, dir):
        _make_log_dir(dir)
        self.dir = dir
        self.step = 1
        # the name TensorFlow's EventsWriter gives a file of prefix "events" (TensorBoard looks for "tfevents")
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        self.path = os.path.join(os.path.abspath(dir), name)
        try:
            self.writer = open(self.path, "ab")
        except OSError as exc:
            raise _unwritable(self.path, exc) from None
        self._write(_record(_event_bytes(time.time(), 0, file_version="brain.Event:2")))

    def _write(self, data: bytes):
        with writing(self.path):
            self.writer.write(data)
            self.writer.flush()

    def writekvs(self, kvs):
        scalars = []
        for key, value in kvs.items():
            try:
                scalars.append((key, float(value)))
            except (TypeError, ValueError):
                continue  # TensorBoard scalars are numbers; text stays in the other outputs
        self._write(_record(_event_bytes(time.time(), self.step, scalars=scalars)))
        self.step += 1

    def close(self):
        if self.writer:
            _close_quietly(self.writer)
            self.writer = None


def make_output_format(format, ev_dir, log_suffix="", append=False):
    """The output called ``format`` (stdout, log, json, csv, tensorboard), writing into ``ev_dir``;
    ``append`` continues the file already there instead of emptying it."""
    _make_log_dir(ev_dir)
    files = {
        "log": lambda: HumanOutputFormat(os.path.join(ev_dir, f"log{log_suffix}.txt"), append=append),
        "json": lambda: JSONOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.json"), append=append),
        "csv": lambda: CSVOutputFormat(os.path.join(ev_dir, f"progress{log_suffix}.csv"), append=append),
        "tensorboard": lambda: TensorBoardOutputFormat(os.path.join(ev_dir, f"tb{log_suffix}")),
        "stdout": lambda: HumanOutputFormat(_STDOUT),
    }
    if format not in files:
        raise ValueError(f"unknown log format {format!r}; use one of {', '.join(sorted(files))}")
    return files[format]()


# -- the module-level interface -----------------------------------------------------------------


def logkv(key, val):
    """Record a diagnostic for this row; a later value for the same key replaces it."""
    get_current().logkv(key, val)


def logkv_mean(key, val):
    """Record a diagnostic for this row; the row holds the mean of the values logged under the key."""
    get_current().logkv_mean(key, val)


def logkvs(d):
    """logkv for every item of the dict ``d``."""
    for key, value in d.items():
        logkv(key, value)


def dumpkvs():
    """Write the row collected since the last dump to every output and start a new one; return it."""
    return get_current().dumpkvs()


def getkvs():
    """The values of the row being collected (the logger's own dict)."""
    return get_current().name2val


def log(*args, level=INFO):
    """Write the arguments, converted to strings and separated by spaces, to the text outputs."""
    get_current().log(*args, level=level)


def debug(*args):
    log(*args, level=DEBUG)


def info(*args):
    log(*args, level=INFO)


def warn(*args):
    log(*args, level=WARN)


def error(*args):
    log(*args, level=ERROR)


def set_level(level):
    """Write text of this level and above only (DISABLED silences it)."""
    get_current().set_level(level)


def set_comm(comm):
    get_current().set_comm(comm)


def get_dir():
    """The folder the outputs write into (None before ``configure``)."""
    return get_current().get_dir()


record_tabular = logkv
dump_tabular = dumpkvs


@contextmanager
def profile_kv(scopename):
    """Add the seconds spent inside the block to the row's ``wait_{scopename}``."""
    key = "wait_" + scopename
    start = time.time()
    try:
        yield
    finally:
        get_current().name2val[key] += time.time() - start


def profile(n):
    """Decorator: time every call of the function into ``wait_{n}`` (see profile_kv)."""

    def decorate(func):
        @functools.wraps(func)
        def timed(*args, **kwargs):
            with profile_kv(n):
                return func(*args, **kwargs)

        return timed

    return decorate


# -- the logger object ----------------------------------------------------------------------------


def get_current():
    """The logger the module-level functions use."""
    if Logger.CURRENT is None:
        _configure_default_logger()
    return Logger.CURRENT


class Logger:
    DEFAULT = None  # the stdout-only logger in use before configure()
    CURRENT = None  # the logger the module-level functions write to

    def __init__(self, dir, output_formats, comm=None):
        self.name2val = defaultdict(float)  # this row's values
        self.name2cnt = defaultdict(int)  # how many values logkv_mean has averaged per key
        self.level = INFO
        self.dir = dir
        self.output_formats = output_formats
        self.comm = comm

    def logkv(self, key, val):
        self.name2val[key] = val

    def logkv_mean(self, key, val):
        count = self.name2cnt[key]
        # running mean: the mean of the first count values, updated with one more
        self.name2val[key] = self.name2val[key] * count / (count + 1) + val / (count + 1)
        self.name2cnt[key] = count + 1

    def dumpkvs(self):
        if self.comm is None:
            row = self.name2val
        else:
            counted = {key: (value, self.name2cnt.get(key, 1)) for key, value in self.name2val.items()}
            row = mpi_weighted_mean(self.comm, counted)
            if self.comm.rank != 0:
                row["dummy"] = 1  # the means live on rank 0; keep the other ranks' tables non-empty
        result = dict(row)
        for output in self.output_formats:
            if isinstance(output, KVWriter):
                output.writekvs(row)
        self.name2val.clear()
        self.name2cnt.clear()
        return result

    def log(self, *args, level=INFO):
        if level >= self.level:
            self._do_log(args)

    def set_level(self, level):
        self.level = level

    def set_comm(self, comm):
        self.comm = comm

    def get_dir(self):
        return self.dir

    def close(self):
        for output in self.output_formats:
            output.close()

    def _do_log(self, args):
        for output in self.output_formats:
            if isinstance(output, SeqWriter):
                output.writeseq([str(a) for a in args])


def get_rank_without_mpi_import():
    """This process's rank from the launcher's environment (MPICH/Intel MPI, Open MPI, torchrun); 0 if none.

    Reading the environment avoids importing mpi4py, which would initialise MPI.
    """
    for name in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if name in os.environ:
            return int(os.environ[name])
    return 0


def mpi_weighted_mean(comm, local_name2valcount):
    """On rank 0 of ``comm``: key -> sum(value * count) / sum(count) over every rank's
    {key: (value, count)}; {} on the other ranks. Values that are not numbers are left out (warned)."""
    gathered = comm.gather(local_name2valcount)
    if comm.rank != 0:
        return {}
    sums = defaultdict(float)
    counts = defaultdict(float)
    for per_rank in gathered:
        for key, (value, count) in per_rank.items():
            try:
                number = float(value)
            except (TypeError, ValueError):
                warnings.warn(f"WARNING: tried to compute mean on non-float {key}={value}")
                continue
            sums[key] += number * count
            counts[key] += count
    return {key: sums[key] / counts[key] for key in sums}


def configure(dir=None, format_strs=None, comm=None, log_suffix="", *, rank=None, append=False):
    """Send the log to ``dir`` (created) through the outputs named in ``format_strs``.

    ``dir`` defaults to $OPENAI_LOGDIR, else a new time-stamped folder in the temp dir (an empty
    string counts as not given); ``format_strs`` to $OPENAI_LOG_FORMAT (``stdout,log,csv``) on
    rank 0 and to $OPENAI_LOG_FORMAT_MPI (``log``) on the others, whose file names get
    ``-rank{rank:03d}``. ``rank`` (this package's addition) overrides the rank read from the
    launcher's environment; ``append`` (also an addition) continues the files already in ``dir``.
    A folder or file that cannot be written is one UsageError line.
    """
    if not dir:
        dir = os.getenv("OPENAI_LOGDIR") or None
    if dir is None:
        dir = os.path.join(tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"))
    dir = os.path.expanduser(os.fspath(dir))
    _make_log_dir(dir)
    if rank is None:
        rank = _process_rank()
    if rank > 0:
        log_suffix = f"{log_suffix}-rank{rank:03d}"
    if format_strs is None:
        if rank == 0:
            format_strs = os.getenv("OPENAI_LOG_FORMAT", "stdout,log,csv").split(",")
        else:
            format_strs = os.getenv("OPENAI_LOG_FORMAT_MPI", "log").split(",")
    output_formats = []
    try:
        for f in format_strs:
            if f:
                output_formats.append(make_output_format(f, dir, log_suffix, append=append))
    except BaseException:
        for output in output_formats:
            output.close()
        raise
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
    Logger.CURRENT = Logger(dir=dir, output_formats=output_formats, comm=comm)
    if output_formats:
        log(f"Logging to {dir}")


def _process_rank() -> int:
    """torch.distributed's rank once it is set up, else the launcher's (see get_rank_without_mpi_import)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return get_rank_without_mpi_import()


def _configure_default_logger():
    Logger.DEFAULT = Logger(dir=None, output_formats=[HumanOutputFormat(_STDOUT)])
    Logger.CURRENT = Logger.DEFAULT


def reset():
    """Close the configured logger and go back to the default one."""
    if Logger.CURRENT is not None and Logger.CURRENT is not Logger.DEFAULT:
        Logger.CURRENT.close()
        Logger.CURRENT = Logger.DEFAULT
        log("Reset logger")


@contextmanager
def scoped_configure(dir=None, format_strs=None, comm=None, log_suffix="", *, rank=None):
    """configure() for the duration of a ``with`` block; the previous logger is restored after it."""
    previous = Logger.CURRENT
    Logger.CURRENT = None  # so that configure() does not close the logger it will restore
    try:
        configure(dir=dir, format_strs=format_strs, comm=comm, log_suffix=log_suffix, rank=rank)
    except BaseException:
        Logger.CURRENT = previous
        raise
    try:
        yield
    finally:
        Logger.CURRENT.close()
        Logger.CURRENT = previous

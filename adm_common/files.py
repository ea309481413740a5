"""File helpers shared by every writer: content hashes, all-or-nothing writes (NPZ files too), output
files checked before the work, and one-writer locks on output folders.

Every write here either completes or leaves the previous state: data go to a temporary sibling
named ``NAME.tmpPID`` (the writer's pid) that is renamed over ``NAME`` only when complete, and is
removed on any error; one left by a killed run (``kill -9``) is removed by ``check_output_file``
once no live process has that pid. A full disk (ENOSPC, EDQUOT) becomes one UsageError line naming
the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import socket
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from adm_common.errors import UsageError, first_line

# errno values that mean "the disk (or the quota) is full".
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def temp_path_for(path) -> Path:
    """A sibling temporary name for ``path`` (same folder, so os.replace is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


_TEMP_RE = re.compile(r"\.tmp\d+$")


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temporary name made by ``temp_path_for``."""
    return bool(_TEMP_RE.search(name))


def disk_full_error(path) -> UsageError:
    return UsageError(f"no space left on device writing {path}; free space and rerun the same command to resume")


@contextlib.contextmanager
def writing(path):
    """Turn a full disk while writing ``path`` into one UsageError line (other OSErrors pass)."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise


def atomic_write_bytes(path, data: bytes, what: str = "", hint: str = "") -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part.

    Without ``what`` a full disk is one UsageError line and other OSErrors pass. With it (the
    evaluator's files: "the JSON results"), every refused write is one UsageError line naming
    ``what``, with ``hint`` added (e.g. that the results were printed above).
    """
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if what:
            hint = f"; {hint}" if hint else ""
            if exc.errno in DISK_FULL:
                raise UsageError(f"no space left on the device writing {what} to {path}{hint}; "
                                 "free space and rerun") from None
            raise UsageError(f"cannot write {what} to {path} ({_reason(exc)}){hint}") from None
        if exc.errno in DISK_FULL:
            raise disk_full_error(path) from None
        raise
    finally:
        remove_file(tmp)


def atomic_write_text(path, text: str, what: str = "", hint: str = "") -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"), what, hint)


def remove_file(path) -> None:
    """Remove ``path`` if it is there; a folder that refuses even the removal is left as it is."""
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def check_output_file(path, what: str, flag: str) -> Path:
    """Make sure ``path`` can be written before hours of work go into it; sweep stale temporaries.

    ``what`` names the file in messages ("the JSON results"), ``flag`` the option that chooses it.
    The check creates and removes this process's temporary sibling, so an unwritable folder (a
    read-only mount, /proc, a folder of another user) is refused here, whoever runs it.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise UsageError(f"folder {folder} for {what} does not exist; create it or choose another {flag}")
    if not folder.is_dir():
        raise UsageError(f"{folder} is a file, not a folder, so {what} cannot go to {path}; choose another {flag}")
    if path.is_dir():
        raise UsageError(f"{path} is a folder; give {flag} a file name for {what}")
    sweep_stale_temporaries(path)
    probe = temp_path_for(path)
    try:
        with open(probe, "xb"):
            pass
    except FileExistsError:
        pass  # this process's own temporary file: the folder is writable
    except OSError as exc:
        raise UsageError(f"cannot write {what} to {path} ({_reason(exc)}); choose another {flag}") from None
    remove_file(probe)
    return path


def sweep_stale_temporaries(path) -> list[Path]:
    """Remove the ``NAME.tmpPID`` siblings of ``path`` left by processes that no longer run."""
    path = Path(path)
    pattern = re.compile(re.escape(path.name) + r"\.tmp(\d+)$")
    removed = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return removed
    for sibling in siblings:
        match = pattern.fullmatch(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            try:
                if sibling.is_file() and not sibling.is_symlink():
                    sibling.unlink()
                    removed.append(sibling)
            except OSError:
                pass  # not ours to remove after all (another user's folder): leave it
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # another user's process (or a pid no system has: leave such a file alone)
    return True


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


def atomic_write_figure(fig, path, dpi: int = 110) -> None:
    """Save a matplotlib figure as PNG all-or-nothing, then close it."""
    import io

    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def atomic_write_safetensors(tensors: dict, path) -> None:
    """Write ``tensors`` (name -> contiguous tensor) as a .safetensors file, all or nothing."""
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors))


class NpzWriter:
    """Writes an .npz member by member (stored, as np.savez) into a temporary file.

    Used as a context manager: the file appears at ``path`` only when the block ends without an
    error; otherwise the temporary file is removed and nothing half-written is left. Members carry
    a fixed timestamp, so the same arrays always give the same bytes (and the same sha256).
    """

    def __init__(self, path):
        self.path = Path(path)
        self._partial = temp_path_for(self.path)
        try:
            with writing(self.path):
                self._zip = zipfile.ZipFile(self._partial, "w", zipfile.ZIP_STORED, allowZip64=True)
        except BaseException:  # Ctrl-C or SIGTERM while the file is being made: __exit__ will not run
            self._partial.unlink(missing_ok=True)
            raise

    def add(self, name: str, array: np.ndarray) -> None:
        with writing(self.path), self._zip.open(_member(name), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    def add_streamed(self, name: str, shape: tuple, dtype, batches):
        """Write array ``name`` of the given shape from ``batches`` (split along axis 0).

        Yields each batch after writing it, so the caller can use it too; checks the row count.
        """
        descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
        header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
        written = 0
        with writing(self.path), self._zip.open(_member(name), "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, header)
            for batch in batches:
                batch = np.ascontiguousarray(batch, dtype=dtype)
                if batch.shape[1:] != tuple(shape[1:]):
                    raise ValueError(f"{name}: batch of shape {batch.shape} does not fit array of shape {shape}")
                member.write(batch.tobytes())
                written += len(batch)
                yield batch
        if written != shape[0]:
            raise ValueError(f"{name}: wrote {written} rows, the header promised {shape[0]}")

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        try:
            if exc_type is not None:
                with contextlib.suppress(Exception):
                    self._zip.close()  # a full disk may refuse the central directory too
                return
            with writing(self.path):
                self._zip.close()
                with open(self._partial, "rb") as f:
                    os.fsync(f.fileno())  # on disk before the name says it is complete
                os.replace(self._partial, self.path)
        finally:
            self._partial.unlink(missing_ok=True)


def _member(name: str) -> zipfile.ZipInfo:
    return zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))


# ---------------------------------------------------------------------------------------------
# One writer per output folder


class FolderInUse(UsageError):
    """Another process holds the lock of the folder this run would write."""


# lock file path (resolved) -> [file descriptor or None when the filesystem has no locks, count]
_HELD: dict[str, list] = {}


def _lock_key(lock_file: Path) -> str:
    return os.path.join(os.path.realpath(lock_file.parent), lock_file.name)


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``fd`` is still the file at ``path`` (a releasing holder unlinks it)."""
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info['pid']} on {info.get('host', '?')}, since {since}: {info.get('command', '?')}"


def acquire_lock(lock_file, what: str, hint: str = "wait for it to finish or choose another --output_dir") -> None:
    """Hold an exclusive OS lock (flock) on ``lock_file`` for this process, or raise FolderInUse.

    Re-entrant within a process (counted); the OS drops the lock when the process ends however it
    ends (``kill -9`` included), so a folder is never left locked. ``what`` names the folder in
    the one-line refusal. On a filesystem without locks the run goes ahead unlocked.
    """
    import fcntl

    lock_file = Path(lock_file)
    key = _lock_key(lock_file)
    if key in _HELD:
        _HELD[key][1] += 1
        return
    for _ in range(100):
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise disk_full_error(lock_file) from None
            raise UsageError(f"cannot write to {what} ({exc.strerror}): cannot create its lock file "
                             f"{lock_file.name}; choose a writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if _same_file(fd, lock_file):
                holder = _holder(fd)
                os.close(fd)
                raise FolderInUse(f"{what} is in use by another run ({holder}); {hint}") from None
            os.close(fd)  # the holder released and removed it meanwhile: try again
            continue
        except OSError as exc:  # a filesystem without flock (some network filesystems)
            os.close(fd)
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                print(f"warning: {what} cannot be locked ({exc.strerror}); make sure no other run writes it",
                      file=sys.stderr)
                _HELD[key] = [None, 1]
                return
            raise
        if not _same_file(fd, lock_file):  # locked a file its holder had just removed
            os.close(fd)
            continue
        record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                  "command": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError:
            pass  # only the refusal's description of the holder is lost
        _HELD[key] = [fd, 1]
        return
    raise UsageError(f"could not lock {what}: its lock file {lock_file} keeps changing; {hint}")


def release_lock(lock_file) -> None:
    """Undo one ``acquire_lock``; the last one removes the lock file and drops the lock."""
    lock_file = Path(lock_file)
    key = _lock_key(lock_file)
    entry = _HELD.get(key)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] > 0:
        return
    del _HELD[key]
    fd = entry[0]
    if fd is not None:
        if _same_file(fd, lock_file):
            with contextlib.suppress(OSError):
                os.unlink(lock_file)  # while still locked, so no other process holds this file
        os.close(fd)


@contextlib.contextmanager
def locked(lock_file, what: str, hint: str = "wait for it to finish or choose another --output_dir"):
    acquire_lock(lock_file, what, hint)
    try:
        yield
    finally:
        release_lock(lock_file)


FOLDER_LOCK_NAME = ".lock"


def folder_lock_file(folder) -> Path:
    """The lock file of an output folder (held by the run that writes the folder)."""
    return Path(folder) / FOLDER_LOCK_NAME


def lock_output_folder(folder, flag: str = "--output_dir") -> None:
    """Hold ``folder``'s one-writer lock until the process ends (a script's whole run).

    The lock file is removed at a normal exit; after ``kill -9`` it stays, unlocked, and the next
    run takes it over.
    """
    import atexit

    lock_file = folder_lock_file(folder)
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write to output folder {folder} ({exc.strerror}); choose a writable {flag}") from None
    acquire_lock(lock_file, f"output folder {folder}", f"wait for it to finish or choose another {flag}")
    atexit.register(release_lock, lock_file)


def read_json_object(path, what: str = "") -> dict:
    """The JSON object in ``path``, or one UsageError line naming the file (``what`` it is, if given)."""
    name = f"the {what} {path}" if what else str(path)
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise UsageError(f"cannot read {name} ({exc.strerror})") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{name} is damaged (not valid JSON: {first_line(exc, limit=160)})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{name} is damaged (not a JSON object)")
    return value

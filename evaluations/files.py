"""Output files of the evaluator and of make_reference_batch: checked before any work, written whole.

A file is written to a temporary sibling ``NAME.tmpPID`` (the writer's pid; the scheme of
adm_common.files, whose NpzWriter writes reference batches) and renamed over ``NAME``
only when complete, so a reader sees the old file or the new one, never a part. The temporary file
is removed on every error; one left by a killed run (``kill -9``) is removed by the next run that
writes the same file, once no live process has that pid.

Every failure a user can fix raises ValueError with one line that says what was wrong and what
to do (the scripts print it as ``error: ...`` and exit with status 2).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from pathlib import Path

# errno values that mean "the disk (or the quota) is full"
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def temp_path(path) -> Path:
    """This process's temporary sibling of ``path`` (the same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp{os.getpid()}")


def sha256_file(path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_output_file(path, what: str, flag: str) -> Path:
    """Make sure ``path`` can be written before hours of work go into it; sweep stale temporaries.

    ``what`` names the file in messages ("the JSON results"), ``flag`` the option that chooses it.
    The check creates and removes this process's temporary sibling, so an unwritable folder (a
    read-only mount, /proc, a folder of another user) is refused here, whoever runs it.
    """
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise ValueError(f"folder {folder} for {what} does not exist; create it or choose another {flag}")
    if not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder, so {what} cannot go to {path}; choose another {flag}")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give {flag} a file name for {what}")
    sweep_stale_temporaries(path)
    probe = temp_path(path)
    try:
        with open(probe, "xb"):
            pass
    except FileExistsError:
        pass  # this process's own temporary file: the folder is writable
    except OSError as exc:
        raise ValueError(f"cannot write {what} to {path} ({_reason(exc)}); choose another {flag}") from None
    remove_file(probe)
    return path


def sweep_stale_temporaries(path) -> list[Path]:
    """Remove ``NAME.tmpPID`` siblings of ``path`` left by processes that no longer run."""
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


def atomic_write_text(path, text: str, what: str, hint: str = "") -> None:
    """Write ``text`` to ``path`` all or nothing; a full disk or a refused write is one ValueError line.

    ``hint`` is added to the message (e.g. that the results were printed above).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        hint = f"; {hint}" if hint else ""
        if exc.errno in DISK_FULL:
            raise ValueError(f"no space left on the device writing {what} to {path}{hint}; free space and rerun") from None
        raise ValueError(f"cannot write {what} to {path} ({_reason(exc)}){hint}") from None
    finally:
        remove_file(tmp)


def remove_file(path) -> None:
    try:
        Path(path).unlink()
    except FileNotFoundError:
        pass
    except OSError:
        pass  # a folder that refuses even the removal: nothing was written there either


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

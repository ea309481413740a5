"""ADM's .npz batches read and written a batch of images at a time.

``arr_0`` (uint8 [N, H, W, 3]) is read straight from its zip member with NumPy's .npy header
reader, so 50k images at 512 px never sit in memory together (reference batches are written the
same way, by adm_common.files.NpzWriter). Reference batches may also hold precomputed
statistics (mu, sigma, mu_s, sigma_s), which ADM's evaluator uses instead of recomputing them.

A damaged file (empty, truncated, a member whose bytes do not match its CRC-32) is a ValueError of
one line naming the file. ``scan_batch_file`` finds damage anywhere in a file in the same pass
that computes its sha256, so the evaluator refuses a damaged batch before Inception runs on it.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from evaluations.feature_statistics import FIDStatistics
from evaluations.inception_graph import image_batch_problem

IMAGES_MEMBER = "arr_0.npy"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
_NPY_MAGIC = b"\x93NUMPY"
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then file name and extra field lengths
_SCAN_CHUNK = 1 << 24


# What zipfile and zlib raise on a damaged archive. NotImplementedError: an unknown compression
# method or zip version; RuntimeError: a member flagged as encrypted.
ZIP_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, struct.error, NotImplementedError, RuntimeError)


@contextlib.contextmanager
def damaged_file_errors(path):
    """Turn what zipfile and zlib raise on a damaged archive into one ValueError line naming ``path``."""
    try:
        yield
    except ZIP_DAMAGE as exc:
        detail = str(exc) or type(exc).__name__
        if isinstance(exc, EOFError):
            detail = "a member ends early: the file is truncated"
        raise ValueError(f"{path} is damaged ({detail}); re-create or re-download it") from None


class NpzImages:
    """The images of an ADM batch file, validated on opening and read in batches."""

    def __init__(self, path):
        self.path = Path(path)
        self._zip = _open_archive(self.path)
        try:
            if IMAGES_MEMBER not in self._zip.namelist():
                raise ValueError(
                    f"{self.path} has no arr_0; ADM batches hold their images in arr_0 as uint8 [N, H, W, 3]"
                )
            with damaged_file_errors(self.path), self._zip.open(IMAGES_MEMBER) as member:
                self.shape, fortran_order, dtype = _read_header(member, self.path)
                header_bytes = member.tell()
            problem = image_batch_problem(self.shape, dtype)
            if problem:
                raise ValueError(f"{self.path}: arr_0 {problem}")
            stored_bytes = self._zip.getinfo(IMAGES_MEMBER).file_size - header_bytes
            if stored_bytes < int(np.prod(self.shape)):
                complete = stored_bytes // int(np.prod(self.shape[1:]))
                raise ValueError(
                    f"{self.path}: arr_0 holds {complete} of the {self.shape[0]} images its header announces; "
                    "the file is truncated: re-create or re-download it"
                )
            if fortran_order:
                raise ValueError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous")
        except BaseException:
            self._zip.close()
            raise

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        """Consecutive uint8 batches of at most ``batch_size`` images, in file order."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        image_bytes = int(np.prod(self.shape[1:]))
        with damaged_file_errors(self.path), self._zip.open(IMAGES_MEMBER) as member:
            _read_header(member, self.path)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                buffer = bytearray(count * image_bytes)
                view, filled = memoryview(buffer), 0
                while filled < len(buffer):
                    read = member.readinto(view[filled:])
                    if not read:
                        complete = start + filled // image_bytes
                        raise ValueError(
                            f"{self.path}: arr_0 ends after {complete} of {len(self)} images; "
                            "the file is truncated: re-create or re-download it"
                        )
                    filled += read
                yield np.frombuffer(buffer, dtype=np.uint8).reshape((count,) + tuple(self.shape[1:]))

    def close(self) -> None:
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _open_archive(path: Path) -> zipfile.ZipFile:
    if not path.exists():
        raise FileNotFoundError(f"batch file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is a folder, not an .npz batch file")
    try:
        size = path.stat().st_size
        if size == 0:
            raise ValueError(f"{path} is empty (0 bytes); re-create or re-download it")
        with open(path, "rb") as f:
            start = f.read(len(_NPY_MAGIC))
        if start == _NPY_MAGIC:
            raise ValueError(f"{path} is a single .npy array, not an .npz batch; save the images with np.savez")
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(
            f"{path} is not an .npz file, or is truncated (it has no readable zip directory); "
            "re-create or re-download it"
        ) from None
    except ZIP_DAMAGE as exc:
        raise ValueError(f"{path} is damaged ({exc or type(exc).__name__}); re-create or re-download it") from None
    outside = [info.filename for info in archive.infolist() if not 0 <= info.header_offset < size]
    if outside:
        archive.close()
        raise ValueError(f"{path} is damaged (member {outside[0]} starts outside the file); re-create or re-download it")
    return archive


def _read_header(member, path):
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(member)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(member)
    except ValueError as exc:
        raise ValueError(
            f"{path}: arr_0 is not a valid .npy member ({exc}); the file is damaged: re-create or re-download it"
        ) from None
    raise ValueError(f"{path}: arr_0 uses .npy format version {version}; re-save it with np.savez")


def scan_batch_file(path) -> str:
    """The sha256 of the file at ``path``, after checking every member's bytes against its CRC-32.

    One pass over the file: stored members (np.savez's, the usual case) are checked on the raw bytes
    as they are hashed; compressed ones (np.savez_compressed) are decompressed and checked by zipfile.
    """
    path = Path(path)
    digest = hashlib.sha256()
    with damaged_file_errors(path):
        archive = _open_archive(path)
        with archive, open(path, "rb") as raw:
            stored = []  # [start, end, running crc, info] of each stored member's data, by position
            for info in archive.infolist():
                if info.compress_type == zipfile.ZIP_STORED:
                    raw.seek(info.header_offset)
                    header = raw.read(_LOCAL_HEADER.size)
                    if len(header) < _LOCAL_HEADER.size:
                        raise zipfile.BadZipFile(f"the file ends inside the header of {info.filename}")
                    signature, name_length, extra_length = _LOCAL_HEADER.unpack(header)
                    if signature != b"PK\x03\x04":
                        raise zipfile.BadZipFile(f"bad header of member {info.filename}")
                    start = info.header_offset + _LOCAL_HEADER.size + name_length + extra_length
                    stored.append([start, start + info.compress_size, 0, info])
                else:
                    with archive.open(info) as member:
                        while member.read(_SCAN_CHUNK):
                            pass
            stored.sort(key=lambda entry: entry[0])
            raw.seek(0)
            position = 0
            while chunk := raw.read(_SCAN_CHUNK):
                digest.update(chunk)
                end = position + len(chunk)
                for entry in stored:
                    lo, hi = max(entry[0], position), min(entry[1], end)
                    if lo < hi:
                        entry[2] = zlib.crc32(chunk[lo - position : hi - position], entry[2])
                position = end
            for start, stop, crc, info in stored:
                if stop > position:
                    raise zipfile.BadZipFile(f"member {info.filename} ends after the end of the file: truncated")
                if crc != info.CRC:
                    raise zipfile.BadZipFile(f"member {info.filename}: its bytes do not match its CRC-32")
    return digest.hexdigest()


def read_stored_statistics(path) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool, spatial) statistics saved in a batch file, or None when it holds none."""
    path = Path(path)
    _open_archive(path).close()
    with damaged_file_errors(path), np.load(path, allow_pickle=False) as data:
        present = [key for key in STATISTICS_KEYS if key in data.files]
        if not present:
            return None
        if len(present) < len(STATISTICS_KEYS):
            missing = [key for key in STATISTICS_KEYS if key not in present]
            raise ValueError(
                f"{path} holds {', '.join(present)} but not {', '.join(missing)}; "
                "a reference batch holds all four statistics or none"
            )
        try:
            arrays = {key: data[key] for key in STATISTICS_KEYS}
            if any(not np.issubdtype(array.dtype, np.number) for array in arrays.values()):
                kinds = ", ".join(f"{key} {array.dtype}" for key, array in arrays.items())
                raise ValueError(f"the statistics must be numbers, got {kinds}")
        except ValueError as exc:  # object arrays (pickles) are refused by np.load, too
            raise ValueError(f"{path}: stored statistics cannot be read ({exc})") from None
        try:
            return (FIDStatistics(arrays["mu"], arrays["sigma"]),
                    FIDStatistics(arrays["mu_s"], arrays["sigma_s"]))
        except ValueError as exc:
            raise ValueError(f"{path}: stored {exc}") from None

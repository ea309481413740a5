"""ADM's .npz batches read and written a batch of images at a time.

``arr_0`` (uint8 [N, H, W, 3]) is read straight from its zip member with NumPy's .npy header
reader, so 50k images at 512 px never sit in memory together (reference batches are written the
same way, by guided_diffusion.file_util.NpzWriter). Reference batches may also hold precomputed statistics (mu, sigma, mu_s,
sigma_s), which ADM's evaluator uses instead of recomputing them.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from evaluations.feature_statistics import FIDStatistics
from evaluations.inception import image_batch_problem

IMAGES_MEMBER = "arr_0.npy"
STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


class NpzImages:
    """The images of an ADM batch file, validated on opening and read in batches."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"batch file {self.path} does not exist")
        try:
            self._zip = zipfile.ZipFile(self.path)
        except zipfile.BadZipFile:
            raise ValueError(f"{self.path} is not an .npz file (not a zip archive)") from None
        try:
            if IMAGES_MEMBER not in self._zip.namelist():
                raise ValueError(
                    f"{self.path} has no arr_0; ADM batches hold their images in arr_0 as uint8 [N, H, W, 3]"
                )
            with self._zip.open(IMAGES_MEMBER) as member:
                self.shape, fortran_order, dtype = _read_header(member, self.path)
            problem = image_batch_problem(self.shape, dtype)
            if problem:
                raise ValueError(f"{self.path}: arr_0 {problem}")
            if fortran_order:
                raise ValueError(f"{self.path}: arr_0 is stored in Fortran order; save it C-contiguous")
        except Exception:
            self._zip.close()
            raise

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int):
        """Consecutive uint8 batches of at most ``batch_size`` images, in file order."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        image_bytes = int(np.prod(self.shape[1:]))
        with self._zip.open(IMAGES_MEMBER) as member:
            _read_header(member, self.path)
            for start in range(0, len(self), batch_size):
                count = min(batch_size, len(self) - start)
                buffer = bytearray(count * image_bytes)
                view, filled = memoryview(buffer), 0
                while filled < len(buffer):
                    read = member.readinto(view[filled:])
                    if not read:
                        complete = start + filled // image_bytes
                        raise ValueError(f"{self.path}: arr_0 ends after {complete} of {len(self)} images")
                    filled += read
                yield np.frombuffer(buffer, dtype=np.uint8).reshape((count,) + tuple(self.shape[1:]))

    def close(self) -> None:
        self._zip.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _read_header(member, path):
    try:
        version = np.lib.format.read_magic(member)
        if version == (1, 0):
            return np.lib.format.read_array_header_1_0(member)
        if version == (2, 0):
            return np.lib.format.read_array_header_2_0(member)
    except ValueError as exc:
        raise ValueError(f"{path}: arr_0 is not a valid .npy member ({exc})") from None
    raise ValueError(f"{path}: arr_0 uses .npy format version {version}; re-save it with np.savez")


def read_stored_statistics(path) -> tuple[FIDStatistics, FIDStatistics] | None:
    """(pool, spatial) statistics saved in a batch file, or None when it holds none."""
    with np.load(path, allow_pickle=False) as data:
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
            return FIDStatistics(data["mu"], data["sigma"]), FIDStatistics(data["mu_s"], data["sigma_s"])
        except ValueError as exc:
            raise ValueError(f"{path}: stored {exc}") from None

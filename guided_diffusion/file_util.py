"""File helpers shared by every writer: content hashes and all-or-nothing writes (NPZ files too)."""

from __future__ import annotations

import hashlib
import os
import zipfile
from pathlib import Path

import numpy as np


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


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one, never a part."""
    tmp = temp_path_for(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


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
        self._zip = zipfile.ZipFile(self._partial, "w", zipfile.ZIP_STORED, allowZip64=True)

    def add(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(_member(name), "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)

    def add_streamed(self, name: str, shape: tuple, dtype, batches):
        """Write array ``name`` of the given shape from ``batches`` (split along axis 0).

        Yields each batch after writing it, so the caller can use it too; checks the row count.
        """
        descr = np.lib.format.dtype_to_descr(np.dtype(dtype))
        header = {"descr": descr, "fortran_order": False, "shape": tuple(shape)}
        written = 0
        with self._zip.open(_member(name), "w", force_zip64=True) as member:
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
        self._zip.close()
        if exc_type is None:
            with open(self._partial, "rb") as f:
                os.fsync(f.fileno())  # on disk before the name says it is complete
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink(missing_ok=True)


def _member(name: str) -> zipfile.ZipInfo:
    return zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))

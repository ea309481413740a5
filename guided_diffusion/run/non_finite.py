"""The one error of NaN or infinite values, and how it names the images it hit."""

from __future__ import annotations

from typing import Sequence

from adm_common.errors import UsageError


class NonFiniteError(UsageError):
    """A network or sampler produced NaN or infinite values; nothing of the batch is written."""


def index_ranges(indices: Sequence[int]) -> str:
    """'3-5, 9' for image indices (the first few runs of them)."""
    runs: list[list[int]] = []
    for i in (int(i) for i in indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    parts = [f"{a}-{b}" if b > a else f"{a}" for a, b in runs[:6]]
    return ", ".join(parts) + (", ..." if len(runs) > 6 else "")


def images_text(indices: Sequence[int]) -> str:
    return ("images " if len(indices) > 1 else "image ") + index_ranges(indices)

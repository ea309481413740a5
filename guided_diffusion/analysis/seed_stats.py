"""Numbers over seeds: mean +- std, the gain paired by seed, and a verdict only beyond the spread.

Every comparison of two sampling settings in this package (the digits demo, the side-by-side of
exposure-bias fixes) runs both on the same seeds, so image i of both starts from the same noise.
A difference counts only when it is larger than the seed-to-seed spread of both settings.
"""

from __future__ import annotations

import numpy as np


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def cell(values, digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def paired_gain(base, other, lower_is_better: bool = True, digits: int = 3) -> str:
    """Per-seed improvement of ``other`` over ``base`` (same noise), mean ± std over seeds."""
    gains = np.asarray(base, dtype=np.float64) - np.asarray(other, dtype=np.float64)
    return cell(gains if lower_is_better else -gains, digits)


def verdict(base, other, lower_is_better: bool = True, name: str = "ES") -> str:
    """'NAME better' / 'NAME worse' when the means differ by more than either setting's seed
    spread, else 'within noise'."""
    (mb, sb), (mo, so) = mean_std(base), mean_std(other)
    gain = (mb - mo) if lower_is_better else (mo - mb)
    if abs(gain) <= max(sb, so):
        return "within noise"
    return f"{name} better" if gain > 0 else f"{name} worse"

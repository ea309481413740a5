"""Several sample files of one model (seed sets) scored against one reference: the spread of each
metric over the files, and a bootstrap interval of each file's FID.

EDM reports the minimum FID over three seed sets (seeds 0-49999, 50000-99999, 100000-149999);
the mean and standard deviation over the files say how much of a difference between two models is
the seeds'. The bootstrap interval says the same within one file: the sample activations are drawn
again with replacement and FID is recomputed against the fixed reference statistics.
"""

from __future__ import annotations

import numpy as np

from evaluations.feature_statistics import FIDStatistics

BOOTSTRAP_PERCENTILES = (2.5, 97.5)


def summarize(per_file: list[dict]) -> dict:
    """{metric: {"mean", "std", "min", "max"}} over the files' metric dicts (std with n - 1, as
    the spread of a seed set; it needs two files)."""
    if len(per_file) < 2:
        raise ValueError(f"a spread over sample files needs at least 2 of them, got {len(per_file)}")
    summary = {}
    for key in per_file[0]:
        values = np.array([metrics[key] for metrics in per_file], dtype=np.float64)
        summary[key] = {
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)),
            "min": float(values.min()),
            "max": float(values.max()),
        }
    return summary


def bootstrap_fid(pool: np.ndarray, reference: FIDStatistics, resamples: int, seed: int = 0) -> dict:
    """The 2.5 and 97.5 percentiles of FID over ``resamples`` draws of ``pool``'s rows with replacement.

    A draw is a row count per image (NumPy's default_rng(seed)), so the rows are never copied;
    the interval is a function of the rows, ``resamples`` and ``seed`` alone. Each draw costs one
    covariance and one matrix square root, as a FID does.
    """
    if resamples < 2:
        raise ValueError(f"a bootstrap interval needs at least 2 resamples, got {resamples}")
    pool = np.asarray(pool)
    count = len(pool)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        weights = np.bincount(rng.integers(0, count, size=count), minlength=count)
        statistics = FIDStatistics(
            np.average(pool, axis=0, weights=weights),
            np.cov(pool, rowvar=False, fweights=weights),
        )
        values.append(statistics.frechet_distance(reference))
    low, high = np.percentile(values, BOOTSTRAP_PERCENTILES)
    return {"low": float(low), "high": float(high), "percentiles": list(BOOTSTRAP_PERCENTILES),
            "resamples": resamples, "seed": seed}

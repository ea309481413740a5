"""Inception features of a stream of image batches: pool_3 rows and running statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np
from tqdm import tqdm

from evaluations.feature_statistics import FIDStatistics, RunningStatistics
from evaluations.inception import InceptionFeatures


@dataclass
class BatchActivations:
    pool: np.ndarray | None  # [n, 2048] float32 rows, for precision/recall and IS; None if not kept
    pool_statistics: FIDStatistics | None  # for FID; None when not computed
    spatial_statistics: FIDStatistics | None  # for sFID


def compute_activations(
    batches: Iterable[np.ndarray],
    model: InceptionFeatures,
    num_images: int,
    keep_pool: bool = True,
    with_statistics: bool = True,
    desc: str = "images",
) -> BatchActivations:
    """Run ``model`` over ``batches`` (num_images images in all), keeping only what is asked for.

    The spatial features (2023 per image) are never kept: only their running statistics.
    """
    pool_rows = None
    pool_running, spatial_running = RunningStatistics(), RunningStatistics()
    seen = 0
    # Progress is shown on a terminal only (tqdm's disable=None), and a bar is cleared when the run
    # fails, so that a failure ends in its one error line, not in a half-filled bar.
    with tqdm(total=num_images, unit="img", desc=desc, disable=None) as progress:
        try:
            for batch in batches:
                pool, spatial = model.features(batch)
                if seen + len(pool) > num_images:
                    raise ValueError(f"got more than the {num_images} images announced")
                if keep_pool:
                    if pool_rows is None:
                        pool_rows = np.empty((num_images, pool.shape[1]), dtype=np.float32)
                    pool_rows[seen : seen + len(pool)] = pool
                if with_statistics:
                    pool_running.add(pool)
                    spatial_running.add(spatial)
                seen += len(pool)
                progress.update(len(pool))
        except BaseException:
            progress.leave = False
            raise
    if seen != num_images:
        raise ValueError(f"got {seen} images, expected {num_images}")
    return BatchActivations(
        pool=pool_rows,
        pool_statistics=pool_running.statistics() if with_statistics else None,
        spatial_statistics=spatial_running.statistics() if with_statistics else None,
    )

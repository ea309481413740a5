"""Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's ManifoldEstimator semantics.

Each set of features spans a manifold: the union of balls around its points, each ball reaching
the point's k-th nearest neighbour in the same set (k = 3). Precision is the fraction of samples
inside the reference manifold, recall the fraction of references inside the sample manifold; a
point on a ball's surface is inside. Distances are squared Euclidean and computed block by block
(row and column blocks of 10000 as ADM), so memory stays bounded for 50k x 50k comparisons.
ADM computes the distances in float16 when they fit; here they are float32, which changes the
answer only for points within float16 round-off of a ball's surface.
"""

from __future__ import annotations

import torch

NEIGHBOURHOOD_SIZE = 3
BLOCK_SIZE = 10000


def squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[len(rows), len(cols)] squared Euclidean distances, |u|^2 - 2 u.v + |v|^2 clamped at 0."""
    row_norms = rows.square().sum(dim=1, keepdim=True)
    col_norms = cols.square().sum(dim=1).unsqueeze(0)
    return (row_norms - 2 * rows @ cols.T + col_norms).clamp_(min=0)


def manifold_radii(
    features: torch.Tensor, k: int = NEIGHBOURHOOD_SIZE, block_size: int = BLOCK_SIZE
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the set (itself excluded).

    The point itself is the nearest at distance 0, so this is the (k+1)-th smallest distance of
    its row; the k+1 smallest are kept across column blocks.
    """
    count = len(features)
    if count <= k:
        raise ValueError(f"precision and recall need more than k={k} images on each side, got {count}")
    radii = torch.empty(count, dtype=torch.float32, device=features.device)
    for row in range(0, count, block_size):
        nearest = None
        for col in range(0, count, block_size):
            block = squared_distances(features[row : row + block_size], features[col : col + block_size])
            if nearest is not None:
                block = torch.cat([nearest, block], dim=1)
            nearest = block.topk(min(k + 1, block.shape[1]), dim=1, largest=False).values
        radii[row : row + block_size] = nearest.max(dim=1).values
    return radii


def precision_recall(
    reference: torch.Tensor,
    samples: torch.Tensor,
    k: int = NEIGHBOURHOOD_SIZE,
    block_size: int = BLOCK_SIZE,
) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference``, both [n, d] feature rows."""
    reference, samples = _as_features(reference, "reference"), _as_features(samples, "sample")
    samples = samples.to(reference.device)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(
            f"reference features have {reference.shape[1]} values per image, samples {samples.shape[1]}"
        )
    reference_radii = manifold_radii(reference, k, block_size)
    sample_radii = manifold_radii(samples, k, block_size)
    reference_covered = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=reference.device)
    for row in range(0, len(reference), block_size):
        rows = slice(row, row + block_size)
        for col in range(0, len(samples), block_size):
            cols = slice(col, col + block_size)
            distances = squared_distances(reference[rows], samples[cols])
            reference_covered[rows] |= (distances <= sample_radii[cols].unsqueeze(0)).any(dim=1)
            sample_covered[cols] |= (distances <= reference_radii[rows].unsqueeze(1)).any(dim=0)
    precision = sample_covered.double().mean().item()
    recall = reference_covered.double().mean().item()
    return precision, recall


def _as_features(features, name: str) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2 or not features.is_floating_point():
        shape = tuple(features.shape)
        raise ValueError(f"{name} features must be a float [n, d] array, got {features.dtype} {shape}")
    return features.float()

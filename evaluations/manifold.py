"""Improved precision and recall (Kynkaanniemi et al. 2019) with ADM's ManifoldEstimator semantics.

Each set of features spans a manifold: the union of balls around its points, each ball reaching
the point's k-th nearest neighbour in the same set (k = 3). Precision is the fraction of samples
inside the reference manifold, recall the fraction of references inside the sample manifold; a
point on a ball's surface is inside. Distances are squared Euclidean, |u|^2 - 2 u.v + |v|^2
clamped at 0, computed block by block (row and column blocks of 10000, as ADM), so memory stays
bounded for 50k x 50k comparisons.

By default (``distance_dtype="float16"``) every block is computed as ADM's evaluator computes it
with TensorFlow on a CPU: the features are rounded to float16, the squared norms are float16
squares summed in float16 in the order of TensorFlow's (Eigen's) x86-64 reduction kernel, the
products u.v are accumulated in float32 and rounded to float16, and the sum and clamp are float16
operations. A block in which any of those float16 distances is infinite or NaN (features too
large for float16) is computed again in float32, again as ADM. Float16 keeps 11 significant bits,
so a distance computed from norms in the hundreds moves in steps of 1/4 or more: many samples lie
exactly on a ball's surface, and precision and recall differ from those of exact distances (by
0.01 on the evaluator's reference fixture). The one part not reproduced bit for bit is the order
in which TensorFlow's matrix product accumulates in float32 (its blocking depends on the
machine): about one distance in 10^4 rounds to the neighbouring float16 value. (ADM's evaluator
on a GPU runs other kernels, which round differently, so its numbers there can differ from its
CPU numbers in the same way.)

``distance_dtype="float32"`` computes every block in float32 instead: the cleaner answer, which
differs from ADM's for points within float16 round-off of a ball's surface.
"""

from __future__ import annotations

import torch

NEIGHBOURHOOD_SIZE = 3
BLOCK_SIZE = 10000
DISTANCE_DTYPES = ("float16", "float32")

# TensorFlow's x86-64 CPU kernels sum float16 with Eigen's 8-lane packets (AVX): four packet
# accumulators over a row, then packet-wise into one; rows longer than 8 * 200 values are split
# in two at a packet boundary and the halves summed recursively (a tree).
_PACKET = 8
_TREE_LEAF_PACKETS = 200


def squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[len(rows), len(cols)] squared Euclidean distances in float32, |u|^2 - 2 u.v + |v|^2 clamped at 0."""
    rows, cols = rows.float(), cols.float()
    row_norms = rows.square().sum(dim=1, keepdim=True)
    col_norms = cols.square().sum(dim=1).unsqueeze(0)
    return (row_norms - 2 * rows @ cols.T + col_norms).clamp_(min=0)


def float16_squared_norms(rows: torch.Tensor) -> torch.Tensor:
    """Float16 |u|^2 of each row, as TensorFlow computes reduce_sum(square(u), 1) for float16 u on a CPU.

    Every square and every partial sum is rounded to float16, so the result depends on the order
    of the additions; this follows Eigen's. ``rows`` is rounded to float16 first.
    """
    squares = rows.half() * rows.half()
    count, dim = squares.shape
    if dim % _PACKET == 0 or dim <= _PACKET * _TREE_LEAF_PACKETS:
        return _float16_tree_sum(squares, 0)
    # A split point is aligned to the packet grid of the whole [count, dim] tensor, so in a long
    # row whose length is not a multiple of 8 it depends on where the row starts in that tensor.
    norms = squares.new_empty(count)
    phases = (torch.arange(count, device=squares.device) * dim) % _PACKET
    for phase in range(_PACKET):
        chosen = (phases == phase).nonzero().squeeze(1)
        if len(chosen):
            norms[chosen] = _float16_tree_sum(squares[chosen], phase)
    return norms


def float16_squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """[len(rows), len(cols)] float16 squared distances, as ADM's evaluator computes them in float16.

    May hold inf or NaN when the features are too large for float16.
    """
    rows16, cols16 = rows.half(), cols.half()
    # Products of float16 values are exact in float32; the sum is accumulated there and rounded once.
    distances = (rows16.float() @ cols16.float().T).half()
    row_norms = float16_squared_norms(rows16).unsqueeze(1)
    col_norms = float16_squared_norms(cols16).unsqueeze(0)
    # ((|u|^2 - 2 u.v) + |v|^2) in float16, one rounding per operation, in place: -2 u.v is rounded as
    # 2 u.v is (it overflows to -inf where 2 u.v does to inf), and |u|^2 + (-2 u.v) as |u|^2 - 2 u.v.
    distances.mul_(-2).add_(row_norms).add_(col_norms)
    return distances.clamp_(min=0)  # clamp keeps NaN, as tf.maximum


def block_distances(rows: torch.Tensor, cols: torch.Tensor, distance_dtype: str = "float16") -> torch.Tensor:
    """Float32 [len(rows), len(cols)] squared distances of one block, in ADM's dtype or in float32.

    float16: the float16 distances, unless one of them is not finite; then the block in float32.
    """
    _check_distance_dtype(distance_dtype)
    if distance_dtype == "float16":
        distances = float16_squared_distances(rows, cols).float()
        # Every value is NaN or in [0, 65504], so the float32 sum is finite exactly when all of them are
        # (it cannot overflow below 5e33 values); one reduction instead of an isfinite pass.
        if bool(torch.isfinite(distances.sum())):
            return distances
    return squared_distances(rows, cols)


def _float16_tree_sum(values: torch.Tensor, start: int) -> torch.Tensor:
    """Row sums of float16 ``values`` [n, m] in Eigen's order; ``start`` (mod 8) is where the rows
    begin on the packet grid, which decides where a long row is split."""
    length = values.shape[1]
    if length <= _PACKET * _TREE_LEAF_PACKETS:
        return _float16_leaf_sum(values)
    middle = start + (length + 1) // 2
    split = -(-middle // _PACKET) * _PACKET  # the first packet boundary at or after the middle
    left = min(split - start, length)
    total = _float16_tree_sum(values[:, :left], start)
    if left < length:
        total = total + _float16_tree_sum(values[:, left:], split)
    return total


def _float16_leaf_sum(values: torch.Tensor) -> torch.Tensor:
    count, length = values.shape
    lanes = values.new_zeros(count, _PACKET)
    done = 0
    if length >= 4 * _PACKET:  # four packet accumulators, each taking every fourth packet
        done = length // (4 * _PACKET) * (4 * _PACKET)
        steps = values[:, :done].reshape(count, -1, 4, _PACKET)
        four = values.new_zeros(count, 4, _PACKET)
        for step in range(steps.shape[1]):
            four = four + steps[:, step]
        lanes = four[:, 0] + four[:, 1]
        lanes = lanes + four[:, 2]
        lanes = lanes + four[:, 3]
    whole = length // _PACKET * _PACKET
    for position in range(done, whole, _PACKET):  # the remaining whole packets
        lanes = lanes + values[:, position : position + _PACKET]
    single = values.new_zeros(count)
    for position in range(whole, length):  # the values after the last whole packet, one by one
        single = single + values[:, position]
    # The 8 lanes are added in float32 (halves, then quarters, then pairs) and rounded once.
    wide = lanes.float()
    pairs = wide[:, :4] + wide[:, 4:]
    lane_sum = ((pairs[:, 0] + pairs[:, 2]) + (pairs[:, 1] + pairs[:, 3])).half()
    return single + lane_sum


def manifold_radii(
    features: torch.Tensor,
    k: int = NEIGHBOURHOOD_SIZE,
    block_size: int = BLOCK_SIZE,
    distance_dtype: str = "float16",
) -> torch.Tensor:
    """Squared distance from each point to its k-th nearest neighbour in the set (itself excluded).

    The point's own row holds its distance to itself (0, or a float16 round-off of 0), so this is
    the (k+1)-th smallest distance of the row, as ADM takes it; the k+1 smallest are kept across
    column blocks.
    """
    _check_distance_dtype(distance_dtype)
    count = len(features)
    if count <= k:
        raise ValueError(f"precision and recall need more than k={k} images on each side, got {count}")
    radii = torch.empty(count, dtype=torch.float32, device=features.device)
    for row in range(0, count, block_size):
        nearest = None
        for col in range(0, count, block_size):
            block = block_distances(
                features[row : row + block_size], features[col : col + block_size], distance_dtype
            )
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
    distance_dtype: str = "float16",
) -> tuple[float, float]:
    """(precision, recall) of ``samples`` against ``reference``, both [n, d] feature rows.

    ``distance_dtype`` "float16" gives ADM's numbers; "float32" computes every distance in float32.
    """
    _check_distance_dtype(distance_dtype)
    reference, samples = _as_features(reference, "reference"), _as_features(samples, "sample")
    samples = samples.to(reference.device)
    if reference.shape[1] != samples.shape[1]:
        raise ValueError(
            f"reference features have {reference.shape[1]} values per image, samples {samples.shape[1]}"
        )
    reference_radii = manifold_radii(reference, k, block_size, distance_dtype)
    sample_radii = manifold_radii(samples, k, block_size, distance_dtype)
    reference_covered = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=reference.device)
    for row in range(0, len(reference), block_size):
        rows = slice(row, row + block_size)
        for col in range(0, len(samples), block_size):
            cols = slice(col, col + block_size)
            distances = block_distances(reference[rows], samples[cols], distance_dtype)
            reference_covered[rows] |= (distances <= sample_radii[cols].unsqueeze(0)).any(dim=1)
            sample_covered[cols] |= (distances <= reference_radii[rows].unsqueeze(1)).any(dim=0)
    precision = sample_covered.double().mean().item()
    recall = reference_covered.double().mean().item()
    return precision, recall


def _check_distance_dtype(distance_dtype: str) -> None:
    if distance_dtype not in DISTANCE_DTYPES:
        raise ValueError(f"unknown distance dtype {distance_dtype!r}; use one of {', '.join(DISTANCE_DTYPES)}")


def _as_features(features, name: str) -> torch.Tensor:
    features = torch.as_tensor(features)
    if features.ndim != 2 or not features.is_floating_point():
        shape = tuple(features.shape)
        raise ValueError(f"{name} features must be a float [n, d] array, got {features.dtype} {shape}")
    return features.float()

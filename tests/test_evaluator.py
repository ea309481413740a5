"""The evaluator's arithmetic and files: Frechet distance, Inception Score, precision/recall, NPZ streams.

Every expected number comes from a closed form or an independent computation (eigenvalues for the
matrix square root, brute-force nearest neighbours, np.load for the files).
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from evaluations import feature_statistics
from evaluations.feature_statistics import (
    FIDStatistics,
    RunningStatistics,
    class_probabilities,
    inception_score,
)
from evaluations.manifold import (
    block_distances,
    float16_squared_distances,
    float16_squared_norms,
    manifold_radii,
    precision_recall,
    squared_distances,
)
from evaluations.npz_stream import NpzImages, read_stored_statistics
from adm_common.files import NpzWriter


def _random_statistics(rng, dim: int, count: int) -> FIDStatistics:
    rows = rng.standard_normal((count, dim)) @ rng.standard_normal((dim, dim)) + rng.standard_normal(dim)
    return FIDStatistics(rows.mean(0), np.cov(rows, rowvar=False))


def _frechet_by_eigenvalues(a: FIDStatistics, b: FIDStatistics, offset: float = 0.0) -> float:
    """tr (S1 S2)^1/2 = sum of sqrt(eigenvalues of S1^1/2 S2 S1^1/2), a symmetric PSD matrix."""
    s1 = a.sigma + offset * np.eye(len(a.mu))
    s2 = b.sigma + offset * np.eye(len(a.mu))
    values, vectors = linalg.eigh(s1)
    root = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    trace_root = np.sqrt(np.clip(linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_root)


# --- Frechet distance ------------------------------------------------------------------------------


def test_frechet_distance_of_identical_statistics_is_zero():
    stats = _random_statistics(np.random.default_rng(0), 32, 200)
    assert abs(stats.frechet_distance(stats)) < 1e-9 * np.trace(stats.sigma)


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0, 3.0]), np.array([1.0, 1.0, 0.5, -1.0])
    var1, var2 = np.array([1.0, 4.0, 0.25, 9.0]), np.array([4.0, 1.0, 1.0, 2.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    got = FIDStatistics(mu1, np.diag(var1)).frechet_distance(FIDStatistics(mu2, np.diag(var2)))
    assert got == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_an_eigenvalue_computation():
    rng = np.random.default_rng(1)
    a, b = _random_statistics(rng, 48, 300), _random_statistics(rng, 48, 250)
    assert a.frechet_distance(b) == pytest.approx(_frechet_by_eigenvalues(a, b), rel=1e-9)
    assert a.frechet_distance(b) == pytest.approx(b.frechet_distance(a), rel=1e-9)


def test_singular_covariance_product_keeps_its_square_root():
    # An exactly singular product (a direction with zero variance on both sides) still has a finite
    # square root: ADM adds no offset then, and SciPy's singular-matrix warning is not passed on.
    a = FIDStatistics(np.zeros(3), np.diag([1.0, 0.0, 4.0]))
    b = FIDStatistics(np.ones(3), np.diag([2.0, 0.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither LinAlgWarning nor a deprecation of sqrtm's disp
        got = a.frechet_distance(b)
    assert got == pytest.approx(3 + (1 - np.sqrt(2)) ** 2 + (2 - 1) ** 2, rel=1e-12)  # sum (sqrt v1 - sqrt v2)^2
    assert got != pytest.approx(_frechet_by_eigenvalues(a, b, offset=1e-6), rel=1e-9)  # an offset would show


def test_fewer_images_than_features_keep_the_square_root():
    # Rank-deficient covariances (10 images, 16 features), as on any sample batch under 2048 images.
    rng = np.random.default_rng(3)
    a, b = _random_statistics(rng, 16, 10), _random_statistics(rng, 16, 12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = a.frechet_distance(b)
    assert got == pytest.approx(_frechet_by_eigenvalues(a, b), rel=1e-7)
    assert got != pytest.approx(_frechet_by_eigenvalues(a, b, offset=1e-6), rel=1e-7)


def test_non_finite_square_root_gets_the_diagonal_offset():
    # S1 S2 = [[0, 1], [0, 0]] has no square root (SciPy returns inf), so ADM adds eps = 1e-6 to both
    # diagonals: ((S1 + eps)(S2 + eps))^1/2 = [[r, (1 + eps) / 2r], [0, r]] with r^2 = eps (1 + eps).
    eps = 1e-6
    a = FIDStatistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]]))
    b = FIDStatistics(np.array([1.0, 2.0]), np.eye(2))
    with pytest.warns(UserWarning, match="not finite; adding 1e-06 to the diagonal"):
        got = a.frechet_distance(b)
    assert got == pytest.approx(5 + 0 + 2 - 2 * 2 * np.sqrt(eps * (1 + eps)), rel=1e-12)


def _sqrtm_of_scipy_1_17(real_sqrtm):
    """SciPy <= 1.17: ``disp`` accepted (deprecated in 1.16), a LinAlgWarning for singular input."""

    def sqrtm(matrix, disp=True):
        if np.linalg.matrix_rank(matrix) < len(matrix):
            warnings.warn("Matrix is singular.", linalg.LinAlgWarning, stacklevel=2)
        root = real_sqrtm(matrix)
        return root if disp else (root, 0.0)

    return sqrtm


def _sqrtm_of_scipy_1_18(real_sqrtm):
    """SciPy 1.18: no ``disp`` any more."""

    def sqrtm(matrix):
        return real_sqrtm(matrix)

    return sqrtm


@pytest.mark.parametrize("version", [_sqrtm_of_scipy_1_17, _sqrtm_of_scipy_1_18])
def test_frechet_distance_is_the_same_before_and_after_scipy_1_18(version, monkeypatch):
    real_sqrtm = feature_statistics.linalg.sqrtm
    calls = []

    def recording(matrix, *args, **kwargs):
        calls.append((args, kwargs))
        return version(real_sqrtm)(matrix, *args, **kwargs)

    monkeypatch.setattr(feature_statistics.linalg, "sqrtm", recording)
    singular = (
        FIDStatistics(np.zeros(3), np.diag([1.0, 0.0, 4.0])),
        FIDStatistics(np.ones(3), np.diag([2.0, 0.0, 1.0])),
    )
    rng = np.random.default_rng(6)
    regular = (_random_statistics(rng, 12, 40), _random_statistics(rng, 12, 50))
    no_root = (FIDStatistics(np.zeros(2), np.array([[0.0, 1.0], [0.0, 0.0]])), FIDStatistics(np.zeros(2), np.eye(2)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert singular[0].frechet_distance(singular[1]) == pytest.approx(3 + (1 - np.sqrt(2)) ** 2 + 1, rel=1e-12)
        assert regular[0].frechet_distance(regular[1]) == pytest.approx(_frechet_by_eigenvalues(*regular), rel=1e-9)
    with pytest.warns(UserWarning, match="adding 1e-06"):
        assert no_root[0].frechet_distance(no_root[1]) == pytest.approx(2 - 4 * np.sqrt(1e-6 * (1 + 1e-6)), rel=1e-12)
    assert len(calls) == 4 and all(call == ((), {}) for call in calls)  # sqrtm(matrix) alone, on any SciPy


def test_statistics_reject_bad_shapes_and_values():
    with pytest.raises(ValueError, match=r"mu \[d\] and sigma \[d, d\]"):
        FIDStatistics(np.zeros(3), np.eye(4))
    with pytest.raises(ValueError, match=r"mu \[d\] and sigma \[d, d\]"):
        FIDStatistics(np.zeros((3, 1)), np.eye(3))
    with pytest.raises(ValueError, match="NaN or infinite"):
        FIDStatistics(np.array([0.0, np.nan]), np.eye(2))
    with pytest.raises(ValueError, match="cannot compare statistics of 2 and 3 features"):
        FIDStatistics(np.zeros(2), np.eye(2)).frechet_distance(FIDStatistics(np.zeros(3), np.eye(3)))
    with pytest.raises(ValueError, match="imaginary part"):  # not a covariance: negative variance
        FIDStatistics(np.zeros(2), np.diag([1.0, -1.0])).frechet_distance(FIDStatistics(np.zeros(2), np.eye(2)))


def test_running_statistics_equal_numpy_over_all_rows():
    rows = np.random.default_rng(2).standard_normal((103, 7)).astype(np.float32) * 3 + 100
    running = RunningStatistics()
    for start, stop in ((0, 1), (1, 40), (40, 40), (40, 103)):  # uneven, a single row, an empty batch
        running.add(rows[start:stop])
    stats = running.statistics()
    np.testing.assert_allclose(stats.mu, rows.astype(np.float64).mean(0), rtol=1e-13)
    np.testing.assert_allclose(stats.sigma, np.cov(rows.astype(np.float64), rowvar=False), rtol=1e-9, atol=1e-12)
    one = RunningStatistics()
    one.add(rows[:1])
    with pytest.raises(ValueError, match="at least 2 images, got 1"):
        one.statistics()
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        one.add(rows[0])


# --- Inception Score -------------------------------------------------------------------------------


def test_inception_score_of_known_predictions():
    eye = np.eye(8)
    assert inception_score(np.tile(eye, (5, 1))) == pytest.approx(8.0, rel=1e-12)  # confident, all classes
    assert inception_score(np.tile(eye[2], (40, 1))) == pytest.approx(1.0, rel=1e-12)  # one class only
    assert inception_score(np.full((10, 8), 1 / 8)) == pytest.approx(1.0, rel=1e-12)  # unsure
    a = 0.8  # half the rows [a, 1-a], half [1-a, a]: marginal [1/2, 1/2]
    rows = np.array([[a, 1 - a], [1 - a, a]] * 6)
    expected = np.exp(a * np.log(2 * a) + (1 - a) * np.log(2 * (1 - a)))
    assert inception_score(rows) == pytest.approx(expected, rel=1e-12)


def test_inception_score_averages_over_splits():
    # First split of 4: one-hot over 4 classes (score 4); second: one class (score 1).
    probs = np.concatenate([np.eye(4), np.tile(np.eye(4)[0], (4, 1))])
    assert inception_score(probs, split_size=4) == pytest.approx(2.5, rel=1e-12)
    # One split of 8: marginal [5/8, 1/8, 1/8, 1/8]; rows of class 0 (5 of them) add log(8/5), others log 8.
    expected = np.exp((5 * np.log(8 / 5) + 3 * np.log(8)) / 8)
    assert inception_score(probs, split_size=8) == pytest.approx(expected, rel=1e-12)


def test_class_probabilities_are_the_softmax_of_pool_times_weights():
    rng = np.random.default_rng(3)
    pool, weights = rng.random((5, 6)).astype(np.float32), rng.standard_normal((6, 4)).astype(np.float32)
    logits = pool.astype(np.float64) @ weights.astype(np.float64)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(class_probabilities(pool, weights), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="do not fit softmax weights"):
        class_probabilities(pool, weights[:5])


def test_inception_score_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty"):
        inception_score(np.zeros((0, 4)))
    with pytest.raises(ValueError, match="non-empty"):
        inception_score(np.ones(4) / 4)
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(np.ones((3, 4)))
    with pytest.raises(ValueError, match="non-negative"):
        inception_score(np.array([[1.5, -0.5]]))


# --- precision and recall --------------------------------------------------------------------------

LINE = np.stack([np.arange(10.0), np.zeros(10)], axis=1)  # reference points 0..9 on the x axis


def test_radii_reach_the_third_nearest_neighbour():
    radii = manifold_radii(torch.tensor(LINE, dtype=torch.float32)).numpy()
    # Ends: neighbours at 1, 2, 3 -> 3^2; inside: two at 1, two at 2 -> 2^2 (squared distances).
    np.testing.assert_array_equal(radii, [9, 4, 4, 4, 4, 4, 4, 4, 4, 9])
    np.testing.assert_array_equal(manifold_radii(torch.tensor(LINE, dtype=torch.float32), block_size=3), radii)


def test_precision_counts_samples_inside_any_reference_ball():
    samples = np.array([[-3.0, 0.0], [-3.25, 0.0], [12.0, 0.0], [4.5, 1.75], [4.5, 2.0], [50.0, 50.0]])
    # (-3, 0) lies on the surface of point 0's ball (inside); (4.5, 1.75) is 0.25 + 3.06 < 4 from 4
    # and 5; (4.5, 2) is 4.25 away: outside, as are (-3.25, 0) and the far point.
    precision, recall = precision_recall(LINE, samples)
    assert precision == pytest.approx(3 / 6)
    sample_radii = np.sort(cdist(samples, samples, "sqeuclidean"), axis=1)[:, 3]
    expected_recall = np.mean((cdist(LINE, samples, "sqeuclidean") <= sample_radii).any(axis=1))
    assert recall == pytest.approx(expected_recall)


def test_precision_recall_of_identical_and_of_far_sets():
    assert precision_recall(LINE, LINE.copy()) == (1.0, 1.0)
    assert precision_recall(LINE, LINE + 100) == (0.0, 0.0)


def test_float32_precision_recall_match_brute_force_in_any_block_size():
    rng = np.random.default_rng(4)
    reference = rng.standard_normal((60, 5)).astype(np.float32)
    samples = (rng.standard_normal((45, 5)) * 1.3 + 0.4).astype(np.float32)
    cross = cdist(reference.astype(np.float64), samples.astype(np.float64), "sqeuclidean")

    def radii(x):
        return np.sort(cdist(x, x, "sqeuclidean"), axis=1)[:, 3]

    expected = (
        np.mean((cross <= radii(reference.astype(np.float64))[:, None]).any(axis=0)),
        np.mean((cross <= radii(samples.astype(np.float64))[None, :]).any(axis=1)),
    )
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    for block_size in (10000, 7):
        got = precision_recall(reference, samples, block_size=block_size, distance_dtype="float32")
        assert got == pytest.approx(expected)


def test_precision_recall_reject_bad_input():
    with pytest.raises(ValueError, match="more than k=3 images on each side, got 3"):
        precision_recall(LINE, LINE[:3])
    with pytest.raises(ValueError, match="reference features have 2 values per image, samples 3"):
        precision_recall(LINE, np.zeros((5, 3)))
    with pytest.raises(ValueError, match=r"float \[n, d\]"):
        precision_recall(LINE.astype(np.int64), LINE)
    with pytest.raises(ValueError, match=r"float \[n, d\]"):
        precision_recall(LINE, np.zeros(10))
    with pytest.raises(ValueError, match="unknown distance dtype 'float64'; use one of float16, float32"):
        precision_recall(LINE, LINE, distance_dtype="float64")


# --- ADM's float16 distances -------------------------------------------------------------------------


def test_float16_norms_sum_in_tensorflows_order():
    # 4096 ones: Eigen splits the row into leaves of 1024, each summed by 32 float16 lanes of 32
    # values: exact. One float16 accumulator would stop at 2048 (2048 + 1 rounds to 2048).
    assert float16_squared_norms(torch.ones(1, 4096)).item() == 4096
    # 1 and 2047 squares of 2^-12, 2048 values: the left leaf's lane holding the 1 absorbs its other
    # 31 values (1 + 2^-12 rounds to 1); the other 31 lanes hold 32 * 2^-12 = 2^-7 each, and the
    # right leaf 1024 * 2^-12 = 1/4: 1 + 31/128 + 1/4 = 1.4921875, not the 1.49976 of exact sums.
    row = torch.full((1, 2048), 2.0**-6)
    row[0, 0] = 1.0
    assert float16_squared_norms(row).item() == 1.4921875
    # 7 values, fewer than a packet: one float16 accumulator, 2048 + 1 + 1 + ... rounds each time.
    assert float16_squared_norms(torch.tensor([[2048.0**0.5] + [1.0] * 6])).item() == 2048
    assert squared_distances(torch.tensor([[2048.0**0.5] + [1.0] * 6]), torch.zeros(1, 7)).item() == 2054


def test_float16_distances_put_a_rounded_sample_on_a_ball_surface():
    # (4, 2.0005) is 4.002 from the reference point (4, 0), whose ball has radius 4 (squared):
    # outside in float32; in float16 the point is (4, 2), exactly on the surface, so inside.
    samples = np.array([[4.0, 2.0005], [20.0, 20.0], [21.0, 20.0], [20.0, 21.0]])
    assert precision_recall(LINE, samples, distance_dtype="float32") == (0.0, 1.0)
    assert precision_recall(LINE, samples) == (0.25, 1.0)


def test_a_block_with_a_non_finite_float16_distance_is_computed_in_float32():
    rng = np.random.default_rng(7)
    small = torch.from_numpy(rng.uniform(0, 3, (6, 16)).astype(np.float32))
    huge = small.clone()
    huge[2, 0] = 300.0  # 300^2 = 90000: beyond float16's 65504
    assert not torch.isfinite(float16_squared_distances(huge, small)).all()
    in_float16 = block_distances(small, small)
    assert torch.equal(in_float16, float16_squared_distances(small, small).float())
    assert not torch.equal(in_float16, squared_distances(small, small))  # the two dtypes differ here
    assert torch.equal(block_distances(huge, small), squared_distances(huge, small))
    assert torch.equal(block_distances(small, small, "float32"), squared_distances(small, small))
    # Each block decides for itself: with blocks of 3 rows, only those that meet row 2 are float32.
    features = torch.cat([huge, small])
    radii = manifold_radii(features, block_size=3)
    for start in range(0, 12, 3):
        rows = features[start : start + 3]
        row_blocks = [block_distances(rows, features[col : col + 3]) for col in range(0, 12, 3)]
        expected = torch.cat(row_blocks, dim=1).kthvalue(4, dim=1).values
        assert torch.equal(radii[start : start + 3], expected)
    assert not torch.equal(radii[3:6], manifold_radii(features, block_size=12)[3:6])


def _adm_distances_in_tensorflow(tf, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ADM's distance block run by TensorFlow: float16 unless a value is not finite, then float32."""

    def distances(a, b):
        norms_a = tf.reshape(tf.reduce_sum(tf.square(a), axis=1), [-1, 1])
        norms_b = tf.reshape(tf.reduce_sum(tf.square(b), axis=1), [1, -1])
        return tf.maximum(norms_a - 2 * tf.matmul(a, b, transpose_b=True) + norms_b, 0.0)

    half = distances(tf.cast(u, tf.float16), tf.cast(v, tf.float16))
    if bool(tf.reduce_all(tf.math.is_finite(half))):
        return tf.cast(half, tf.float32).numpy()
    return distances(tf.constant(u), tf.constant(v)).numpy()


@pytest.mark.parametrize("dim", [7, 48, 2048, 3001])
def test_float16_norms_and_distances_match_tensorflow(dim):
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install tensorflow-cpu)")
    rng = np.random.default_rng(dim)
    u = (np.abs(rng.standard_normal((40, dim))) * rng.uniform(0.05, 24 / np.sqrt(dim), (40, 1))).astype(np.float32)
    v = (np.abs(rng.standard_normal((30, dim))) * rng.uniform(0.05, 24 / np.sqrt(dim), (30, 1))).astype(np.float32)
    expected_norms = tf.reduce_sum(tf.square(tf.cast(u, tf.float16)), axis=1).numpy()
    np.testing.assert_array_equal(float16_squared_norms(torch.from_numpy(u)).numpy(), expected_norms)
    expected = _adm_distances_in_tensorflow(tf, u, v)
    got = float16_squared_distances(torch.from_numpy(u), torch.from_numpy(v)).float().numpy()
    # TensorFlow accumulates u.v in float32 in an order of its own: rarely, one float16 step apart.
    step = np.spacing(expected.astype(np.float16)).astype(np.float32) * 2
    assert np.mean(got == expected) > 0.99 and np.all(np.abs(got - expected) <= step)
    assert not np.array_equal(expected, squared_distances(torch.from_numpy(u), torch.from_numpy(v)).numpy())


def test_float16_distance_is_zero_where_two_products_overflow():
    # |u|^2 = 64 * 24^2 = 36864, |v|^2 = 32004 and u.v = 33984 fit in float16, but 2 u.v = 67968
    # does not: it is inf, so |u|^2 - 2 u.v is -inf, clamped to 0 (not NaN, so the block stays in
    # float16), where the exact squared distance is 16 * 7.5^2 = 900.
    u = np.full((1, 64), 24.0, np.float32)
    v = u.copy()
    v[0, 48:] = 16.5
    with np.errstate(over="ignore"):
        u16, v16 = u.astype(np.float16), v.astype(np.float16)
        norms_u, norms_v = (u16 * u16).sum(1, keepdims=True), (v16 * v16).sum(1)
        by_numpy = np.maximum((norms_u - np.float16(2) * (u16 @ v16.T)) + norms_v, np.float16(0))
    assert by_numpy[0, 0] == 0
    got = block_distances(torch.from_numpy(u), torch.from_numpy(v))
    assert got.dtype == torch.float32 and got.item() == 0.0
    assert squared_distances(torch.from_numpy(u), torch.from_numpy(v)).item() == 900.0
    if importlib.util.find_spec("tensorflow") is not None:
        import tensorflow as tf

        assert _adm_distances_in_tensorflow(tf, u, v)[0, 0] == 0.0


def test_float16_precision_recall_match_adms_arithmetic_in_tensorflow():
    # 64 features on a 1/16 grid below 8: every product and partial sum of u.v is a multiple of
    # 2^-8 below 2^12, exact in float32, so TensorFlow's order of accumulation cannot matter.
    tf = pytest.importorskip("tensorflow", reason="TensorFlow is not installed (pip install tensorflow-cpu)")
    rng = np.random.default_rng(9)
    reference = (np.round(rng.uniform(0, 8, (70, 64)) * 16) / 16).astype(np.float32)
    samples = (np.round(np.clip(rng.normal(4.4, 2.24, (55, 64)), 0, 8 - 1 / 16) * 16) / 16).astype(np.float32)
    reference_radii = np.partition(_adm_distances_in_tensorflow(tf, reference, reference), 3, axis=1)[:, 3]
    sample_radii = np.partition(_adm_distances_in_tensorflow(tf, samples, samples), 3, axis=1)[:, 3]
    cross = _adm_distances_in_tensorflow(tf, reference, samples)
    expected = (
        np.mean((cross <= reference_radii[:, None]).any(axis=0)),
        np.mean((cross <= sample_radii[None, :]).any(axis=1)),
    )
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    np.testing.assert_array_equal(manifold_radii(torch.from_numpy(reference)).numpy(), reference_radii)
    for block_size in (10000, 16):
        assert precision_recall(reference, samples, block_size=block_size) == expected
    assert precision_recall(reference, samples, distance_dtype="float32") != expected  # float16 shows


# --- NPZ files, a batch at a time ------------------------------------------------------------------


def _images(count=10, size=8):
    return np.random.default_rng(5).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_stream_in_batches(save, tmp_path):
    images = _images()
    save(tmp_path / "batch.npz", images, np.arange(10))
    with NpzImages(tmp_path / "batch.npz") as reader:
        assert len(reader) == 10 and reader.shape == (10, 8, 8, 3)
        batches = list(reader.batches(4))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert all(b.flags.writeable and b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), images)


def test_npz_images_reject_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        NpzImages(tmp_path / "none.npz")
    (tmp_path / "text.npz").write_text("hello")
    with pytest.raises(ValueError, match="not an .npz file"):
        NpzImages(tmp_path / "text.npz")
    cases = {
        "labels": ({"arr_1": np.arange(3)}, "has no arr_0"),
        "float": ({"arr_0": _images().astype(np.float32)}, "must be uint8"),
        "gray": ({"arr_0": _images()[..., 0]}, r"\[N, height, width, 3\]"),
        "rgba": ({"arr_0": np.zeros((2, 4, 4, 4), np.uint8)}, r"\[N, height, width, 3\]"),
        "empty": ({"arr_0": np.zeros((0, 4, 4, 3), np.uint8)}, "empty"),
        "fortran": ({"arr_0": np.asfortranarray(_images())}, "Fortran order"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ValueError, match=message):
            NpzImages(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "ok.npz", _images())
    with NpzImages(tmp_path / "ok.npz") as reader, pytest.raises(ValueError, match="at least 1"):
        next(reader.batches(0))


def test_stored_statistics_all_or_nothing(tmp_path):
    np.savez(tmp_path / "plain.npz", _images())
    assert read_stored_statistics(tmp_path / "plain.npz") is None
    mu, sigma = np.arange(3.0), np.diag([1.0, 2.0, 3.0])
    np.savez(tmp_path / "ref.npz", _images(), mu=mu, sigma=sigma, mu_s=mu[:2], sigma_s=sigma[:2, :2])
    pool, spatial = read_stored_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(pool.sigma, sigma)
    np.testing.assert_array_equal(spatial.mu, mu[:2])
    np.savez(tmp_path / "part.npz", _images(), mu=mu, sigma=sigma)
    with pytest.raises(ValueError, match="holds mu, sigma but not mu_s, sigma_s"):
        read_stored_statistics(tmp_path / "part.npz")
    np.savez(tmp_path / "bad.npz", _images(), mu=mu, sigma=sigma, mu_s=mu, sigma_s=sigma[:2])
    with pytest.raises(ValueError, match=r"bad.npz: stored statistics need mu \[d\]"):
        read_stored_statistics(tmp_path / "bad.npz")


def test_npz_writer_streams_and_leaves_nothing_on_failure(tmp_path):
    images, mu = _images(7), np.linspace(0, 1, 5)
    with NpzWriter(tmp_path / "out.npz") as writer:
        seen = list(writer.add_streamed("arr_0", images.shape, np.uint8, (images[:3], images[3:])))
        writer.add("mu", mu)
    assert [len(b) for b in seen] == [3, 4]
    with np.load(tmp_path / "out.npz") as data:
        np.testing.assert_array_equal(data["arr_0"], images)
        np.testing.assert_array_equal(data["mu"], mu)
    with pytest.raises(ValueError, match="wrote 3 rows, the header promised 7"):
        with NpzWriter(tmp_path / "short.npz") as writer:
            list(writer.add_streamed("arr_0", images.shape, np.uint8, [images[:3]]))
    with pytest.raises(ValueError, match="does not fit array"):
        with NpzWriter(tmp_path / "wrong.npz") as writer:
            list(writer.add_streamed("arr_0", images.shape, np.uint8, [images[:, :4]]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_npz_writer_gives_the_same_bytes_for_the_same_arrays(tmp_path, monkeypatch):
    images = _images(5)
    for name, clock in (("a.npz", 1.0e9), ("b.npz", 1.7e9)):  # 2001 and 2023: zip would stamp both
        monkeypatch.setattr("time.time", lambda clock=clock: clock)
        with NpzWriter(tmp_path / name) as writer:
            list(writer.add_streamed("arr_0", images.shape, np.uint8, [images]))
            writer.add("arr_1", np.arange(5))
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()

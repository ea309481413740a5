"""Statistics of Inception features: mean and covariance, Frechet distance, Inception Score."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy import linalg, special


@dataclass
class FIDStatistics:
    mu: np.ndarray  # [d] mean feature
    sigma: np.ndarray  # [d, d] covariance (n - 1 normalisation, as np.cov)

    def __post_init__(self):
        self.mu = np.asarray(self.mu, dtype=np.float64)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.mu.ndim != 1 or self.sigma.shape != (self.mu.size, self.mu.size):
            raise ValueError(
                f"statistics need mu [d] and sigma [d, d], got mu {self.mu.shape} and sigma {self.sigma.shape}"
            )
        if not (np.isfinite(self.mu).all() and np.isfinite(self.sigma).all()):
            raise ValueError("statistics hold NaN or infinite values")

    def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
        return frechet_distance(self, other, eps)


def frechet_distance(first: FIDStatistics, second: FIDStatistics, eps: float = 1e-6) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^1/2), as ADM computes it.

    As ADM, ``eps`` is added to the diagonal of both covariances only when SciPy's square root of
    the product is not finite. A product that is merely singular (fewer images than features, or
    features of low rank) keeps its square root, and SciPy's warning about it is not shown.
    """
    if first.mu.shape != second.mu.shape:
        raise ValueError(
            f"cannot compare statistics of {first.mu.size} and {second.mu.size} features; "
            "make both with the same Inception graph"
        )
    diff = first.mu - second.mu
    covmean = matrix_sqrt(first.sigma @ second.sigma)
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"the square root of the covariance product is not finite; adding {eps} to the diagonal of both covariances"
        )
        offset = np.eye(first.mu.size) * eps
        covmean = matrix_sqrt((first.sigma + offset) @ (second.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"the square root of the covariance product has an imaginary part of "
                f"{np.max(np.abs(covmean.imag)):.3g}; are both covariances positive semi-definite?"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(first.sigma) + np.trace(second.sigma) - 2 * np.trace(covmean))


def matrix_sqrt(matrix: np.ndarray) -> np.ndarray:
    """scipy.linalg.sqrtm(matrix): the matrix ADM's ``sqrtm(..., disp=False)[0]`` is, on any SciPy.

    ``disp`` is never passed (SciPy 1.16 deprecates it and 1.18 removes it): in every SciPy that has
    it, it only decides whether an error estimate comes back beside the same matrix. SciPy's warning
    that the matrix is singular or ill-conditioned is suppressed: finiteness is checked by the
    caller, as ADM checks it.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(matrix)


class RunningStatistics:
    """Mean and covariance of feature rows added batch by batch, without keeping the rows.

    Batches are merged with the pairwise update of Chan, Golub and LeVeque in float64, so the
    result equals np.mean and np.cov(rowvar=False) of all rows to round-off.
    """

    def __init__(self):
        self.count = 0
        self.mean = None
        self.scatter = None  # sum of outer products of the centred rows

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if rows.ndim != 2:
            raise ValueError(f"feature rows must be [n, d], got shape {rows.shape}")
        if len(rows) == 0:
            return
        batch_mean = rows.mean(axis=0)
        centred = rows - batch_mean
        batch_scatter = centred.T @ centred
        if self.count == 0:
            self.count, self.mean, self.scatter = len(rows), batch_mean, batch_scatter
            return
        total = self.count + len(rows)
        delta = batch_mean - self.mean
        self.scatter += batch_scatter + np.outer(delta, delta) * (self.count * len(rows) / total)
        self.mean += delta * (len(rows) / total)
        self.count = total

    def statistics(self) -> FIDStatistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 images, got {self.count}")
        return FIDStatistics(self.mean.copy(), self.scatter / (self.count - 1))


def class_probabilities(pool_features: np.ndarray, softmax_weights: np.ndarray) -> np.ndarray:
    """softmax(pool_3 @ W) in float32, as ADM computes it (the graph's logits bias is not added)."""
    pool_features = np.asarray(pool_features, dtype=np.float32)
    softmax_weights = np.asarray(softmax_weights, dtype=np.float32)
    if pool_features.ndim != 2 or pool_features.shape[1] != softmax_weights.shape[0]:
        raise ValueError(
            f"pool features {pool_features.shape} do not fit softmax weights {softmax_weights.shape}"
        )
    return special.softmax(pool_features @ softmax_weights, axis=1)


def inception_score(probabilities: np.ndarray, split_size: int = 5000) -> float:
    """Mean over splits of exp(E_x KL(p(y|x) || p(y))), p(y) being the split's mean prediction."""
    probabilities = np.asarray(probabilities)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError(f"class probabilities must be a non-empty [n, classes] array, got {probabilities.shape}")
    if probabilities.min() < 0 or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("class probabilities must be non-negative rows that sum to 1")
    scores = []
    for start in range(0, len(probabilities), split_size):
        part = probabilities[start : start + split_size].astype(np.float64)
        marginal = part.mean(axis=0, keepdims=True)
        kl = special.xlogy(part, part) - special.xlogy(part, marginal)  # 0 log 0 = 0
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))

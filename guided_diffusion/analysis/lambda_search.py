"""Choosing lambda: a coarse-to-fine search on a sample metric, and a calibration that needs none.

Search: ``LambdaSearch`` evaluates ``metric(schedule, seed)`` (FID of n samples, say) on a grid of
uniform lambdas b, or of linear (k, b), then on a finer grid around the best point, for a few
rounds. Each finer grid holds the best point and its neighbours of the grid before, which are
not evaluated again. Every value goes to an ``EvaluationCache`` (a JSON file keyed by schedule
string and seed, rewritten atomically after each evaluation), so an interrupted search resumes
where it stopped and a repeated one costs nothing. Each schedule is evaluated for every seed;
the best is the best mean, reported with the standard deviation over seeds.

Calibration (``calibrate_eps_scale``): sample N chains from forward-noised data and, at each
step t in sampling order, set lambda_t = mean ||eps(x_t)|| over the chains / mean ||eps||
over forward-noised data at t, then take the step with that lambda; the table of lambda_t is
then fitted with a uniform b and a linear k t + b. It needs a few hundred data images and no
metric network. It only matches norms: an error of the network that is the same at every
input (predictions 5% too large, say) is in both norms and cancels, and what is left is the
spread of x_t. On Gaussian data that moves the spread of the samples further from the data's,
the opposite of what a metric search finds (tests/test_lambda_search.py shows both). Compare it
with a search before trusting it.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from guided_diffusion.eps_scaling import EpsScale, EpsScaleError
from guided_diffusion.analysis.seed_stats import mean_std
from guided_diffusion.analysis.exposure_bias import ChainRun, run_chains
from adm_common.files import atomic_write_figure, atomic_write_text

# metric(schedule, seed) -> value
Metric = Callable[[EpsScale, int], float]

B_DECIMALS = 6  # grid points are rounded so that the same point always gets the same cache key
K_DECIMALS = 8


# ---------------------------------------------------------------------------------------------
# Cache


class EvaluationCache:
    """Metric values by (schedule string, seed) in a JSON file, rewritten atomically on every put.

    ``context`` names what the values depend on besides the schedule and seed (model, steps,
    number of samples, metric, ...); a file made with another context is refused.
    """

    def __init__(self, path, context: dict | None = None):
        self.path = Path(path)
        self.context = json.loads(json.dumps(context or {}, default=str))
        self.values: dict[str, float] = {}
        if self.path.exists():
            try:
                stored = json.loads(self.path.read_text())
                earlier, values = stored["context"], stored["values"]
            except (ValueError, KeyError, TypeError):
                raise ValueError(
                    f"{self.path} is not a search cache (unreadable JSON); delete it or pass another --cache"
                ) from None
            if earlier != self.context:
                differing = sorted(k for k in set(earlier) | set(self.context) if earlier.get(k) != self.context.get(k))
                raise ValueError(
                    f"{self.path} holds values for other settings (differing: {', '.join(differing[:5])}); "
                    "pass another --cache or delete it"
                )
            self.values = {str(k): float(v) for k, v in values.items()}
        elif not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} for the search cache does not exist")

    @staticmethod
    def key(schedule: EpsScale, seed: int) -> str:
        return f"{schedule}|seed={int(seed)}"

    def get(self, schedule: EpsScale, seed: int) -> float | None:
        return self.values.get(self.key(schedule, seed))

    def put(self, schedule: EpsScale, seed: int, value: float) -> None:
        self.values[self.key(schedule, seed)] = float(value)
        record = {"context": self.context, "values": self.values}
        atomic_write_text(self.path, json.dumps(record, indent=1, sort_keys=True) + "\n")

    def __len__(self) -> int:
        return len(self.values)


# ---------------------------------------------------------------------------------------------
# Search


@dataclass
class Candidate:
    """One schedule and its metric value for each seed."""

    schedule: EpsScale
    values: list[float]

    @property
    def mean(self) -> float:
        return mean_std(self.values)[0]

    @property
    def std(self) -> float:
        """Standard deviation over seeds (n - 1 normalisation; 0 for one seed)."""
        return mean_std(self.values)[1]

    def to_dict(self) -> dict:
        linear = self.schedule.table is None
        return {"eps_scale": str(self.schedule), "b": self.schedule.b if linear else None,
                "k": self.schedule.k if linear else None, "mean": self.mean, "std": self.std,
                "values": list(self.values)}


@dataclass
class SearchResult:
    family: str  # "uniform" or "linear"
    best: Candidate
    candidates: list[Candidate]  # every schedule evaluated in this search, in evaluation order
    rounds: list[dict] = field(default_factory=list)  # the ranges of each round

    def to_dict(self) -> dict:
        return {"family": self.family, "best": self.best.to_dict(), "rounds": self.rounds,
                "candidates": [c.to_dict() for c in self.candidates]}


def _grid(center: float, half_width: float, points: int, decimals: int) -> list[float]:
    return [round(center + half_width * (2 * i / (points - 1) - 1), decimals) for i in range(points)]


class LambdaSearch:
    """Coarse-to-fine search of lambda schedules that optimise ``metric(schedule, seed)``.

    :param seeds: every schedule is evaluated once per seed; mean and std go into the result.
    :param cache: an EvaluationCache, or None to keep values in memory only.
    :param minimize: True for FID-like metrics, False for Inception Score, precision, recall.
    :param num_steps: the sampling chain's length; schedules with lambda <= 0 on it are skipped.
    """

    def __init__(self, metric: Metric, seeds: Sequence[int] = (0,), cache: EvaluationCache | None = None,
                 minimize: bool = True, num_steps: int | None = None, progress: bool = False):
        if len(seeds) == 0:
            raise ValueError("give at least one seed")
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"seeds must differ, got {list(seeds)}")
        self.metric = metric
        self.seeds = [int(s) for s in seeds]
        self.cache = cache
        self.minimize = minimize
        self.num_steps = num_steps
        self.progress = progress
        self.calls = 0  # metric evaluations made by this object (cache hits not counted)
        self._memory: dict[str, float] = {}

    def evaluate(self, schedule: EpsScale) -> Candidate:
        values = []
        for seed in self.seeds:
            key = EvaluationCache.key(schedule, seed)
            value = self.cache.get(schedule, seed) if self.cache is not None else self._memory.get(key)
            if value is None:
                value = float(self.metric(schedule, seed))
                self.calls += 1
                if not math.isfinite(value):
                    raise ValueError(f"the metric is {value} for eps_scale {schedule}, seed {seed}; "
                                     "narrow the lambda range")
                if self.cache is not None:
                    self.cache.put(schedule, seed, value)
                self._memory[key] = value
            values.append(value)
        return Candidate(schedule, values)

    def _schedule(self, params: dict) -> EpsScale | None:
        """The schedule of these parameters, or None where it gives lambda <= 0 on the chain."""
        try:
            schedule = EpsScale(**params)
            if self.num_steps is not None:
                schedule.validate(self.num_steps)
        except EpsScaleError:
            return None
        return schedule

    def _run(self, family: str, names: tuple, ranges: list, decimals: list, grid: int, rounds: int):
        from tqdm.auto import tqdm

        if grid < 3 or grid % 2 == 0:
            raise ValueError(f"grid must be an odd number >= 3 (a finer grid then keeps the best point), got {grid}")
        if rounds < 1:
            raise ValueError(f"rounds must be at least 1, got {rounds}")
        for name, (lo, hi) in zip(names, ranges):
            if not lo < hi:
                raise ValueError(f"the {name} range needs low < high, got {lo}, {hi}")
        centers = [(lo + hi) / 2 for lo, hi in ranges]
        halves = [(hi - lo) / 2 for lo, hi in ranges]
        evaluated: list[tuple[tuple, Candidate]] = []
        record = []
        for r in range(rounds):
            axes = [_grid(c, h, grid, d) for c, h, d in zip(centers, halves, decimals)]
            spacing = [2 * h / (grid - 1) for h in halves]
            record.append({"round": r + 1, **{name: [axis[0], axis[-1]] for name, axis in zip(names, axes)}})
            points = list(itertools.product(*axes))
            for point in tqdm(points, desc=f"{family} search, round {r + 1}/{rounds}", disable=not self.progress,
                              leave=False):
                # a point of an earlier grid may differ from this one in the last rounded digit
                if any(all(abs(p - q) <= 1e-3 * s for p, q, s in zip(point, seen, spacing)) for seen, _ in evaluated):
                    continue
                schedule = self._schedule(dict(zip(names, point)))
                if schedule is not None:
                    evaluated.append((point, self.evaluate(schedule)))
            if not evaluated:
                raise ValueError(f"no {family} schedule in the range gives lambda > 0 at every step; move the range")
            best_point, best = min(evaluated, key=lambda e: e[1].mean if self.minimize else -e[1].mean)
            centers, halves = list(best_point), spacing
        return SearchResult(family, best, [c for _, c in evaluated], record)

    def search_uniform(self, b_range=(0.98, 1.03), grid: int = 5, rounds: int = 3) -> SearchResult:
        """lambda_t = b: ``grid`` values over ``b_range``, then ``rounds - 1`` finer grids."""
        return self._run("uniform", ("b",), [tuple(b_range)], [B_DECIMALS], grid, rounds)

    def search_linear(self, k_range, b_range=(0.98, 1.03), grid: int = 5, rounds: int = 3) -> SearchResult:
        """lambda_t = k t + b: a grid x grid lattice over (k_range, b_range), then finer ones."""
        return self._run("linear", ("k", "b"), [tuple(k_range), tuple(b_range)], [K_DECIMALS, B_DECIMALS],
                         grid, rounds)


def default_k_range(num_steps: int, spread: float = 0.05) -> tuple[float, float]:
    """k such that lambda changes by at most ``spread`` over the chain, up or down."""
    span = max(num_steps - 1, 1)
    return (-spread / span, spread / span)


# ---------------------------------------------------------------------------------------------
# Calibration


@dataclass
class Calibration:
    run: ChainRun  # the calibrated chains, measured (their rows hold lambda_t)
    table: EpsScale  # lambda_t, chain order t = 0 .. T' - 1
    uniform: EpsScale  # least-squares constant fit
    linear: EpsScale  # least-squares k t + b fit

    def to_dict(self) -> dict:
        return {"table": str(self.table), "uniform": str(self.uniform), "linear": str(self.linear)}


def fit_uniform(lambdas: Sequence[float]) -> EpsScale:
    """The constant closest to lambda_t in least squares: their mean."""
    return EpsScale(b=round(float(np.mean(lambdas)), 5))


def fit_linear(lambdas: Sequence[float]) -> EpsScale:
    """k t + b closest to lambdas[t] (chain order) in least squares."""
    values = np.asarray(lambdas, dtype=np.float64)
    if len(values) < 2:
        return EpsScale(b=round(float(values[0]), 5))
    k, b = np.polyfit(np.arange(len(values)), values, 1)
    return EpsScale(b=round(float(b), 5), k=round(float(k), 7))


def calibrate_eps_scale(diffusion, model, images: torch.Tensor, **kwargs) -> Calibration:
    """Pick lambda_t step by step so the noise prediction's norm matches forward-noised data.

    At step t (sampling order), lambda_t = mean ||eps(x_t, t)|| over the chains, divided by the
    mean over forward-noised images at t; the chains then take step t with it. ``kwargs`` go to
    ``exposure_bias.run_chains`` (labels, seed, batch_size, clip_denoised, use_ddim, progress).
    """
    def norm_ratio(t, sampling, forward):
        if not forward > 0:
            raise ValueError(f"the network predicts zero noise on forward-noised data at step {t}; cannot calibrate")
        return EpsScale(b=sampling / forward)

    run = run_chains(diffusion, model, images, norm_ratio, label="calibrated", forward_norms=True, **kwargs)
    lambdas = [round(v, 6) for v in run.column("lambda")[::-1]]  # chain order t = 0 .. T' - 1
    table = EpsScale(table=tuple(lambdas))
    run.eps_scale = str(table)
    return Calibration(run=run, table=table, uniform=fit_uniform(lambdas), linear=fit_linear(lambdas))


def compare_schedules(search: LambdaSearch, schedules: dict, optimum: Candidate) -> list[dict]:
    """Evaluate named schedules with the search's metric and seeds; their gap to ``optimum``."""
    rows = []
    for name, schedule in schedules.items():
        candidate = search.evaluate(schedule)
        gap = candidate.mean - optimum.mean
        rows.append({"name": name, **candidate.to_dict(), "gap_to_optimum": gap if search.minimize else -gap})
    return rows


# ---------------------------------------------------------------------------------------------
# Metrics: samples of a schedule and seed, scored


def sample_images(model, diffusion, schedule: EpsScale, seed: int, *, num_samples: int, batch_size: int, shape,
                  use_ddim: bool = False, clip_denoised: bool = True, num_classes: int | None = None,
                  time_shift=None, network_batch: int | None = None, progress: bool = False) -> np.ndarray:
    """``num_samples`` uint8 images [n, H, W, C] of one lambda schedule (and Time-Shift) and seed, by
    the sampling scripts' per-image sampler: image i (its noise, its label when ``num_classes``) does
    not depend on ``batch_size``. ``network_batch``: images per network call (None: the scripts' default)."""
    import argparse

    from tqdm.auto import tqdm

    from guided_diffusion.run.output import quantize
    from guided_diffusion.run.pipeline import batch_sampler

    args = argparse.Namespace(seed=seed, use_ddim=use_ddim, clip_denoised=clip_denoised)
    if network_batch is not None:
        args.network_batch_size = network_batch
    sample_batch = batch_sampler(model, diffusion, args, schedule, shape, num_classes=num_classes,
                                 time_shift=time_shift)
    starts = tqdm(range(0, num_samples, batch_size), desc=f"sampling, eps_scale {str(schedule)[:30]}, seed {seed}",
                  disable=not progress, leave=False)
    return np.concatenate([quantize(sample_batch(list(range(s, min(s + batch_size, num_samples))))[0])
                           for s in starts])


def sampling_metric(model, diffusion, score, *, num_samples: int, batch_size: int, image_size: int,
                    use_ddim: bool = False, clip_denoised: bool = True, num_classes: int | None = None,
                    progress: bool = False) -> Metric:
    """metric(schedule, seed) = ``score`` of ``num_samples`` images sampled with that lambda and seed
    (``sample_images``); ``score`` gets the images as the evaluator reads them (uint8 [n, H, W, 3])."""
    if num_samples < 2:
        raise ValueError(f"a metric needs at least 2 samples, got --num_samples {num_samples}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")

    def metric(schedule: EpsScale, seed: int) -> float:
        return float(score(sample_images(model, diffusion, schedule, seed, num_samples=num_samples,
                                         batch_size=batch_size, shape=(3, image_size, image_size), use_ddim=use_ddim,
                                         clip_denoised=clip_denoised, num_classes=num_classes, progress=progress)))

    return metric


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Grey levels in [-1, 1], area-averaged to at most 8 x 8: features for a Frechet distance on
    small data sets such as digits, where Inception features are out of place. Colour is ignored."""
    gray = torch.from_numpy(np.asarray(images, dtype=np.float32)).mean(dim=-1)[:, None] / 127.5 - 1.0
    size = (min(8, gray.shape[2]), min(8, gray.shape[3]))
    return torch.nn.functional.adaptive_avg_pool2d(gray, size).flatten(1).double().numpy()


def frechet_score(features: Callable[[np.ndarray], np.ndarray], reference_images: np.ndarray):
    """score(images): Frechet distance between the features of ``images`` and of the reference."""
    from evaluations.feature_statistics import FIDStatistics, frechet_distance

    def statistics(images) -> FIDStatistics:
        rows = np.asarray(features(images), dtype=np.float64)
        if rows.ndim != 2 or len(rows) < 2:
            raise ValueError(f"a Frechet distance needs features of at least 2 images as [n, d], got {rows.shape}")
        return FIDStatistics(rows.mean(axis=0), np.atleast_2d(np.cov(rows, rowvar=False)))

    reference = statistics(reference_images)
    return lambda images: frechet_distance(statistics(images), reference)


# name -> True when lower is better
EVALUATOR_METRICS = {"fid": True, "sfid": True, "inception_score": False, "precision": False, "recall": False}


def evaluator_score(name: str, inception, reference_path, batch_size: int = 64):
    """score(images) with ADM's evaluator (evaluations/): ``name`` of EVALUATOR_METRICS against the
    reference batch (its stored statistics are used when it has them, as the evaluator does)."""
    from evaluations.activations import compute_activations
    from evaluations.evaluator import read_batch
    from evaluations.feature_statistics import class_probabilities, inception_score
    from evaluations.manifold import precision_recall

    if name not in EVALUATOR_METRICS:
        raise ValueError(f"unknown evaluator metric {name!r}; use one of {', '.join(EVALUATOR_METRICS)}")
    reference, _ = read_batch(reference_path, inception, batch_size, "reference")
    needs_rows = name in ("inception_score", "precision", "recall")

    def score(images: np.ndarray) -> float:
        batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        sample = compute_activations(batches, inception, len(images), keep_pool=needs_rows,
                                     with_statistics=not needs_rows, desc="samples")
        if name == "fid":
            return sample.pool_statistics.frechet_distance(reference.pool_statistics)
        if name == "sfid":
            return sample.spatial_statistics.frechet_distance(reference.spatial_statistics)
        if name == "inception_score":
            return inception_score(class_probabilities(sample.pool, inception.softmax_weights))
        precision, recall = precision_recall(torch.from_numpy(reference.pool), torch.from_numpy(sample.pool))
        return precision if name == "precision" else recall

    return score


# ---------------------------------------------------------------------------------------------
# Plot


def write_search_plot(results: list[SearchResult], path, metric_name: str, num_seeds: int,
                      marks: dict | None = None) -> None:
    """The metric against lambda for each searched family (mean +- std over seeds), with the best
    schedule and any ``marks`` ({name: EpsScale}, e.g. the calibrated fits) shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    marks = marks or {}
    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    spread = f"mean ± std over {num_seeds} seeds" if num_seeds > 1 else "one seed"
    for ax, result in zip(axes[0], results):
        candidates = result.candidates
        if result.family == "uniform":
            ordered = sorted(candidates, key=lambda c: c.schedule.b)
            ax.errorbar([c.schedule.b for c in ordered], [c.mean for c in ordered], yerr=[c.std for c in ordered],
                        marker="o", ms=4, capsize=3, label="evaluated")
            ax.plot([result.best.schedule.b], [result.best.mean], marker="*", ms=16, color="red", linestyle="none",
                    label=f"best: {result.best.schedule}")
            ax.axvline(1.0, color="gray", linewidth=0.8, label="baseline (λ = 1)")
            for i, (name, schedule) in enumerate(marks.items()):
                if schedule.table is None and schedule.k == 0.0:
                    ax.axvline(schedule.b, color=f"C{i + 2}", linestyle="--", label=f"{name}: {schedule}")
            ax.set_xlabel("λ (uniform schedule: predicted noise divided by λ at every step)")
            ax.set_ylabel(f"{metric_name} ({spread})")
            ax.set_title(f"uniform λ: {metric_name} against λ")
        else:
            b = [c.schedule.b for c in candidates]
            k = [c.schedule.k for c in candidates]
            points = ax.scatter(b, k, c=[c.mean for c in candidates], cmap="viridis", s=30)
            fig.colorbar(points, ax=ax, label=f"{metric_name} ({spread})")
            ax.plot([result.best.schedule.b], [result.best.schedule.k], marker="*", ms=16, color="red",
                    linestyle="none", label=f"best: {result.best.schedule}")
            for i, (name, schedule) in enumerate(marks.items()):
                if schedule.table is None and schedule.k != 0.0:
                    ax.plot([schedule.b], [schedule.k], marker="X", ms=11, color=f"C{i + 2}", linestyle="none",
                            label=f"{name}: {schedule}")
            ax.set_xlabel("b (λ at the last step, t = 0)")
            ax.set_ylabel("k (change of λ per step; λ_t = k·t + b)")
            ax.set_title(f"linear λ_t = k·t + b: {metric_name} by colour")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)

"""Lambda search (synthetic metrics with known optima, cache and resume) and calibration (closed forms)."""

import json
import math

import numpy as np
import pytest
import torch
from gaussian_chains import (
    TINY_FLAGS,
    GaussianEps,
    closed_form,
    gaussian_data,
    gaussian_diffusion,
    tiny_unet_and_diffusion,
)
from sample_scripts import run_in_process

from guided_diffusion.eps_scaling import EpsScale, parse_eps_scale
from guided_diffusion.analysis.exposure_bias import measure_exposure_bias
from guided_diffusion.analysis.lambda_search import (
    EvaluationCache,
    LambdaSearch,
    calibrate_eps_scale,
    compare_schedules,
    evaluator_score,
    fit_linear,
    fit_uniform,
    frechet_score,
    pixel_features,
    sampling_metric,
    write_search_plot,
)
from guided_diffusion.image_noise import ImageNoise
from guided_diffusion.run.output import quantize

B_STAR, K_STAR = 1.0137, 0.0012


def bowl(schedule, seed):
    """A synthetic metric with its minimum at b = B_STAR, k = K_STAR; seeds shift it."""
    return ((schedule.b - B_STAR) / 0.01) ** 2 + ((schedule.k - K_STAR) / 0.001) ** 2 + 0.01 * seed


# ------------------------------------------------------------------ search


def test_uniform_search_finds_the_minimum_and_evaluates_each_point_once():
    search = LambdaSearch(bowl, seeds=[0])
    result = search.search_uniform((0.98, 1.03), grid=5, rounds=4)
    final_spacing = 0.05 / 4 / 2 ** 3
    assert abs(result.best.schedule.b - B_STAR) <= final_spacing / 2 + 1e-12
    assert result.best.schedule.k == 0.0
    # 5 points, then each finer grid of 5 holds the best point and its two old neighbours: 2 new
    assert search.calls == 5 + 2 + 2 + 2 == len(result.candidates)
    assert len({str(c.schedule) for c in result.candidates}) == len(result.candidates)
    assert result.rounds[0]["b"] == [0.98, 1.03]


def test_linear_search_finds_the_minimum_and_skips_non_positive_lambdas():
    num_steps = 20

    def metric(schedule, seed):
        schedule.validate(num_steps)  # raises if a schedule with lambda <= 0 were evaluated
        return bowl(schedule, seed)

    search = LambdaSearch(metric, seeds=[0], num_steps=num_steps)
    result = search.search_linear((-0.008, 0.008), (0.98, 1.03), grid=5, rounds=5)
    assert abs(result.best.schedule.k - K_STAR) <= 0.016 / 4 / 2 ** 4 / 2 + 1e-12
    assert abs(result.best.schedule.b - B_STAR) <= 0.05 / 4 / 2 ** 4 / 2 + 1e-12
    assert search.calls == 25 + 4 * 16
    wide = LambdaSearch(metric, seeds=[0], num_steps=num_steps)
    wide.search_linear((-0.2, 0.2), (0.98, 1.03), grid=3, rounds=1)  # k = -0.2 gives lambda_19 < 0
    assert wide.calls == 6


def test_maximising_and_repeated_seeds():
    search = LambdaSearch(lambda s, seed: -bowl(s, seed), seeds=[0, 1, 2], minimize=False)
    result = search.search_uniform((0.98, 1.03), grid=5, rounds=4)
    assert abs(result.best.schedule.b - B_STAR) < 0.001
    best = result.best
    assert best.values == pytest.approx([-bowl(best.schedule, s) for s in (0, 1, 2)])
    assert best.mean == pytest.approx(np.mean(best.values)) and best.std == pytest.approx(np.std(best.values, ddof=1))
    assert best.std == pytest.approx(0.01)
    assert search.calls == 3 * 11


def test_compare_schedules_gives_the_gap_to_the_optimum():
    search = LambdaSearch(bowl, seeds=[0, 1])
    optimum = search.search_uniform((0.98, 1.03), grid=5, rounds=3).best
    rows = compare_schedules(search, {"baseline": EpsScale(), "optimum": optimum.schedule}, optimum)
    assert rows[0]["name"] == "baseline" and rows[0]["eps_scale"] == "1.0"
    baseline = np.mean([bowl(EpsScale(), seed) for seed in (0, 1)])
    assert rows[0]["gap_to_optimum"] == pytest.approx(baseline - optimum.mean)
    assert rows[0]["gap_to_optimum"] > 1.0
    assert rows[1]["gap_to_optimum"] == 0.0


def test_bad_search_arguments():
    search = LambdaSearch(bowl)
    for call, message in [
        (lambda: search.search_uniform((0.98, 1.03), grid=4), "odd number"),
        (lambda: search.search_uniform((0.98, 1.03), rounds=0), "rounds"),
        (lambda: search.search_uniform((1.03, 0.98)), "low < high"),
        (lambda: search.search_uniform((-2.0, -1.0), grid=3, rounds=1), "no uniform schedule"),
        (lambda: LambdaSearch(bowl, seeds=[]), "at least one seed"),
        (lambda: LambdaSearch(bowl, seeds=[1, 1]), "seeds must differ"),
        (lambda: LambdaSearch(lambda s, seed: math.nan).search_uniform(), "the metric is nan"),
    ]:
        with pytest.raises(ValueError, match=message):
            call()


# ------------------------------------------------------------------ cache and resume


def test_an_interrupted_search_resumes_from_its_cache(tmp_path):
    context = {"model_sha256": "abc", "num_samples": 100}
    full = LambdaSearch(bowl, seeds=[0, 1])
    expected = full.search_uniform((0.98, 1.03), grid=5, rounds=3)

    calls = []

    def interrupted(schedule, seed):
        if len(calls) == 7:
            raise KeyboardInterrupt
        calls.append((str(schedule), seed))
        return bowl(schedule, seed)

    cache_path = tmp_path / "cache.json"
    with pytest.raises(KeyboardInterrupt):
        LambdaSearch(interrupted, seeds=[0, 1], cache=EvaluationCache(cache_path, context)).search_uniform(
            (0.98, 1.03), grid=5, rounds=3)
    stored = json.loads(cache_path.read_text())
    assert stored["context"] == context and len(stored["values"]) == 7
    schedule, seed = calls[0]
    assert stored["values"][f"{schedule}|seed={seed}"] == bowl(parse_eps_scale(schedule), seed)

    resumed = LambdaSearch(bowl, seeds=[0, 1], cache=EvaluationCache(cache_path, context))
    result = resumed.search_uniform((0.98, 1.03), grid=5, rounds=3)
    assert resumed.calls == full.calls - 7
    assert str(result.best.schedule) == str(expected.best.schedule)

    again = LambdaSearch(bowl, seeds=[0, 1], cache=EvaluationCache(cache_path, context))
    repeat = again.search_uniform((0.98, 1.03), grid=5, rounds=3)
    assert again.calls == 0
    assert [c.to_dict() for c in repeat.candidates] == [c.to_dict() for c in expected.candidates]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache.json"]  # no temporary files left


def test_cache_refuses_other_settings_and_unreadable_files(tmp_path):
    path = tmp_path / "cache.json"
    EvaluationCache(path, {"metric": "fid"}).put(EpsScale(b=1.01), 0, 3.5)
    assert EvaluationCache(path, {"metric": "fid"}).get(EpsScale(b=1.01), 0) == 3.5
    with pytest.raises(ValueError, match=r"other settings \(differing: metric\)"):
        EvaluationCache(path, {"metric": "sfid"})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a search cache"):
        EvaluationCache(path, {})
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EvaluationCache(tmp_path / "missing" / "cache.json", {})


# ------------------------------------------------------------------ calibration


def test_fits_of_a_lambda_table():
    line = [0.0025 * t + 1.001 for t in range(20)]
    fitted = fit_linear(line)
    assert fitted.k == pytest.approx(0.0025) and fitted.b == pytest.approx(1.001)
    assert fit_uniform(line).b == pytest.approx(np.mean(line), abs=1e-5)
    assert fit_uniform([1.0, 1.02]).b == 1.01 and fit_uniform([1.0, 1.02]).k == 0.0


def calibrate(s2, mult=1.0):
    diffusion = gaussian_diffusion()
    result = calibrate_eps_scale(diffusion, GaussianEps(s2, mult), gaussian_data(s2), clip_denoised=False,
                                 batch_size=200)
    return diffusion, result


def test_exact_predictor_calibrates_to_one():
    diffusion, result = calibrate(1.0)
    lambdas = result.table.values(diffusion.num_timesteps)
    assert lambdas == pytest.approx([1.0] * 10, abs=0.015)
    assert result.uniform.b == pytest.approx(1.0, abs=0.01) and abs(result.linear.k) < 0.002
    # rows are in sampling order, the table (rounded to 6 decimals) in chain order
    assert result.run.rows[0]["lambda"] == pytest.approx(lambdas[-1], abs=5e-7)


def test_calibration_of_too_large_predictions_follows_the_closed_form():
    diffusion, result = calibrate(1.0, mult=1.05)
    expected, calibrated_std = closed_form(diffusion, 1.0, mult=1.05, calibrate=True)
    for got, want in zip(result.run.rows, expected):
        assert got["lambda"] == pytest.approx(want["lambda"], abs=0.015), got["t"]
        assert got["std"] == pytest.approx(want["std"], rel=0.015), got["t"]
    # The factor 1.05 is in both norms, so the ratio only sees x_t, which the large predictions
    # shrink: lambda < 1, which enlarges the noise and shrinks the samples further.
    assert all(row["lambda"] < 0.97 for row in result.run.rows[1:])
    baseline = measure_exposure_bias(diffusion, GaussianEps(1.0, 1.05), gaussian_data(1.0), clip_denoised=False,
                                     batch_size=200)
    _, baseline_std = closed_form(diffusion, 1.0, mult=1.05)
    calibrated, plain = result.run.summary(), baseline.summary()
    assert calibrated["sample_std"] == pytest.approx(calibrated_std, rel=0.015)
    assert plain["sample_std"] == pytest.approx(baseline_std, rel=0.015)
    # delta_t at the end of the chain is smaller once calibrated ...
    assert calibrated["last_delta"] < plain["last_delta"] - 0.1
    # ... while the samples move away from the data's spread (1.0): delta is not a data distance.
    assert abs(calibrated["sample_std"] - 1.0) > abs(plain["sample_std"] - 1.0) + 0.05
    # the table reproduces the calibrated chains when sampled with it
    replay = measure_exposure_bias(diffusion, GaussianEps(1.0, 1.05), gaussian_data(1.0), result.table,
                                   clip_denoised=False, batch_size=200)
    assert replay.column("std") == pytest.approx(result.run.column("std"), rel=1e-4)


def test_calibration_sees_the_samplers_discretization_error():
    # s2 = 0.25: ten ancestral steps with beta_t as the variance make x_t too wide late in the
    # chain, with an exact predictor: the norm ratio, hence lambda, rises above 1.
    diffusion, result = calibrate(0.25)
    expected, _ = closed_form(diffusion, 0.25, calibrate=True)
    for got, want in zip(result.run.rows, expected):
        assert got["lambda"] == pytest.approx(want["lambda"], abs=0.02), got["t"]
    assert result.table.value(0, 10) > 1.3


def test_search_undoes_too_large_predictions_where_calibration_moves_away():
    # Gaussian data, predictions 5% too large: dividing them by 1.05 gives back the exact
    # predictor, so the sample spread is right at lambda = 1.05 (the closed form agrees, below).
    # The norm calibration goes the other way (lambda < 1): it only sees that x_t is too narrow.
    diffusion, model, n = gaussian_diffusion(), GaussianEps(1.0, 1.05), 200

    def spread_error(schedule, seed):
        samples = diffusion.p_sample_loop(model, (n, 3, 8, 8), clip_denoised=False, eps_scale=schedule,
                                          generator=ImageNoise(seed, range(n)))
        return (samples.double().std(dim=0).mean().item() - 1.0) ** 2

    best = LambdaSearch(spread_error, seeds=[0]).search_uniform((0.95, 1.15), grid=5, rounds=4).best
    assert best.schedule.b == pytest.approx(1.05, abs=0.01)
    _, exact_std = closed_form(diffusion, 1.0, 1.05, lambdas=[1.05] * 10)
    assert exact_std == pytest.approx(1.0, abs=0.002)
    _, result = calibrate(1.0, mult=1.05)
    assert result.uniform.b < 0.95 and result.linear.b < 0.95


# ------------------------------------------------------------------ metrics


def test_frechet_score_and_pixel_features():
    rng = np.random.default_rng(0)
    a, b = rng.normal(1.0, 2.0, (500, 1)), rng.normal(0.0, 1.0, (300, 1))
    score = frechet_score(lambda rows: rows, a)
    # one dimension: (mu1 - mu2)^2 + (s1 - s2)^2
    assert score(b) == pytest.approx((a.mean() - b.mean()) ** 2 + (a.std(ddof=1) - b.std(ddof=1)) ** 2, rel=1e-6)
    assert score(a) == pytest.approx(0.0, abs=1e-9)

    images = np.zeros((2, 16, 16, 3), dtype=np.uint8)
    images[:, :, :8] = 255
    features = pixel_features(images)
    assert features.shape == (2, 64)
    grid = features[0].reshape(8, 8)
    assert np.allclose(grid[:, :4], 1.0) and np.allclose(grid[:, 4:], -1.0)
    assert pixel_features(np.zeros((3, 4, 4, 3), dtype=np.uint8)).shape == (3, 16)


def test_sampling_metric_scores_the_samplers_images_whatever_the_batch_size(monkeypatch):
    from guided_diffusion import dist_util

    monkeypatch.setattr(dist_util, "dev", lambda: torch.device("cpu"))  # bit-equal images need one device
    model, diffusion = tiny_unet_and_diffusion()
    scored = []

    def score(images):
        scored.append(images)
        return float(images.astype(np.float64).mean())

    values = [sampling_metric(model, diffusion, score, num_samples=5, batch_size=size, image_size=8)(
        EpsScale(b=1.02), 3) for size in (2, 5)]
    assert values[0] == values[1] and np.array_equal(scored[0], scored[1])
    expected = diffusion.p_sample_loop(model, (5, 3, 8, 8), generator=ImageNoise(3, range(5)), eps_scale=1.02)
    assert np.array_equal(scored[0], quantize(expected))
    other_seed = sampling_metric(model, diffusion, score, num_samples=5, batch_size=5, image_size=8)(EpsScale(b=1.02), 4)
    assert other_seed != values[0]


class PixelInception:
    """A stand-in for ADM's Inception graph: 'features' are pixel values."""

    softmax_weights = np.eye(4, 3, dtype=np.float32)

    def features(self, images):
        rows = images.reshape(len(images), -1).astype(np.float32) / 255
        return rows[:, :4], rows[:, 4:7]

    def close(self):
        pass


def test_evaluator_metrics_against_a_reference_batch(tmp_path):
    from evaluations.feature_statistics import FIDStatistics, frechet_distance

    rng = np.random.default_rng(1)
    reference = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    samples = rng.integers(0, 128, (30, 4, 4, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", reference)
    inception = PixelInception()
    fid = evaluator_score("fid", inception, tmp_path / "ref.npz", batch_size=7)
    assert fid(reference) == pytest.approx(0.0, abs=1e-6)
    pool_s, pool_r = inception.features(samples)[0], inception.features(reference)[0]
    direct = frechet_distance(FIDStatistics(pool_s.mean(0), np.cov(pool_s, rowvar=False)),
                              FIDStatistics(pool_r.mean(0), np.cov(pool_r, rowvar=False)))
    assert fid(samples) == pytest.approx(direct, rel=1e-5)
    assert evaluator_score("precision", inception, tmp_path / "ref.npz")(reference) == 1.0
    assert evaluator_score("recall", inception, tmp_path / "ref.npz")(reference) == 1.0
    with pytest.raises(ValueError, match="unknown evaluator metric"):
        evaluator_score("kid", inception, tmp_path / "ref.npz")


def test_search_plot(tmp_path):
    search = LambdaSearch(bowl, seeds=[0, 1])
    results = [search.search_uniform(grid=3, rounds=2), search.search_linear((-0.002, 0.004), grid=3, rounds=2)]
    marks = {"calibrated uniform": EpsScale(b=1.01), "calibrated linear": EpsScale(b=1.0, k=0.001)}
    write_search_plot(results, tmp_path / "search.png", "FD", 2, marks)
    assert (tmp_path / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the script


SEARCH_FLAGS = ["--metric=pixel_fd", "--data_dir=digits", "--num_images=16", "--num_samples=6", "--batch_size=6",
                "--seeds=0,1", "--grid=3", "--rounds=2"]


def test_search_script_end_to_end_and_resumed(tmp_path, tiny_checkpoint):
    flags = [*TINY_FLAGS, *SEARCH_FLAGS, f"--model_path={tiny_checkpoint}", f"--output_dir={tmp_path}"]
    r = run_in_process("search_eps_scale.py", *flags, check=False)
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err[-3000:]
    record = json.loads((tmp_path / "search.json").read_text())
    uniform, linear = (parse_eps_scale(record["best"][f]) for f in ("uniform", "linear"))
    assert uniform.k == 0.0 and uniform.b > 0 and linear.table is None
    assert f"best uniform: --eps_scale {uniform}" in out and "note: 6 samples for 64 features" in out
    names = [row["name"] for row in record["comparison"]]
    assert names == ["baseline", "calibrated table", "calibrated uniform", "calibrated linear"]
    searched = {c["eps_scale"]: c["mean"] for s in record["searches"] for c in s["candidates"]}
    assert record["optimum"]["mean"] == min(searched.values())
    for row in record["comparison"]:
        assert row["gap_to_optimum"] == pytest.approx(row["mean"] - record["optimum"]["mean"])
        assert row["mean"] == pytest.approx(np.mean(row["values"])) and len(row["values"]) == 2
    cache = json.loads((tmp_path / "search_cache.json").read_text())
    every_schedule = set(searched) | {row["eps_scale"] for row in record["comparison"]}
    assert len(cache["values"]) == 2 * len(every_schedule)
    assert (tmp_path / "search.png").stat().st_size > 10000

    r = run_in_process("search_eps_scale.py", *flags, check=False)
    code, out, err = r.returncode, r.stdout, r.stderr
    assert code == 0, err
    assert "0 new evaluations" in out  # resumed entirely from the cache
    assert json.loads((tmp_path / "search.json").read_text())["best"] == record["best"]


def test_search_script_errors_are_one_line(tmp_path, tiny_checkpoint):
    base = [*TINY_FLAGS, f"--model_path={tiny_checkpoint}", f"--output_dir={tmp_path}"]
    for flags, message in [
        (["--metric=fid"], "needs ADM's reference batch; pass --ref_batch"),
        (["--metric=pixel_fd"], "pass --data_dir"),
        (["--metric=kid"], "unknown --metric"),
        ([*SEARCH_FLAGS, "--seeds=a,b"], "cannot read --seeds"),
        ([*SEARCH_FLAGS, "--b_range=1.0"], "needs 2 comma-separated numbers"),
        ([*SEARCH_FLAGS, "--grid=4"], "odd number"),
        ([*SEARCH_FLAGS, "--data_dir=digits:16"], "gives 16x16 images but the model takes 8x8"),
    ]:
        r = run_in_process("search_eps_scale.py", *base, *flags, check=False)
        code, err = r.returncode, r.stderr
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert message in lines[0], lines[0]
    assert not (tmp_path / "search.json").exists()

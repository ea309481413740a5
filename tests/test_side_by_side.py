"""The side by side of exposure-bias fixes (analysis/side_by_side.py, scripts/compare_fixes.py):
paired seeds, the table's statistics, the verdict rule, TS+ES as both fixes at once, flag errors."""

import json

import numpy as np
import pytest
import torch

from guided_diffusion.analysis import side_by_side as sbs
from guided_diffusion.analysis.lambda_search import frechet_score, pixel_features, sample_images
from guided_diffusion.eps_scaling import EpsScale
from guided_diffusion.image_noise import ImageNoise
from guided_diffusion.run.output import quantize
from guided_diffusion.time_shift import TimeShift
from gaussian_chains import IMAGE_SHAPE, GaussianEps, gaussian_data, gaussian_diffusion
from sample_scripts import run_in_process

S2 = 0.25  # data variance: x_t's variance is then far from 1 - abar, so Time-Shift moves images
NUM_SAMPLES = 48
ES = EpsScale(b=1.04)
SHIFT = TimeShift(10, 0)  # of the 100 original steps; 10 respaced steps are 11 apart


def gaussian_bench(sample=None, score=None, num_chains=24):
    """Gaussian data, its exact noise predictor: a bench with real sampling, in milliseconds."""
    model = GaussianEps(S2).eval()

    def real_sample(steps, arm, seed):
        return sample_images(model, gaussian_diffusion(str(steps)), arm.eps_scale, seed, num_samples=NUM_SAMPLES,
                             batch_size=20, shape=IMAGE_SHAPE, time_shift=arm.time_shift,
                             network_batch=min(NUM_SAMPLES, 400))

    real_score = frechet_score(pixel_features, quantize(gaussian_data(S2, n=200, seed=5)))
    return sbs.Bench(model, lambda steps: gaussian_diffusion(str(steps)), sample or real_sample, score or real_score,
                     gaussian_data(S2, n=num_chains), metric="pixel FD", chain_batch=10)


OFFSETS = {"baseline": 0.0, "ES": -0.5, "TS": -50.0, "TS+ES": 50.0}


def coded_sample(calls):
    """A stand-in sampler whose 'images' carry (steps, arm, seed), recording every call."""

    def sample(steps, arm, seed):
        calls.append((steps, arm.name, seed))
        return np.array([steps, sbs.ARMS.index(arm.name), seed], dtype=np.float64)

    return sample


def coded_score(images):
    """10 per seed (a large seed-to-seed spread), plus a per-arm offset and a little per step count."""
    steps, arm, seed = images
    return 10.0 * seed + OFFSETS[sbs.ARMS[int(arm)]] + 0.01 * steps


def test_every_arm_runs_the_same_seeds_at_every_step_count():
    calls = []
    rows = sbs.compare(gaussian_bench(coded_sample(calls), coded_score), sbs.make_arms(ES, SHIFT), [3, 5], [4, 0, 7])
    assert [(r["steps"], r["arm"]) for r in rows] == [(n, a) for n in (3, 5) for a in sbs.ARMS]
    for steps in (3, 5):
        for arm in sbs.ARMS:
            assert [seed for n, a, seed in calls if (n, a) == (steps, arm)] == [4, 0, 7]
    assert len(calls) == 2 * 4 * 3
    for row in rows:  # each score is that of the call with its seed
        assert row["scores"] == [coded_score((row["steps"], sbs.ARMS.index(row["arm"]), s)) for s in (4, 0, 7)]


def test_scores_are_the_metric_of_each_seeds_own_samples():
    """Per seed, the score of the samples the sampling loop makes from that seed's per-image noise."""
    bench = gaussian_bench()
    arms = sbs.make_arms(ES, SHIFT)
    rows = sbs.compare(bench, arms, [10], [0, 1])
    for row, arm in zip(rows, arms):
        diffusion = gaussian_diffusion("10")
        for seed, value in zip([0, 1], row["scores"]):
            images = diffusion.p_sample_loop(GaussianEps(S2), (NUM_SAMPLES, *IMAGE_SHAPE), clip_denoised=True,
                                             generator=ImageNoise(seed, range(NUM_SAMPLES)), eps_scale=arm.eps_scale,
                                             time_shift=arm.time_shift)
            assert value == bench.score(quantize(images))
    assert rows[0]["scores"][0] != rows[0]["scores"][1]  # the seed changes the samples


def test_table_is_numpys_statistics_of_the_per_seed_scores(tmp_path):
    seeds = [0, 1, 2]
    bench = gaussian_bench(coded_sample([]), coded_score)
    result = sbs.run_side_by_side(lambda: bench, tmp_path / "out", model="gaussian", steps=[3, 5], seeds=seeds,
                                  eps_scale=ES, eps_scale_source="test", time_shift=SHIFT, num_samples=NUM_SAMPLES,
                                  log=lambda *_: None)
    stored = json.loads((tmp_path / "out" / "results.json").read_text())
    table = (tmp_path / "out" / "results.md").read_text().splitlines()
    assert (tmp_path / "out" / "results.png").stat().st_size > 0
    assert stored["rows"] == json.loads(json.dumps(result["rows"]))
    for row in stored["rows"]:
        scores = np.array([coded_score((row["steps"], sbs.ARMS.index(row["arm"]), s)) for s in seeds])
        base = np.array([coded_score((row["steps"], 0, s)) for s in seeds])
        assert row["mean"] == pytest.approx(scores.mean(), abs=1e-12)
        assert row["std"] == pytest.approx(scores.std(ddof=1), abs=1e-12)
        mean_cell = f"{scores.mean():.3f} ± {scores.std(ddof=1):.3f}"
        if row["arm"] == "baseline":
            expected = f"| {row['steps']} | baseline | {mean_cell} | — | — |"
        else:
            gain = base - scores
            spread = max(base.std(ddof=1), scores.std(ddof=1))
            word = "within noise" if abs(gain.mean()) <= spread else (
                f"{row['arm']} better" if gain.mean() > 0 else f"{row['arm']} worse")
            assert row["verdict"] == word
            expected = (f"| {row['steps']} | {row['arm']} | {mean_cell} | {gain.mean():.3f} ± {gain.std(ddof=1):.3f} "
                        f"| {word} |")
        assert any(line.startswith(expected) for line in table), expected
        chains = bench.exposure(row["steps"], next(a for a in sbs.make_arms(ES, SHIFT) if a.name == row["arm"]), 0)
        assert row["mean_delta"] == pytest.approx(np.mean([r["delta"] for r in chains.rows]), rel=1e-12)


def test_verdicts_only_beyond_the_seed_spread():
    rows = sbs.compare(gaussian_bench(coded_sample([]), coded_score), sbs.make_arms(ES, SHIFT), [3], [0, 1, 2])
    verdicts = {r["arm"]: r.get("verdict") for r in rows}
    gains = {r["arm"]: r.get("gain") for r in rows}
    # ES gains 0.5 on every seed (paired gain 0.5 ± 0), but the seeds spread by 10: within noise
    assert gains["ES"] == "0.500 ± 0.000" and verdicts["ES"] == "within noise"
    assert verdicts["TS"] == "TS better" and verdicts["TS+ES"] == "TS+ES worse"
    assert verdicts["baseline"] is None


def test_ts_es_is_both_fixes_and_window_zero_is_es_alone():
    bench = gaussian_bench()
    baseline, es, ts, both = sbs.make_arms(ES, SHIFT)
    images = {arm.name: bench.sample(10, arm, 0) for arm in (baseline, es, ts, both)}
    assert not np.array_equal(images["TS"], images["baseline"])  # the shift moves images
    assert not np.array_equal(images["TS+ES"], images["ES"])
    assert not np.array_equal(images["TS+ES"], images["TS"])
    chains = {arm.name: bench.exposure(10, arm, 0) for arm in (es, ts, both)}
    assert [r["lambda"] for r in chains["TS+ES"].rows] == [r["lambda"] for r in chains["ES"].rows] == [1.04] * 10
    assert not torch.equal(chains["TS+ES"].samples, chains["ES"].samples)
    assert not torch.equal(chains["TS+ES"].samples, chains["TS"].samples)

    off = sbs.make_arms(ES, TimeShift(0, 0))[3]
    assert off.time_shift is None
    assert np.array_equal(bench.sample(10, off, 0), images["ES"])
    run = bench.exposure(10, off, 0)
    assert torch.equal(run.samples, chains["ES"].samples)
    assert [r["delta"] for r in run.rows] == [r["delta"] for r in chains["ES"].rows]


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0: each step count must be between 1 and 1000"),
    (["--steps", "10,2000"], "--steps 2000: each step count must be between 1 and 1000"),
    (["--steps", "10,10"], "repeats a value"),
    (["--seeds="], "--seeds needs at least one value"),
    (["--seeds", "a"], "cannot read --seeds"),
    (["--window", "1000"], "time shift window 1000 is not below the 1000 diffusion steps"),
    (["--window", "0"], "turns Time-Shift off"),
    (["--cutoff", "1000"], "time shift cutoff 1000 is outside 0..999"),
    (["--pilot_windows", "4,0"], "time shift window 0 turns Time-Shift off"),
    (["--pilot_windows", "4", "--seeds", "0,100"], "seed 100 chooses the window"),
    (["--eps_scale", "1"], "the ES arms would repeat it"),
    (["--eps_scale", "0"], "non-positive"),
    (["--use_ddim", "True"], "drop --use_ddim True"),
    (["--num_samples", "1"], "--num_samples must be at least 2"),
    (["--num_chains", "5000"], "--num_chains must be between 2 and the 1797"),
    (["--config", "imagenet64_cond", "--eps_scale", "1.006"], "--ref_batch"),
])
def test_bad_flags_are_one_line_and_write_nothing(tmp_path, flags, message):
    out = tmp_path / "out"
    proc = run_in_process("compare_fixes.py", "--output_dir", str(out), *flags, check=False)
    code, stderr = proc.returncode, proc.stderr
    assert code == 2
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and message in stderr
    assert not out.exists()

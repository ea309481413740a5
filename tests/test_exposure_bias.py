"""Exposure-bias measurements against closed forms.

For data x0 ~ N(0, s2 I) the exact noise predictor is linear in x_t,
E[eps | x_t] = sqrt(1 - abar) x_t / (abar s2 + 1 - abar), so every sampler step is linear too:
x_{t-1} = A_t x_t + B_t z. A chain started from q(x_{T'-1} | x0) is then x_t = c_t x0 + (noise of
variance v_t) per pixel, and everything the tool measures has a closed form, computed here by
an independent recursion over (c_t, v_t).
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from gaussian_chains import (
    IMAGE_SHAPE,
    ROOT,
    TINY_FLAGS,
    GaussianEps,
    closed_form,
    gaussian_data,
    gaussian_diffusion,
    tiny_unet_and_diffusion,
)
from PIL import Image
from sample_scripts import run_in_process

from guided_diffusion.analysis.exposure_bias import (
    STEP_COLUMNS,
    exposure_delta,
    load_images,
    measure_exposure_bias,
    runs_to_dict,
    stochastic_std,
    write_csv,
    write_json,
    write_plot,
)
from guided_diffusion.image_noise import ImageNoise

def measure(s2, mult=1.0, eps_scale=None, respacing="10", **kwargs):
    diffusion = gaussian_diffusion(respacing)
    kwargs.setdefault("batch_size", 128)
    run = measure_exposure_bias(diffusion, GaussianEps(s2, mult), gaussian_data(s2), eps_scale,
                                clip_denoised=False, **kwargs)
    return diffusion, run


@pytest.fixture(scope="module")
def exact_run():
    return measure(1.0)


@pytest.fixture(scope="module")
def too_large_run():
    return measure(1.0, mult=1.05)


# ------------------------------------------------------------------ the delta formula itself


def test_delta_of_constructed_chains_is_the_closed_form():
    torch.manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3.0  # any data: sqrt(abar) x0 is removed
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64).view(4, 1, 1, 1)  # std exactly 1
    scale = torch.linspace(0.2, 1.4, 75, dtype=torch.float64).view(1, 3, 5, 5)  # std of pixel p: scale[p]
    for abar in (0.999, 0.5, 0.01):
        x_t = math.sqrt(abar) * x0 + signs * scale
        assert stochastic_std(x_t, x0, abar) == pytest.approx(scale.mean().item(), rel=1e-12)
        expected = (scale.mean().item() - math.sqrt(1 - abar)) ** 2
        assert exposure_delta(x_t, x0, abar) == pytest.approx(expected, rel=1e-10)
    # the forward process itself: delta is the sampling error of a std only
    abar = 0.3
    noise = torch.randn(4000, 1, 2, 2)
    assert exposure_delta(math.sqrt(abar) * x0[:1, :1, :2, :2] + math.sqrt(1 - abar) * noise,
                          x0[:1, :1, :2, :2].expand(4000, 1, 2, 2), abar) < 1e-3


# ------------------------------------------------------------------ Gaussian data, exact predictor


def assert_matches_closed_form(run, expected, rel=0.015):
    assert [row["t"] for row in run.rows] == [row["t"] for row in expected]
    for got, want in zip(run.rows, expected):
        assert got["std"] == pytest.approx(want["std"], rel=rel), got["t"]
        assert got["target_std"] == pytest.approx(want["target"], rel=1e-6)
        assert got["delta"] == pytest.approx((got["std"] - want["target"]) ** 2, rel=1e-9)
        assert got["marginal_std_sampling"] == pytest.approx(want["marginal"], rel=rel), got["t"]


def test_exact_predictor_matches_the_closed_form_and_the_forward_marginals(exact_run):
    diffusion, run = exact_run
    expected, final_std = closed_form(diffusion, 1.0)
    assert_matches_closed_form(run, expected)
    # With s2 = 1 and beta_t as the variance, ancestral sampling keeps the forward marginals exactly:
    # x_t spreads like forward-noised data and the noise predictions have the training-time norm.
    for row in run.rows:
        assert row["marginal_std_sampling"] == pytest.approx(row["marginal_std_forward"], rel=0.015)
        assert row["eps_norm_ratio"] == pytest.approx(1.0, abs=0.015)
        assert row["lambda"] == 1.0 and row["eps_norm_scaled"] == row["eps_norm_sampling"]
    assert run.summary()["sample_std"] == pytest.approx(final_std, rel=0.015)
    # ...yet the authors' delta grows to about 2 s2 - the chain forgets its start image:
    # std(x_0 sample - x_0 data) = sqrt(2) s, not sqrt(1 - abar_0) ~ 0.03.
    assert run.rows[-1]["delta"] == pytest.approx((math.sqrt(2) - run.rows[-1]["target_std"]) ** 2, rel=0.03)
    assert run.rows[0]["delta"] < 1e-4


def test_noise_norms_are_those_of_the_predictor(exact_run):
    diffusion, run = exact_run
    dim = math.prod(IMAGE_SHAPE)
    for row in run.rows:
        gain = math.sqrt(1 - row["alpha_bar"])  # eps = sqrt(1 - abar) x_t for s2 = 1
        # forward-noised x_t ~ N(0, I) here, and E||N(0, I_d)|| = sqrt(2) Gamma((d+1)/2) / Gamma(d/2)
        chi_mean = math.sqrt(2) * math.exp(math.lgamma((dim + 1) / 2) - math.lgamma(dim / 2))
        assert row["eps_norm_forward"] == pytest.approx(gain * chi_mean, rel=0.01)
        assert row["timestep"] == diffusion.timestep_map[row["t"]]


def test_too_large_predictions_shrink_the_chains_and_their_norm_ratio(too_large_run):
    diffusion, run = too_large_run
    expected, final_std = closed_form(diffusion, 1.0, mult=1.05)
    assert_matches_closed_form(run, expected)
    # Predictions 5% too large pull x_t in: smaller spread than forward-noised data, and so
    # (the factor cancels between the two norms) a sampling/forward norm ratio below 1.
    for got, want in zip(run.rows[1:], expected[1:]):
        assert got["eps_norm_ratio"] == pytest.approx(want["ratio"], abs=0.015)
        assert got["eps_norm_ratio"] < 0.985
    assert run.summary()["sample_std"] == pytest.approx(final_std, rel=0.015)
    # delta grows along the second half of the chain
    late = [row["delta"] for row in run.rows[5:]]
    assert late == sorted(late)


def test_eps_scaling_is_applied_as_the_sampler_applies_it():
    diffusion, run = measure(1.0, eps_scale="linear:k=0.01,b=0.98")
    lambdas = [0.01 * t + 0.98 for t in range(diffusion.num_timesteps)]
    expected, final_std = closed_form(diffusion, 1.0, lambdas=lambdas)
    assert_matches_closed_form(run, expected)
    assert run.summary()["sample_std"] == pytest.approx(final_std, rel=0.015)
    # lambda moves the final spread by 1%, less than the sampling error above; the same noise
    # without lambda cancels that error, so the ratio is checked much more tightly
    _, baseline = measure(1.0)
    _, baseline_std = closed_form(diffusion, 1.0)
    ratio = run.summary()["sample_std"] / baseline.summary()["sample_std"]
    assert ratio == pytest.approx(final_std / baseline_std, rel=2e-3)
    for row in run.rows:
        assert row["lambda"] == pytest.approx(lambdas[row["t"]], rel=1e-12)
        assert row["eps_norm_scaled"] == pytest.approx(row["eps_norm_sampling"] / row["lambda"], rel=1e-5)
    assert run.label == "ES linear:k=0.01,b=0.98" and run.eps_scale == "linear:k=0.01,b=0.98"


def test_ddim_chains_match_the_closed_form():
    diffusion, run = measure(0.5, eps_scale=1.02, use_ddim=True)
    expected, final_std = closed_form(diffusion, 0.5, lambdas=[1.02] * 10, ddim=True)
    assert_matches_closed_form(run, expected)
    assert run.summary()["sample_std"] == pytest.approx(final_std, rel=0.015)


# ------------------------------------------------------------------ the chains are the sampler's


@pytest.mark.parametrize("use_ddim", [False, True])
def test_chains_are_what_the_sampling_loop_draws_whatever_the_batch_size(use_ddim):
    model, diffusion = tiny_unet_and_diffusion()
    images = torch.rand(5, 3, 8, 8) * 2 - 1
    run = measure_exposure_bias(diffusion, model, images, 1.03, seed=7, batch_size=2, use_ddim=use_ddim)
    noise = ImageNoise(7, range(5))
    start = diffusion.q_sample(images, torch.full((5,), diffusion.num_timesteps - 1), noise=noise.randn(images.shape))
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    expected = loop(model, images.shape, noise=start, generator=noise, eps_scale=1.03)
    torch.testing.assert_close(run.samples, expected, atol=5e-4, rtol=1e-4)  # batch shapes change rounding
    again = measure_exposure_bias(diffusion, model, images, 1.03, seed=7, batch_size=5, use_ddim=use_ddim)
    torch.testing.assert_close(again.samples, run.samples, atol=5e-4, rtol=1e-4)
    assert again.rows[-1]["std"] == pytest.approx(run.rows[-1]["std"], rel=1e-4)


def test_bad_measurement_input_is_one_clear_line():
    diffusion = gaussian_diffusion()
    with pytest.raises(ValueError, match="at least 2 images"):
        measure_exposure_bias(diffusion, GaussianEps(1.0), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="lambda = .* every lambda must be > 0"):
        measure_exposure_bias(diffusion, GaussianEps(1.0), torch.zeros(4, 3, 4, 4), "linear:k=-0.2,b=1.0")
    with pytest.raises(ValueError, match="batch_size"):
        measure_exposure_bias(diffusion, GaussianEps(1.0), torch.zeros(4, 3, 4, 4), batch_size=0)


# ------------------------------------------------------------------ data


def test_digits_npz_and_folder_data(tmp_path):
    images, labels = load_images("digits", 8, num_images=50, seed=3, with_labels=True)
    assert images.shape == (50, 3, 8, 8) and labels.shape == (50,)
    assert images.min() >= -1 and images.max() <= 1
    same, _ = load_images("digits", 8, num_images=50, seed=3)
    assert torch.equal(same, images)

    arr = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    arr[:, :, :, 0] = 255
    arr[2] = 127
    np.savez(tmp_path / "batch.npz", arr, np.arange(6))
    loaded, npz_labels = load_images(tmp_path / "batch.npz", 4, num_images=0, with_labels=True)
    assert loaded.shape == (6, 3, 4, 4) and npz_labels.tolist() == list(range(6))
    assert loaded[0, 0].eq(1).all() and loaded[0, 1].eq(-1).all()
    assert loaded[2].sub(127 / 127.5 - 1).abs().max() < 1e-6

    folder = tmp_path / "images"
    folder.mkdir()
    for i, name in enumerate(["cat_1.png", "dog_1.png", "cat_2.png"]):
        Image.fromarray(np.full((10, 12, 3), 40 * i, dtype=np.uint8)).save(folder / name)
    loaded, folder_labels = load_images(folder, 4, num_images=0, with_labels=True)
    assert loaded.shape == (3, 3, 4, 4)
    assert folder_labels.tolist() == [0, 0, 1]  # sorted paths: cat_1, cat_2, dog_1
    assert loaded[1].sub(80 / 127.5 - 1).abs().max() < 1e-6


def test_bad_data_is_one_clear_line(tmp_path):
    np.savez(tmp_path / "wrong.npz", np.zeros((5, 16, 16, 3), dtype=np.uint8))
    np.savez(tmp_path / "empty.npz", np.zeros((0, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "floats.npz", np.zeros((5, 8, 8, 3), dtype=np.float32))
    (tmp_path / "no_images").mkdir()
    cases = [
        ("", "no data given"),
        ("digits:16", "gives 16x16 images but the model takes 8x8"),
        (tmp_path / "wrong.npz", "holds 16x16 images but the model takes 8x8"),
        (tmp_path / "empty.npz", "holds no images"),
        (tmp_path / "floats.npz", "must be uint8"),
        (tmp_path / "no_images", "no .jpg"),
        (tmp_path / "notes.txt", "does not exist"),
    ]
    for source, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as info:
            load_images(source, 8, num_images=4)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="asked for 2000 images but digits holds 1797"):
        load_images("digits", 8, num_images=2000)
    with pytest.raises(ValueError, match="at least 2 images"):
        load_images("digits", 8, num_images=1)


# ------------------------------------------------------------------ output files


def test_csv_json_and_plot(tmp_path, exact_run, too_large_run):
    runs = [exact_run[1], too_large_run[1]]
    write_csv(runs, tmp_path / "eb.csv")
    lines = (tmp_path / "eb.csv").read_text().splitlines()
    assert lines[0].split(",") == ["run", "eps_scale", *STEP_COLUMNS]
    assert len(lines) == 1 + 2 * 10
    first = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert first["t"] == "9" and float(first["delta"]) == pytest.approx(runs[0].rows[0]["delta"])

    no_forward = measure(1.0, forward_norms=False)[1]
    record = {"runs": runs_to_dict(runs + [no_forward])}
    write_json(record, tmp_path / "eb.json")
    loaded = json.loads((tmp_path / "eb.json").read_text())  # strict JSON: NaN became null
    assert loaded["runs"][2]["steps"][0]["eps_norm_forward"] is None
    assert loaded["runs"][1]["summary"]["last_delta"] == pytest.approx(runs[1].rows[-1]["delta"])

    write_plot(runs, tmp_path / "eb.png", title="Gaussian data")
    assert (tmp_path / "eb.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eb.csv", "eb.json", "eb.png"]  # no temp files


# ------------------------------------------------------------------ the script


def run_script(*flags):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "exposure_bias.py"), *flags],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))


def test_script_writes_baseline_es_and_calibrated_runs(tmp_path, tiny_checkpoint):
    proc = run_script(*TINY_FLAGS, f"--model_path={tiny_checkpoint}", "--data_dir=digits", "--num_images=12",
                      "--batch_size=5", "--eps_scale=1.02", "--calibrate=True", f"--output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((tmp_path / "exposure_bias.json").read_text())
    assert [r["label"] for r in record["runs"]] == ["baseline", "ES 1.02", "calibrated"]
    assert record["settings"]["eps_scale_source"] == "--eps_scale" and record["settings"]["num_images"] == 12
    assert all(step["lambda"] == 1.02 for step in record["runs"][1]["steps"])
    calibrated = [step["lambda"] for step in record["runs"][2]["steps"]]
    ratios = [step["eps_norm_ratio"] for step in record["runs"][2]["steps"]]
    assert calibrated == pytest.approx(ratios, rel=1e-9)
    assert record["calibration"]["table"].startswith("table:")
    assert len((tmp_path / "exposure_bias.csv").read_text().splitlines()) == 1 + 3 * 5
    assert (tmp_path / "exposure_bias.png").stat().st_size > 10000
    assert "calibrated lambda: uniform --eps_scale" in proc.stdout


def test_script_errors_are_one_line(tmp_path, tiny_checkpoint):
    np.savez(tmp_path / "big.npz", np.zeros((4, 32, 32, 3), dtype=np.uint8))
    for flags, message in [
        (["--data_dir=digits:16"], "gives 16x16 images but the model takes 8x8"),
        ([f"--data_dir={tmp_path / 'big.npz'}"], "holds 32x32 images but the model takes 8x8"),
        (["--data_dir=digits", "--eps_scale=linear:k=-1"], "every lambda must be > 0"),
        (["--data_dir=digits", f"--model_path={tmp_path / 'missing.pt'}"], "does not exist"),
    ]:
        proc = run_in_process("exposure_bias.py", *TINY_FLAGS, f"--model_path={tiny_checkpoint}", "--num_images=4",
                              f"--output_dir={tmp_path / 'out'}", *flags, check=False)
        code, err = proc.returncode, proc.stderr
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
        assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "out" / "exposure_bias.json").exists()

"""The shipped default: the digits models load and sample, and the demo's whole path runs (reduced)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion.digits.features import digit_features, load_digit_features
from guided_diffusion.digits.data import digits_arrays
from guided_diffusion.analysis.seed_stats import paired_gain, verdict
from guided_diffusion.digits.demo import DigitsBench, load_shipped, run_demo
from guided_diffusion.digits.training import shipped_sizes
from guided_diffusion.eps_scaling import EpsScale
from adm_common.errors import UsageError
from adm_common.files import folder_lock_file, locked
from guided_diffusion.run.output import quantize

REPO = Path(__file__).resolve().parents[1]


def test_shipped_weights_are_small_enough_to_ship():
    sizes = shipped_sizes()
    assert len(sizes) == 4 and sum(sizes.values()) <= 10 * 1024 * 1024


def test_feature_network_reads_real_digits():
    net = load_digit_features()
    images, labels = digits_arrays(8)
    with torch.no_grad():
        predicted = net(images[:, :1]).argmax(1)
    assert (predicted == labels).float().mean() > 0.95  # sklearn's labels, not ours
    features = digit_features(net, quantize(images[:50]))
    assert features.shape == (50, 64) and np.linalg.matrix_rank(np.cov(features, rowvar=False)) > 40


def test_shipped_models_load_and_sample_digits():
    bench = DigitsBench(num_samples=64, batch_size=64)
    images, labels = bench.sample("digits_cond", 10, EpsScale(), seed=0)
    assert images.shape == (64, 8, 8, 3) and images.dtype == np.uint8 and labels.shape == (64,)
    # a trained model draws digits: the independent digit classifier reads most as their label
    assert bench.accuracy(images, labels) > 0.6
    noise = quantize(torch.rand(64, 3, 8, 8) * 2 - 1)
    assert bench.fd(images) < 0.5 * bench.fd(noise)


def test_classifier_is_noise_aware():
    classifier, _ = load_shipped("digits_classifier")
    images, labels = digits_arrays(8)
    with torch.no_grad():
        logits = classifier(images[:200], torch.full((200,), 10))
    assert (logits.argmax(1) == labels[:200]).float().mean() > 0.8


def test_verdict_needs_a_gain_larger_than_the_spread():
    assert verdict([10.0, 11.0, 12.0], [5.0, 6.0, 7.0]) == "ES better"
    assert verdict([10.0, 11.0, 12.0], [10.5, 9.0, 12.5]) == "within noise"
    assert verdict([0.90, 0.91], [0.95, 0.96], lower_is_better=False) == "ES better"
    assert paired_gain([10.0, 12.0], [9.0, 10.0]) == "1.500 ± 0.707"


def test_demo_runs_end_to_end_on_a_reduced_setting(tmp_path):
    result = run_demo(tmp_path, num_samples=16, batch_size=16, seeds=(0, 1), steps=(3,), search_steps=3,
                      progress=False, log=lambda *a: None, cond_steps=(3,))
    for name in ("results.md", "results.json", "samples_grid.png", "exposure_bias.png", "exposure_bias.csv"):
        assert (tmp_path / name).stat().st_size > 0
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["chosen_eps_scale"] == result["chosen_eps_scale"]
    assert {row["model"] for row in stored["rows"]} >= {"digits_uncond", "digits_cond"}
    assert "| digits_uncond | 3 | digits FD |" in (tmp_path / "results.md").read_text()
    # every image is a function of (seed, index): a rerun (reusing the cached search) repeats every number
    again = run_demo(tmp_path, num_samples=16, batch_size=8, seeds=(0, 1), steps=(3,), search_steps=3,
                     progress=False, log=lambda *a: None, cond_steps=(3,))
    assert again["rows"] == result["rows"] and again["chosen_eps_scale"] == result["chosen_eps_scale"]


QUICK = dict(num_samples=4, batch_size=4, seeds=(0,), steps=(2,), search_steps=2, progress=False,
             log=lambda *a: None, cond_steps=(2,))


@pytest.mark.parametrize("change,expected", [
    (dict(steps=(0,)), "--steps 0: each step count must be between 1 and 1000"),
    (dict(cond_steps=(1001,)), "--cond_steps 1001: each step count must be between 1 and 1000"),
    (dict(search_steps=0), "--search_steps 0: each step count"),
    (dict(seeds=()), "--seeds needs at least one seed"),
    (dict(num_samples=1), "--num_samples must be at least 2"),
    (dict(batch_size=0), "--batch_size must be at least 1"),
    (dict(guidance_scale=-1.0), "--guidance_scale must be >= 0"),
])
def test_demo_settings_it_cannot_run_are_refused_before_anything_is_written(tmp_path, change, expected):
    with pytest.raises(UsageError) as refused:
        run_demo(tmp_path / "out", **{**QUICK, **change})
    assert expected in str(refused.value)
    assert not (tmp_path / "out").exists()


def test_demo_output_folder_problems_are_one_line(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder; choose another --output_dir"):
        run_demo(tmp_path / "a_file", **QUICK)
    with pytest.raises(UsageError, match=r"cannot write to output folder .* choose a writable --output_dir"):
        run_demo(tmp_path / "a_file" / "sub", **QUICK)
    out = tmp_path / "out"
    out.mkdir()
    with locked(folder_lock_file(out), "another demo"):  # held by another run (the lock is per process)
        code = (f"from guided_diffusion.digits.demo import run_demo; run_demo({str(out)!r}, num_samples=4, "
                "batch_size=4, seeds=(0,), steps=(2,), search_steps=2, progress=False, cond_steps=(2,))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)))
        assert r.returncode != 0 and f"output folder {out} is in use by another run" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == []  # the refused run wrote nothing
    # a search cache of other settings names the demo's own way out
    (out / "lambda_cache.json").write_text(json.dumps({"context": {"num_samples": 99}, "values": {}}))
    with pytest.raises(UsageError, match="holds values for other settings .*choose another --output_dir"):
        run_demo(out, **QUICK)

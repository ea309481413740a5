"""Time-Shift on the sample scripts: TS-DPM-ADM's flags, the sidecar's record of the shifted
timesteps, batch-size invariance, and one-line refusals where no Time-Shift rule is defined."""

import json
from collections import Counter

import numpy as np
import pytest
from sample_scripts import TINY, TINY_FLAGS, run_in_process, run_script, tiny_models  # noqa: F401

from guided_diffusion import script_util as su
from guided_diffusion.time_shift import TimeShift

SHIFT_FLAGS = ["--do_time_shift=True", "--window=12", "--cutoff=4"]


def sample(folder, out, *flags):
    run_in_process("image_sample.py", *TINY_FLAGS, f"--model_path={folder / 'uncond.pt'}", "--num_samples=5",
                   f"--output_dir={out}", "--seed=3", *flags)
    (npz,) = out.glob("samples_*.npz")
    return np.load(npz)["arr_0"], json.loads(npz.with_suffix(".json").read_text())


def expected_record(folder, use_ddim):
    """The chosen timesteps of the five images, from the diffusion's own loop called here."""
    import torch

    from guided_diffusion.image_noise import ImageNoise

    model, diffusion = su.create_model_and_diffusion(**dict(su.model_and_diffusion_defaults(), **TINY,
                                                            timestep_respacing="6"))
    model.load_state_dict(torch.load(folder / "uncond.pt", weights_only=True))
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    record = []
    with torch.no_grad():
        loop(model.eval(), (5, 3, 8, 8), generator=ImageNoise(3, range(5)), time_shift=TimeShift(12, 4),
             time_shift_record=record)
    return [Counter(int(t) for t in step) for step in record]


@pytest.mark.parametrize("use_ddim", [True, False])
def test_the_sidecar_records_every_images_shifted_timesteps_in_any_batch(tiny_models, tmp_path, use_ddim):
    mode = [f"--use_ddim={use_ddim}"]
    shifted, sidecar = sample(tiny_models, tmp_path / "a", *mode, *SHIFT_FLAGS, "--batch_size=2")
    again, _ = sample(tiny_models, tmp_path / "b", *mode, *SHIFT_FLAGS, "--batch_size=5")
    assert np.array_equal(shifted, again)
    assert sidecar["do_time_shift"] is True and sidecar["window"] == 12 and sidecar["cutoff"] == 4
    if use_ddim:  # the plain run once: it differs, and its sidecar has no shift record
        plain, plain_sidecar = sample(tiny_models, tmp_path / "c", *mode, "--batch_size=5")
        assert not np.array_equal(shifted, plain)
        assert "time_shift_timesteps" not in plain_sidecar and plain_sidecar["do_time_shift"] is False
        # off, the flags decide no pixel: not in the identity a resume compares (earlier folders resume)
        assert "window" not in plain_sidecar["run_identity"] and sidecar["run_identity"]["window"] == 12
    steps = sidecar["time_shift_timesteps"]
    assert [s["step"] for s in steps] == list(range(6))
    got = [Counter({int(t): n for t, n in s["timesteps"].items()}) for s in steps]
    assert got == expected_record(tiny_models, use_ddim)
    scheduled = sorted(int(t) for t in su.space_timesteps(40, "6"))
    # independent of the loop: every image counted at every step; the first step (from x_T) is
    # never shifted, so all five go to the scheduled next timestep; the last one goes to x_0 (-1)
    assert all(sum(c.values()) == 5 for c in got)
    assert got[0] == Counter({scheduled[-2]: 5}) and got[-1] == Counter({-1: 5})
    assert any(set(c) - set(scheduled) - {-1} for c in got)  # some image did move off the grid


@pytest.mark.parametrize("flags,line,run", [
    (["--window=-2"], "time shift window must be >= 0, got -2", run_script),  # once as a user runs it: a child
    (["--cutoff=40"], "time shift cutoff 40 is outside 0..39", run_in_process),
    (["--time_shift_rule=tsdpm_adm", "--use_ddim=False", "--cutoff=4"], "tsdpm_adm", run_in_process),
])
def test_bad_time_shift_flags_are_one_line(tiny_models, tmp_path, flags, line, run):
    proc = run("image_sample.py", *TINY_FLAGS, f"--model_path={tiny_models / 'uncond.pt'}", "--num_samples=2",
               f"--output_dir={tmp_path / 'out'}", "--do_time_shift=True", *flags, check=False)
    assert proc.returncode == 2 and line in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()  # refused before the output folder is made


def test_samplers_without_a_time_shift_rule_refuse_it_before_writing(tmp_path):
    proc = run_script("edm_sample.py", "--network=missing.pkl", f"--output_dir={tmp_path / 'out'}",
                      "--do_time_shift=True", check=False)
    assert proc.returncode == 2 and "--do_time_shift is defined for ADM's ancestral and DDIM loops only" in proc.stderr
    assert not (tmp_path / "out").exists()

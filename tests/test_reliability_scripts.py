"""The sampling scripts under the faults a new user meets, run as the user runs them: two runs on
one folder (one rank or two), kill -9, NaN weights, a diverging network, a full disk, damaged
inputs. Each ends with exit status 2 and one ``error:`` line (no traceback), writes nothing of the
failed work, and a rerun gives the bytes of an uninterrupted run. What needs processes (a second
run, a lock held by another one, kill -9, a launcher) runs them; the rest runs in this process."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sample_scripts import (  # noqa: F401 (tiny_models: a fixture)
    ROOT, TINY_FLAGS, run_in_process, run_script, script_env, tiny_models,
)

MPIRUN = ("mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root")


def _flags(models, out, num, batch, *extra, model="uncond.pt"):
    return [*TINY_FLAGS, f"--model_path={models / model}", f"--num_samples={num}", f"--batch_size={batch}",
            f"--output_dir={out}", "--progress=False", *extra]


def _error_line(proc):
    """The one ``error:`` line of a failed script (any launcher's own banner aside)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr[-3000:]
    return errors[0]


def _only_line(proc):
    line = _error_line(proc)
    assert [l for l in proc.stderr.splitlines() if l.strip()] == [line], proc.stderr[-3000:]
    return line


def _wait_for_shards(out, count, proc, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline and len(list((out / "shards").glob("shard-*.npz"))) < count:
        assert proc.poll() is None, "the run ended before it was interrupted"
        time.sleep(0.05)


def test_two_runs_on_one_folder_never_mix(tmp_path, tiny_models):
    out = tmp_path / "shared"
    flags = _flags(tiny_models, out, 400, 1)  # long enough to be running throughout
    first = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "image_sample.py"), *flags], env=script_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_shards(out, 1, first)
        # the same settings, other settings, and two ranks: all refused while the first run holds it
        for extra, launcher in (((), ()), (("--seed=5",), ()), (("--seed=5",), MPIRUN)):
            if launcher and shutil.which("mpirun") is None:
                continue
            before = {p.name for p in (out / "shards").glob("shard-*.npz")}  # written (not the one being written)
            proc = run_script("image_sample.py", *_flags(tiny_models, out, 400, 1, *extra), launcher=launcher,
                              check=False)
            line = _error_line(proc) if launcher else _only_line(proc)
            assert f"output folder {out} is in use by another run (pid {first.pid}" in line
            assert first.poll() is None, "the first run finished: the refusal was not tested"
            assert {p.name for p in (out / "shards").glob("shard-*.npz")} >= before  # nothing of it was removed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert len(list((out / "shards").glob("shard-*.npz"))) >= 1
    assert (out / ".lock").exists()  # left by kill -9, but not locked: the next run goes ahead
    # image i is a function of (seed, i): finish the first 12 images from the killed run's shards
    run_script("image_sample.py", *_flags(tiny_models, out, 12, 4))  # a process that ends: the lock file goes
    clean = tmp_path / "clean"
    run_in_process("image_sample.py", *_flags(tiny_models, clean, 12, 5))
    assert (out / "samples_12x8x8x3.npz").read_bytes() == (clean / "samples_12x8x8x3.npz").read_bytes()
    assert not (out / ".lock").exists() and not list(out.rglob("*.tmp*"))


@pytest.fixture(scope="module")
def bad_models(tiny_models):
    """A checkpoint with a NaN weight, and one with finite weights whose outputs overflow."""
    state = torch.load(tiny_models / "uncond.pt", weights_only=True)
    nan = {k: v.clone() for k, v in state.items()}
    nan["out.2.weight"].view(-1)[0] = float("nan")
    torch.save(nan, tiny_models / "nan.pt")
    huge = {k: v.clone() for k, v in state.items()}
    huge["input_blocks.0.0.weight"] *= 1e38
    torch.save(huge, tiny_models / "huge.pt")
    return tiny_models


def _nothing_sampled(out):
    assert not list(out.rglob("*.npz")) and not list(out.rglob("*.tmp*")) and not (out / ".lock").exists()


def test_non_finite_values_never_become_black_images(tmp_path, bad_models):
    out = tmp_path / "nan"
    line = _only_line(run_in_process("image_sample.py", *_flags(bad_models, out, 3, 2, model="nan.pt"), check=False))
    assert "nan.pt holds NaN or infinite weights in 1 tensor (first out.2.weight)" in line
    _nothing_sampled(out)
    line = _only_line(run_in_process("image_sample.py", *_flags(bad_models, out, 3, 2, model="huge.pt"), check=False))
    assert "network returned NaN or infinite values at network evaluation 1 of batch 0-1 (t = 39)" in line
    assert "for images 0-1; nothing of this batch was written" in line
    _nothing_sampled(out)


def test_values_that_would_diverge_are_refused_before_sampling(tmp_path, tiny_models):
    out = tmp_path / "never"
    cases = [
        (("--noise_schedule=linear", "--diffusion_steps=20", "--timestep_respacing="), "has betas up to 1"),
        (("--noise_schedule=linear", "--diffusion_steps=10", "--timestep_respacing="), "has betas up to 2"),
        (("--image_size=0",), "--image_size must be at least 1, got 0"),
        (("--diffusion_steps=1", "--timestep_respacing="), "--diffusion_steps must be at least 2"),
    ]
    for extra, expected in cases:
        assert expected in _only_line(run_in_process("image_sample.py", *_flags(tiny_models, out, 2, 2, *extra),
                                                     check=False))
    guided = [*_flags(tiny_models, out, 2, 2, model="cond.pt"), "--class_cond=True", "--num_classes=10",
              f"--classifier_path={tiny_models / 'classifier.pt'}", "--classifier_width=32", "--classifier_depth=1",
              "--classifier_attention_resolutions=4", "--classifier_channel_mult=1,2"]
    for scale in ("nan", "inf", "-inf"):
        line = _only_line(run_in_process("classifier_sample.py", *guided, f"--classifier_scale={scale}", check=False))
        assert "--classifier_scale must be a finite number" in line
    assert not out.exists()


def test_damaged_base_samples_and_labels_out_of_range(tmp_path, tiny_models):
    sr = ["--large_size=64", "--small_size=16", "--num_channels=32", "--num_res_blocks=1", "--progress=False",
          f"--model_path={tiny_models / 'uncond.pt'}", f"--output_dir={tmp_path / 'sr'}"]
    good = tmp_path / "base.npz"
    np.savez(good, arr_0=np.zeros((3, 16, 16, 3), np.uint8), arr_1=np.array([0, 5, 1000]))
    raw = good.read_bytes()
    cases = {
        "empty.npz": (b"", "cannot read --base_samples"),
        "cut.npz": (raw[: len(raw) // 2], "cannot read --base_samples"),
        "text.npz": (b"not an archive at all", "cannot read --base_samples"),
    }
    for name, (content, expected) in cases.items():
        (tmp_path / name).write_bytes(content)
        line = _only_line(run_in_process("super_res_sample.py", *sr, f"--base_samples={tmp_path / name}", check=False))
        assert expected in line and name in line
    line = _only_line(run_in_process("super_res_sample.py", *sr, f"--base_samples={tmp_path / 'nope.npz'}",
                                     check=False))
    assert "does not exist" in line
    line = _only_line(run_in_process("super_res_sample.py", *sr, "--class_cond=True", f"--base_samples={good}",
                                     check=False))
    assert "has labels from 0 to 1000; this upsampler knows classes 0..999" in line
    assert not (tmp_path / "sr").exists()


TMPFS = Path("/tmp") / f"gd_es_scripts_tmpfs_{os.getpid()}"


@pytest.fixture
def tiny_disk():
    TMPFS.mkdir(exist_ok=True)
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=32k", "tmpfs", str(TMPFS)], capture_output=True).returncode == 0
    if not mounted:
        TMPFS.rmdir()
        pytest.skip("cannot mount a small tmpfs here (needs root); tests/test_reliability_sample_io.py simulates ENOSPC")
    try:
        yield TMPFS
    finally:
        subprocess.run(["umount", str(TMPFS)], check=False)
        TMPFS.rmdir()


def test_a_full_disk_is_one_line_and_the_rerun_after_freeing_space_resumes(tmp_path, tiny_models, tiny_disk):
    out = tiny_disk / "out"
    proc = run_in_process("image_sample.py", *_flags(tiny_models, out, 120, 20), check=False)
    line = _only_line(proc)
    assert "no space left on" in line and "rerun the same command" in line
    assert not list(out.rglob("*.tmp*")) and not (out / ".lock").exists()
    assert len(list((out / "shards").glob("shard-*.npz"))) < 6
    subprocess.run(["mount", "-o", "remount,size=4m", str(tiny_disk)], check=True)
    run_in_process("image_sample.py", *_flags(tiny_models, out, 120, 20))
    clean = tmp_path / "clean"
    run_in_process("image_sample.py", *_flags(tiny_models, clean, 120, 30))
    assert (out / "samples_120x8x8x3.npz").read_bytes() == (clean / "samples_120x8x8x3.npz").read_bytes()


def _hold(lock_file):
    code = ("import sys, time; from adm_common.files import acquire_lock; "
            "acquire_lock(sys.argv[1], 'x'); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lock_file)], stdout=subprocess.PIPE, env=script_env())
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_npz_to_png_has_one_writer_and_sweeps_partial_folders_of_killed_runs(tmp_path):
    batch = tmp_path / "b.npz"
    np.savez(batch, arr_0=np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3))
    out = tmp_path / "png"
    holder = _hold(tmp_path / ".png.lock")
    try:
        line = _only_line(run_script("npz_to_png.py", str(batch), str(out), "--no-progress", check=False))
        assert f"output folder {out} is in use by another run (pid {holder.pid}" in line
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    stale = tmp_path / "png.tmp99999"  # what a killed run leaves
    stale.mkdir()
    (stale / "000000.png").write_bytes(b"half")
    mine = tmp_path / "png.tmp_notes"
    mine.mkdir()
    run_script("npz_to_png.py", str(batch), str(out), "--no-progress")
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png"]
    assert not stale.exists() and mine.exists() and not (tmp_path / ".png.lock").exists()
    cut = tmp_path / "cut.npz"
    cut.write_bytes(batch.read_bytes()[:-30])
    flipped = bytearray(batch.read_bytes())
    flipped[flipped.index(b"\x93NUMPY") + 130] ^= 0xFF  # one damaged byte in the images: a CRC error
    (tmp_path / "crc.npz").write_bytes(bytes(flipped))
    for name, expected in (("cut.npz", "not an .npz file"), ("crc.npz", "is damaged (Bad CRC-32")):
        line = _only_line(run_in_process("npz_to_png.py", str(tmp_path / name), str(tmp_path / "png2"), "--no-progress",
                                         check=False))
        assert expected in line
        assert not (tmp_path / "png2").exists() and not list(tmp_path.glob("png2.tmp*"))


def test_nan_bits_per_dim_are_refused_and_nothing_is_written(tmp_path, bad_models):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i in range(2):
        Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "nll"
    flags = [f for f in TINY_FLAGS if not f.startswith("--progress")]
    proc = run_in_process("image_nll.py", *flags, f"--model_path={bad_models / 'huge.pt'}", f"--data_dir={data}",
                          "--num_samples=2", "--batch_size=2", f"--output_dir={out}", check=False)
    assert "came out NaN or infinite for images 0 to 1; nothing was written" in _only_line(proc)
    assert not (out / "bpd.json").exists() and not list(out.rglob("*.tmp*"))


def test_exposure_bias_has_one_writer_per_folder(tmp_path, tiny_models):
    out = tmp_path / "eb"
    out.mkdir()
    holder = _hold(out / ".lock")
    try:
        flags = [f for f in TINY_FLAGS if not f.startswith("--progress")]
        proc = run_script("exposure_bias.py", *flags, f"--model_path={tiny_models / 'uncond.pt'}",
                          "--data_dir=digits", "--num_images=2", f"--output_dir={out}", check=False)
        assert f"output folder {out} is in use by another run (pid {holder.pid}" in _only_line(proc)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]

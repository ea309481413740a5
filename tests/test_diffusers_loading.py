"""Loading a pipeline for scripts/diffusers_sample.py: nothing of diffusers', transformers' or
huggingface_hub's notices and progress bars reaches the console, and every failure is one
`error: ...` line with exit status 2. The script runs offline, with its own Hugging Face cache: as
a user runs it (a subprocess) where it samples, in this process (``refused``) where it refuses.
"""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed: pip install 'guided-diffusion-es[diffusers]'"
)

from guided_diffusion.bridges.diffusers_es import load_pipeline, quiet_loading, sample_images  # noqa: E402
from adm_common.errors import UsageError  # noqa: E402
from guided_diffusion.run.output import quantize  # noqa: E402
from diffusers_models import ROOT, TRAIN_STEPS, sample_in_process, tiny_ldm  # noqa: E402

# Settings that would hide the libraries' output whatever the code does.
QUIETING_ENV = ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS",
                "TRANSFORMERS_NO_ADVISORY_WARNINGS", "PYTHONWARNINGS", "TQDM_DISABLE")


def tiny_text_to_image(folder):
    """A StableDiffusionPipeline with a real (tiny) CLIP text encoder and tokenizer, saved."""
    transformers = pytest.importorskip("transformers", reason="a text-to-image pipeline needs transformers")
    words = folder.parent / "words"
    words.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "b</w>": 3, "a": 4, "b": 5}
    (words / "vocab.json").write_text(json.dumps(vocab))
    (words / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=8,
    ))
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    )
    vae = diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=transformers.CLIPTokenizer(str(words / "vocab.json"),
                                                                                 str(words / "merges.txt")),
        unet=unet, scheduler=diffusers.DDIMScheduler(num_train_timesteps=TRAIN_STEPS),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    with quiet_loading():  # saving prints its own notices; they are not what is tested
        pipe.save_pretrained(folder)
    return folder


def cache_as_model_id(cache, model_id, folder, only=None):
    """Put a saved pipeline into a Hugging Face cache as model ``model_id`` (only the files
    ``only``, when given), laid out as the hub client lays out what it downloads."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{model_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    if only is None:
        shutil.copytree(folder, snapshot)
    else:
        snapshot.mkdir(parents=True)
        for name in only:
            shutil.copy(folder / name, snapshot / name)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    ldm = root / "ldm"
    tiny_ldm().save_pretrained(ldm)
    broken = root / "broken"  # a pipeline folder whose UNet lost its weights
    shutil.copytree(ldm, broken)
    for weights in (broken / "unet").glob("diffusion_pytorch_model.*"):
        weights.unlink()
    config = broken / "scheduler" / "scheduler_config.json"  # and whose scheduler config diffusers warns about
    config.write_text(json.dumps(dict(json.loads(config.read_text()), unknown_setting=1)))
    text_to_image = tiny_text_to_image(root / "text_to_image")
    cache = root / "hub_cache"
    cache_as_model_id(cache, "tiny/ldm", ldm)
    cache_as_model_id(cache, "tiny/text-to-image", text_to_image, only=["model_index.json"])
    return dict(ldm=ldm, broken=broken, text_to_image=text_to_image, cache=cache, empty=root / "empty")


def run_script(models, *flags):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               HF_HOME=str(models["cache"].parent / "hf_home"), HF_HUB_CACHE=str(models["cache"]))
    for name in ("OPENAI_LOGDIR", *QUIETING_ENV):
        env.pop(name, None)
    cmd = [sys.executable, str(ROOT / "scripts" / "diffusers_sample.py"), "--progress=False", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def refused(models, monkeypatch, capfd, *flags):
    """diffusers_sample.py FLAGS in this process (``sample_in_process``: warnings and the libraries'
    log messages to its stderr), offline with the models' Hugging Face cache, with diffusers',
    transformers' and huggingface_hub's logging and progress bars as a fresh process has them;
    what reached stdout and stderr, the descriptors included (capfd).

    huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported (long before this
    run), so they are set on its constants here."""
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging
    from huggingface_hub import constants

    libraries = [diffusers_logging]
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as transformers_logging

        libraries.append(transformers_logging)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(models["cache"]))
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    hub_before = (hub.logging.get_verbosity(), hub.are_progress_bars_disabled())
    for lib in libraries:
        lib.set_verbosity_warning()
        lib.enable_progress_bar()
    hub.logging.set_verbosity_warning()
    hub.enable_progress_bars()
    capfd.readouterr()
    try:
        proc = sample_in_process(*flags, check=False, env=dict(
            HF_HUB_OFFLINE="1", HF_HOME=str(models["cache"].parent / "hf_home"), HF_HUB_CACHE=str(models["cache"])))
    finally:
        for lib, (verbosity, bars) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            (lib.enable_progress_bar if bars else lib.disable_progress_bar)()
        hub.logging.set_verbosity(hub_before[0])
        (hub.disable_progress_bars if hub_before[1] else hub.enable_progress_bars)()
    leaked = capfd.readouterr()
    proc.stdout, proc.stderr = proc.stdout + leaked.out, proc.stderr + leaked.err
    return proc


@pytest.mark.parametrize("model,message", [
    ("{text_to_image}", "--model {text_to_image} is a StableDiffusionPipeline, a text-to-image pipeline, which this "
                        "script cannot run: it samples the unconditional DDPMPipeline, DDIMPipeline and LDMPipeline; "
                        "in Python, guided_diffusion.bridges.diffusers_es.apply_eps_scaling(pipe, ...)"),
    ("tiny/text-to-image", "--model tiny/text-to-image is a StableDiffusionPipeline, a text-to-image pipeline"),
    ("{broken}", "cannot load the LDMPipeline of --model {broken}: "),
    ("google/ddpm-nope-32", "--model google/ddpm-nope-32 is not a folder here and not in the Hugging Face cache, "
                            "and HF_HUB_OFFLINE is set; download it with: hf download google/ddpm-nope-32"),
], ids=["text-to-image folder", "text-to-image model id, index only", "broken folder", "unknown model id offline"])
def test_a_pipeline_that_cannot_be_loaded_is_one_error_line_and_nothing_else(models, monkeypatch, capfd, tmp_path,
                                                                             model, message):
    out = tmp_path / "out"
    proc = refused(models, monkeypatch, capfd, f"--model={model.format(**models)}", f"--output_dir={out}")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.startswith("error: " + message.format(**models)), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    assert not out.exists()


def test_an_unknown_scheduler_is_one_error_line(models, monkeypatch, capfd, tmp_path):
    proc = refused(models, monkeypatch, capfd, f"--model={models['ldm']}", "--scheduler=heun",
                   f"--output_dir={tmp_path / 'out'}")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: argument --scheduler: invalid choice: 'heun'") and proc.stderr.count("\n") == 1
    assert "pipeline" in proc.stderr and "euler_ancestral" in proc.stderr  # the choices are named


def test_a_cached_model_id_loads_silently_offline_and_samples_as_its_folder_does(models, tmp_path):
    out = tmp_path / "out"
    proc = run_script(models, "--model=tiny/ldm", "--steps=2", "--num_samples=2", "--batch_size=2", "--seed=4",
                      f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr == ""
    images = np.load(out / "samples_2x16x16x3.npz")["arr_0"]
    expected = quantize(sample_images(load_pipeline(str(models["ldm"])), 4, [0, 1], 2))
    assert np.array_equal(images, expected)


@pytest.mark.parametrize("make,message", [
    (lambda d: d.mkdir(), "--model {d} has no model_index.json, so it is not a diffusers pipeline folder; give a "
                          "folder written by pipe.save_pretrained(...) or a model id such as google/ddpm-cifar10-32"),
    (lambda d: d.mkdir() or (d / "model_index.json").write_text("{not json"),
     "{d}/model_index.json is not a diffusers model_index.json (Expecting property name"),
    (lambda d: d.mkdir() or (d / "model_index.json").write_text('{"unet": ["diffusers", "UNet2DModel"]}'),
     "{d}/model_index.json is not a diffusers model_index.json (it names no _class_name)"),
    (lambda d: d.write_bytes(b"weights"), "--model {d} is a file; give the pipeline's folder"),
    (lambda d: None, "--model {d}: there is no such folder, and it is not a model id (owner/name)"),
], ids=["empty folder", "bad json", "no class", "a file", "no such path"])
def test_a_folder_that_is_not_a_pipeline_is_one_error_line(tmp_path, make, message):
    target = tmp_path / "model"
    make(target)
    proc = sample_in_process(f"--model={target}", f"--output_dir={tmp_path / 'out'}", check=False)
    code, err = proc.returncode, proc.stderr
    assert code == 2 and err.startswith("error: " + message.format(d=target)) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_quiet_loading_silences_the_libraries_inside_and_restores_them_after():
    transformers_logging = pytest.importorskip("transformers.utils.logging")
    import huggingface_hub.utils as hub
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_info()
    diffusers_logging.enable_progress_bar()
    transformers_logging.set_verbosity_warning()
    hub.enable_progress_bars()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a warning that got through would raise here
            with quiet_loading():
                assert diffusers_logging.get_verbosity() > 50 and transformers_logging.get_verbosity() > 50
                assert hub.logging.get_verbosity() > 50
                assert not diffusers_logging.is_progress_bar_enabled()
                assert not transformers_logging.is_progress_bar_enabled() and hub.are_progress_bars_disabled()
                warnings.warn("a notice while loading", FutureWarning)
            with pytest.raises(UserWarning):
                warnings.warn("a warning after loading")
        assert diffusers_logging.get_verbosity() == 20 and transformers_logging.get_verbosity() == 30
        assert diffusers_logging.is_progress_bar_enabled() and not hub.are_progress_bars_disabled()
        with pytest.raises(UsageError), quiet_loading():  # restored when loading fails too
            raise UsageError("x")
        assert diffusers_logging.get_verbosity() == 20
    finally:
        diffusers_logging.set_verbosity_warning()

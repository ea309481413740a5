"""Every pipeline/scheduler pairing that scripts/diffusers_sample.py accepts gives, image by image,
what the scheduler's own loop gives for that image alone, in any batch and from the first batch
on; every other pairing is refused in one line before a network runs.

The expected images come from ``scheduler_loop`` below: a fresh scheduler built from the same
config, driven the way diffusers documents its schedulers (set_timesteps, x_T * init_noise_sigma,
scale_model_input, step with the image's generator), the noise divided by lambda_t by hand. It
uses nothing of the bridge.
"""

import re

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed: pip install 'guided-diffusion-es[diffusers]'"
)

from guided_diffusion.bridges.diffusers_es import (  # noqa: E402
    SCHEDULER_FLAGS,
    apply_eps_scaling,
    check_pairing,
    eps_scaling,
    load_pipeline,
    sample_images,
    use_scheduler,
)
from adm_common.errors import UsageError  # noqa: E402
from guided_diffusion.image_noise import image_generator  # noqa: E402
from diffusers_models import (  # noqa: E402
    TRAIN_STEPS, linear_scheduler, make_pipe, quiet, sample_in_process, tiny_ldm, tiny_unet,
)

SEED, STEPS, K, B = 11, 3, 0.01, 1.02
SPEC = f"linear:k={K},b={B}"


@torch.no_grad()
def scheduler_loop(pipe, scheduler, index, num_steps, k, b, eta=None):
    """Image ``index`` alone, by the scheduler's documented loop, with eps / lambda_t, in [-1, 1]."""
    scheduler.set_timesteps(num_steps)
    gen = image_generator(SEED, index)
    unet = pipe.unet
    channels, size = unet.config.in_channels, unet.config.sample_size
    x = torch.randn((1, channels, size, size), generator=gen) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        out = unet(scheduler.scale_model_input(x, t), t).sample
        lam = k * (num_steps - 1 - i) + b
        out = torch.cat([out[:, :channels] / lam, out[:, channels:]], dim=1)  # a learned variance is kept
        extra = {} if eta is None else {"eta": eta}
        x = scheduler.step(out, t, x, generator=gen, **extra).prev_sample
    decoder = getattr(pipe, "vqvae", None)
    if decoder is not None:  # LDMPipeline decodes latents / scaling_factor
        x = decoder.decode(x / decoder.config.scaling_factor).sample
    return (x / 2 + 0.5).clamp(0, 1) * 2 - 1


# (pipeline, --scheduler, --eta): every pairing the script accepts, "pipeline" for each own scheduler
ACCEPTED = [
    ("ddpm_learned", "pipeline", 0.0), ("ddpm_learned", "ddpm", 0.0), ("ddpm_learned", "dpmsolver", 0.0),
    ("ddpm", "pipeline", 0.0), ("ddpm", "ddim", 0.0), ("ddpm", "dpmsolver", 0.0),
    ("ddim", "pipeline", 0.0), ("ddim", "ddim", 0.5),
    ("ldm", "pipeline", 0.0), ("ldm", "ddim", 0.5), ("ldm", "ddpm", 0.0), ("ldm", "euler", 0.0),
    ("ldm", "euler_ancestral", 0.0), ("ldm", "dpmsolver", 0.0), ("ldm_sde", "pipeline", 0.0),
]


@pytest.mark.parametrize("kind,flag,eta", ACCEPTED, ids=[f"{p}-{s}-eta{e}" for p, s, e in ACCEPTED])
def test_accepted_pairing_equals_the_schedulers_own_loop_from_the_first_batch_in_any_batch(kind, flag, eta):
    pipe = make_pipe(kind)
    config = pipe.scheduler.config
    cls = type(pipe.scheduler) if flag == "pipeline" else getattr(diffusers, SCHEDULER_FLAGS[flag])
    use_scheduler(pipe, flag)
    assert type(pipe.scheduler) is cls
    apply_eps_scaling(pipe, SPEC)
    first = sample_images(pipe, SEED, [0, 1, 2], STEPS, network_batch=4, eta=eta)  # a fresh pipeline's first batch
    assert first.shape[0] == 3 and first.min() >= -1 and first.max() <= 1
    again = torch.cat([sample_images(pipe, SEED, [0], STEPS, network_batch=4, eta=eta),
                       sample_images(pipe, SEED, [1, 2], STEPS, network_batch=4, eta=eta)])
    assert torch.equal(first, again)  # bit for bit, whatever the batch and its place in the run
    step_eta = eta if cls is diffusers.DDIMScheduler else None  # only DDIM's step takes eta
    for index in range(3):
        expected = scheduler_loop(pipe, cls.from_config(config), index, STEPS, K, B, step_eta)
        torch.testing.assert_close(first[index:index + 1], expected, rtol=0, atol=2e-5)
    unscaled = scheduler_loop(pipe, cls.from_config(config), 0, STEPS, 0.0, 1.0, step_eta)
    assert (first[:1] - unscaled).abs().max() > 1e-4  # lambda acted, so the comparison above can fail


def test_the_euler_case_is_one_where_a_fresh_scheduler_reports_another_init_noise_sigma():
    """The LDM + Euler test above would fail without setting the timesteps first: LDMPipeline reads
    init_noise_sigma before it sets them, and a fresh Euler scheduler reports another value, so plain
    diffusers gives a first batch unlike the next one from the same generators."""
    pipe = make_pipe("ldm")
    use_scheduler(pipe, "euler")
    fresh = float(pipe.scheduler.init_noise_sigma)
    pipe.scheduler.set_timesteps(STEPS)
    assert abs(fresh - float(pipe.scheduler.init_noise_sigma)) > 0.1
    plain = make_pipe("ldm")
    use_scheduler(plain, "euler")

    def run():
        with torch.no_grad():
            return plain(batch_size=1, generator=[image_generator(SEED, 0)], num_inference_steps=STEPS,
                         output_type="np").images

    first, second = run(), run()
    assert np.abs(first - second).max() > 1e-3


def test_ldm_with_a_stochastic_step_draws_from_the_images_generators_not_the_global_one():
    """Plain LDMPipeline calls step without its generator: with DDPM its images follow torch's global
    seed. sample_images gives each step the image's own stream (so it equals the loop above)."""
    pipe = make_pipe("ldm")
    use_scheduler(pipe, "ddpm")

    def plain(global_seed):
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return pipe(batch_size=1, generator=[image_generator(SEED, 0)], num_inference_steps=STEPS,
                        output_type="np").images

    assert np.abs(plain(0) - plain(1)).max() > 1e-3
    torch.manual_seed(0)
    ours = sample_images(pipe, SEED, [0], STEPS)
    torch.manual_seed(1)
    assert torch.equal(sample_images(pipe, SEED, [0], STEPS), ours)
    assert "step" not in vars(pipe.scheduler)  # the generator hand-over is gone after sampling


def test_lambda_one_is_the_unscaled_sampler_bit_for_bit():
    for kind, flag in (("ldm", "euler"), ("ddpm_learned", "ddpm"), ("ldm", "euler_ancestral")):
        pipe = make_pipe(kind)
        use_scheduler(pipe, flag)
        plain = sample_images(pipe, SEED, [0, 1], STEPS)
        with eps_scaling(pipe, "1.0"):
            assert torch.equal(sample_images(pipe, SEED, [0, 1], STEPS), plain)


# (pipeline, --scheduler, --eta, --steps, the start of the one line)
REFUSED = [
    ("ddpm", "euler", 0.0, STEPS, "DDPMPipeline cannot drive EulerDiscreteScheduler: it neither multiplies its "
     "initial noise by init_noise_sigma nor calls scale_model_input, and EulerDiscreteScheduler needs both; "
     "use --scheduler ddpm, ddim or dpmsolver"),
    ("ddpm", "euler_ancestral", 0.0, STEPS, "DDPMPipeline cannot drive EulerAncestralDiscreteScheduler"),
    ("ddim", "ddpm", 0.0, STEPS, "DDIMPipeline cannot drive DDPMScheduler: it passes eta to scheduler.step, "
     "which only DDIMScheduler takes, and never calls scale_model_input; use --scheduler ddim"),
    ("ddim", "euler", 0.0, STEPS, "DDIMPipeline cannot drive EulerDiscreteScheduler"),
    ("ddim", "euler_ancestral", 0.0, STEPS, "DDIMPipeline cannot drive EulerAncestralDiscreteScheduler"),
    ("ddim", "dpmsolver", 0.0, STEPS, "DDIMPipeline cannot drive DPMSolverMultistepScheduler"),
    ("ddpm_learned", "ddim", 0.0, STEPS, "the UNet predicts noise and variance (6 channels for a 3-channel "
     "sample), which DDIMScheduler cannot read; use --scheduler ddpm or dpmsolver"),
    ("ddpm", "ddim", 0.5, STEPS, "--eta 0.5: DDPMPipeline takes no eta"),
    ("ldm", "ddpm", 0.5, STEPS, "--eta 0.5 only applies to DDIMScheduler, not DDPMScheduler"),
    ("ldm", "euler", 0.0, TRAIN_STEPS + 1, f"--steps {TRAIN_STEPS + 1}: the model takes 1 to {TRAIN_STEPS} steps"),
    ("ldm_pndm", "pipeline", 0.0, STEPS, "the pipeline's scheduler PNDMScheduler is not one Epsilon Scaling "
     "supports; use --scheduler ddpm, ddim, euler, euler_ancestral or dpmsolver"),
]


@pytest.mark.parametrize("kind,flag,eta,steps,message", REFUSED,
                         ids=[f"{p}-{s}-eta{e}-steps{n}" for p, s, e, n, _ in REFUSED])
def test_other_pairings_are_refused_in_one_line_before_a_network_runs(kind, flag, eta, steps, message):
    pipe = make_pipe(kind)
    use_scheduler(pipe, flag)
    calls = []
    pipe.unet.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(UsageError) as refused:
        check_pairing(pipe, steps, eta)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        sample_images(pipe, SEED, [0], steps, eta=eta)
    assert calls == []


def test_a_learned_variance_the_scheduler_is_not_told_of_is_refused():
    pipe = quiet(diffusers.DDPMPipeline(unet=tiny_unet(out_channels=6),
                                        scheduler=linear_scheduler(diffusers.DDPMScheduler)))
    with pytest.raises(UsageError, match="variance_type is 'fixed_small'; set variance_type to learned_range"):
        check_pairing(pipe, STEPS)
    pipe = quiet(diffusers.DDPMPipeline(unet=tiny_unet(), scheduler=linear_scheduler(
        diffusers.DDPMScheduler, variance_type="learned_range")))
    with pytest.raises(UsageError, match="variance_type is 'learned_range', but the UNet predicts no variance"):
        check_pairing(pipe, STEPS)


def test_the_refused_pairings_are_wrong_in_plain_diffusers():
    """Why they are refused: DDPMPipeline runs Euler on unscaled noise and inputs (far from Euler's
    own loop); DDIMPipeline hands DDPMScheduler an eta it cannot take."""
    pipe = make_pipe("ddpm")
    config = pipe.scheduler.config
    use_scheduler(pipe, "euler")
    with torch.no_grad():
        plain = pipe(batch_size=1, generator=[image_generator(SEED, 0)], num_inference_steps=STEPS,
                     output_type="pt").images * 2 - 1
    expected = scheduler_loop(pipe, diffusers.EulerDiscreteScheduler.from_config(config), 0, STEPS, 0.0, 1.0)
    assert (plain - expected).abs().max() > 0.05
    ddim = make_pipe("ddim")
    use_scheduler(ddim, "ddpm")
    with pytest.raises(TypeError, match="eta"), torch.no_grad():
        ddim(batch_size=1, num_inference_steps=STEPS, output_type="np")


# --- the script ---------------------------------------------------------------------------------


def test_script_ldm_with_euler_is_the_schedulers_loop_and_the_same_in_any_batch(tmp_path):
    folder = tmp_path / "ldm"
    saved = tiny_ldm()  # with its codebook: a VQModel saves and loads whole
    saved.scheduler = make_pipe("ldm").scheduler
    saved.save_pretrained(folder)
    outputs = {}
    for batch in (2, 3):
        out = tmp_path / f"batch{batch}"
        sample_in_process(f"--model={folder}", "--scheduler=euler", f"--steps={STEPS}", f"--eps_scale={SPEC}", f"--seed={SEED}",
            "--num_samples=3", f"--batch_size={batch}", f"--output_dir={out}")
        outputs[batch] = (out / "samples_3x16x16x3.npz").read_bytes()
    assert outputs[2] == outputs[3]
    images = np.load(tmp_path / "batch2" / "samples_3x16x16x3.npz")["arr_0"]
    pipe = load_pipeline(str(folder))
    for index in range(3):
        scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
        expected = scheduler_loop(pipe, scheduler, index, STEPS, K, B)
        expected = ((expected[0] + 1) * 127.5).clamp(0, 255).permute(1, 2, 0).numpy()
        assert np.abs(images[index].astype(np.float64) - expected).max() <= 1.0


def test_script_refuses_a_pairing_in_one_line_and_writes_nothing(tmp_path):
    folder = tmp_path / "ddpm"
    make_pipe("ddpm").save_pretrained(folder)
    out = tmp_path / "out"
    proc = sample_in_process(f"--model={folder}", "--scheduler=euler", "--steps=3", f"--output_dir={out}", check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: DDPMPipeline cannot drive EulerDiscreteScheduler")
    assert proc.stderr.count("\n") == 1
    assert not out.exists()

"""Epsilon Scaling inside unmodified diffusers pipelines, checked against steps computed by hand.

The models are tiny random diffusers networks built here, so everything runs offline. Expected
values come from the DDPM / DDIM formulas written out below with an independently computed
noise schedule, or from the same pipeline fed a network whose output is divided by lambda_t.
"""

import functools
import json
import math
import sys

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip(
    "diffusers", reason="diffusers is not installed: pip install 'guided-diffusion-es[diffusers]'"
)

from guided_diffusion.bridges.diffusers_es import (  # noqa: E402
    UNetNetwork,
    apply_eps_scaling,
    eps_scaling,
    image_shape,
    installed_eps_scale,
    load_pipeline,
    pipeline_weights_sha256,
    remove_eps_scaling,
    require_diffusers,
    sample_images,
    use_scheduler,
)
from guided_diffusion.eps_scaling import EpsScaleError  # noqa: E402
from adm_common.errors import UsageError  # noqa: E402
from guided_diffusion.image_noise import image_generator  # noqa: E402
from guided_diffusion.run.speed import optimize_for_sampling  # noqa: E402
from diffusers_models import (  # noqa: E402
    TRAIN_STEPS,
    linear_alphas_cumprod,
    linear_scheduler,
    quiet,
    sample_in_child,
    sample_in_process,
    tiny_ldm,
    tiny_unet,
)

def lam(spec_k: float, spec_b: float, step: int, num_steps: int) -> float:
    """lambda_t = k * t + b with t = num_steps - 1 - step: the paper's schedule, written out."""
    return spec_k * (num_steps - 1 - step) + spec_b


def divide_unet_output(unet, lambdas):
    """Make ``unet`` return its output divided by lambdas[k] on its k-th call (an independent ES)."""
    calls = []
    plain_forward = unet.forward

    def forward(*args, **kwargs):
        out = plain_forward(*args, **kwargs)
        lam_now = lambdas[len(calls)]
        calls.append(lam_now)
        if isinstance(out, tuple):  # return_dict=False
            return (out[0] / lam_now, *out[1:])
        out.sample = out.sample / lam_now
        return out

    unet.forward = forward
    return calls


@torch.no_grad()
def ddim_by_hand(unet, shape, seed, num_steps, k, b, clip):
    """DDIM (eta 0, leading spacing, final alpha 1) with eps / lambda_t, from the formulas."""
    abar = linear_alphas_cumprod()
    stride = TRAIN_STEPS // num_steps
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for i in range(num_steps):
        timestep = (num_steps - 1 - i) * stride
        a_t = abar[timestep].item()
        a_prev = abar[timestep - stride].item() if timestep >= stride else 1.0
        eps = unet(x, timestep).sample / lam(k, b, i, num_steps)
        x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
        if clip:
            x0 = x0.clamp(-1, 1)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    return (x / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def ddpm_learned_range_by_hand(unet, shape, gen, num_steps, k, b, scale_variance_too=False):
    """Ancestral DDPM with a learned-range variance (ADM's), eps / lambda_t, clipped x0; x_T and
    each step's noise drawn from ``gen`` in turn."""
    abar = linear_alphas_cumprod()
    stride = TRAIN_STEPS // num_steps
    x = torch.randn(shape, generator=gen)
    channels = shape[1]
    for i in range(num_steps):
        timestep = (num_steps - 1 - i) * stride
        a_t = abar[timestep].item()
        a_prev = abar[timestep - stride].item() if timestep >= stride else 1.0
        beta = 1 - a_t / a_prev
        out = unet(x, timestep).sample
        eps, v = out[:, :channels], out[:, channels:]
        eps = eps / lam(k, b, i, num_steps)
        if scale_variance_too:
            v = v / lam(k, b, i, num_steps)
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        mean = math.sqrt(a_prev) * beta / (1 - a_t) * x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
        if timestep > 0:
            posterior_var = max((1 - a_prev) / (1 - a_t) * beta, 1e-20)
            frac = (v + 1) / 2
            log_var = frac * math.log(beta) + (1 - frac) * math.log(posterior_var)
            x = mean + torch.exp(0.5 * log_var) * torch.randn(shape, generator=gen)
        else:
            x = mean
    return (x / 2 + 0.5).clamp(0, 1)


def run(pipe, steps, seed=0, **kwargs):
    with torch.no_grad():
        return pipe(
            batch_size=2, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="pt",
            **kwargs,
        ).images


@pytest.fixture(scope="module")
def ddim_pipe():
    return quiet(diffusers.DDIMPipeline(unet=tiny_unet(), scheduler=linear_scheduler(diffusers.DDIMScheduler)))


def as_tensor(images):
    return images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2)


# --- lambda = 1 is the plain pipeline, bit for bit ---------------------------------------------


@pytest.mark.parametrize("spec", [1.0, "1.0", "table:1,1,1,1"])
def test_lambda_one_reproduces_ddim_pipeline_exactly(ddim_pipe, spec):
    plain = run(ddim_pipe, 4)
    with eps_scaling(ddim_pipe, spec):
        scaled = run(ddim_pipe, 4)
    assert torch.equal(plain, scaled)


def test_lambda_one_reproduces_ddpm_pipeline_exactly():
    scheduler = linear_scheduler(diffusers.DDPMScheduler, variance_type="learned_range")
    pipe = quiet(diffusers.DDPMPipeline(unet=tiny_unet(out_channels=6), scheduler=scheduler))
    plain = run(pipe, 5)
    apply_eps_scaling(pipe, "1")
    assert torch.equal(plain, run(pipe, 5))


# --- lambda != 1 equals the step written out by hand -------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
def test_ddim_pipeline_with_linear_lambda_matches_hand_computed_ddim(clip):
    unet = tiny_unet()
    scheduler = linear_scheduler(diffusers.DDIMScheduler, clip_sample=clip)
    pipe = quiet(diffusers.DDIMPipeline(unet=unet, scheduler=scheduler))
    k, b = 0.02, 1.05
    with eps_scaling(pipe, f"linear:k={k},b={b}"):
        run(pipe, 4)  # a first run with another step count: the second must not inherit its position
        scaled = run(pipe, 5)
    expected = ddim_by_hand(unet, (2, 3, 8, 8), seed=0, num_steps=5, k=k, b=b, clip=clip)
    torch.testing.assert_close(scaled, expected, rtol=0, atol=2e-5)
    # the same hand computation with the lambdas in reverse order is far from it
    reversed_lambdas = ddim_by_hand(unet, (2, 3, 8, 8), seed=0, num_steps=5, k=-k, b=b + k * 4, clip=clip)
    assert (scaled - reversed_lambdas).abs().max() > 1e-3


def test_ddpm_learned_variance_scales_only_the_noise_channels():
    unet = tiny_unet(out_channels=6)
    scheduler = linear_scheduler(diffusers.DDPMScheduler, variance_type="learned_range", clip_sample=True)
    pipe = quiet(diffusers.DDPMPipeline(unet=unet, scheduler=scheduler))
    k, b = 0.01, 1.03
    apply_eps_scaling(pipe, f"linear:k={k},b={b}")
    scaled = run(pipe, 5, seed=3)
    expected = ddpm_learned_range_by_hand(unet, (2, 3, 8, 8), torch.Generator().manual_seed(3), 5, k, b)
    torch.testing.assert_close(scaled, expected, rtol=0, atol=2e-5)
    variance_scaled = ddpm_learned_range_by_hand(
        unet, (2, 3, 8, 8), torch.Generator().manual_seed(3), 5, k, b, scale_variance_too=True
    )
    assert (scaled - variance_scaled).abs().max() > 1e-4


SCHEDULERS = [
    (diffusers.DDPMScheduler, {}),
    (diffusers.DDIMScheduler, {}),
    (diffusers.EulerDiscreteScheduler, {}),
    (diffusers.EulerAncestralDiscreteScheduler, {}),
    (diffusers.DPMSolverMultistepScheduler, {}),
    (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
]


def step_through(scheduler, num_steps, divide_by, start=0):
    """Run ``scheduler`` from timestep index ``start`` with a fixed smooth 'network'; ``divide_by(i)``
    divides its output at timestep index i (None: leave it as it is)."""
    scheduler.set_timesteps(num_steps)
    if start and hasattr(scheduler, "set_begin_index"):  # how image-to-image pipelines start part-way
        scheduler.set_begin_index(start)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(2)
    for i, t in enumerate(scheduler.timesteps[start:], start=start):
        model_input = scheduler.scale_model_input(x, t)
        eps = torch.tanh(model_input) * 0.8 + 0.1 * model_input
        if divide_by is not None:
            eps = eps / divide_by(i)
        x = scheduler.step(eps, t, x, generator=gen).prev_sample
    return x


@pytest.mark.parametrize("cls,options", SCHEDULERS, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("start", [0, 2])
def test_every_scalable_scheduler_sees_the_noise_divided_by_lambda_t(cls, options, start):
    num_steps, k, b = 6, 0.004, 0.98
    scaled = linear_scheduler(cls, **options)
    apply_eps_scaling(scaled, f"linear:k={k},b={b}")
    step_through(scaled, 4, None)  # a run of another length first: it must leave no trace
    got = step_through(scaled, num_steps, None, start)
    expected = step_through(linear_scheduler(cls, **options), num_steps, lambda i: lam(k, b, i, num_steps), start)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    unscaled = step_through(linear_scheduler(cls, **options), num_steps, None, start)
    assert (got - unscaled).abs().max() > 1e-4


# --- latent and text-to-image pipelines --------------------------------------------------------


def test_ldm_pipeline_with_lambda_equals_a_network_divided_by_lambda():
    pipe = tiny_ldm()
    unet = pipe.unet
    num_steps, k, b = 5, 0.01, 1.01
    with eps_scaling(pipe, f"linear:k={k},b={b}"):
        scaled = as_tensor(run(pipe, num_steps))
    plain = as_tensor(run(pipe, num_steps))
    calls = divide_unet_output(unet, [lam(k, b, i, num_steps) for i in range(num_steps)])
    expected = as_tensor(run(pipe, num_steps))
    assert len(calls) == num_steps
    torch.testing.assert_close(scaled, expected, rtol=0, atol=1e-5)
    assert (scaled - plain).abs().max() > 1e-4


def test_text_to_image_pipeline_with_guidance_and_euler():
    pytest.importorskip("transformers", reason="StableDiffusionPipeline needs transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=2,
    ).eval()
    vae = diffusers.AutoencoderKL(latent_channels=4, block_out_channels=(8,), norm_num_groups=4, layers_per_block=1)
    scheduler = diffusers.EulerDiscreteScheduler(
        num_train_timesteps=TRAIN_STEPS, beta_schedule="scaled_linear", beta_start=1e-3, beta_end=0.05, steps_offset=1
    )
    pipe = quiet(diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ))
    prompt, negative = torch.randn(2, 1, 5, 16, generator=torch.Generator().manual_seed(4))
    num_steps, spec = 4, "table:1.03,1.02,1.01,1.0"
    lambdas = [1.0, 1.01, 1.02, 1.03]  # the table lists t = 0..3; sampling runs t = 3..0

    def sample():
        with torch.no_grad():
            return pipe(
                prompt_embeds=prompt, negative_prompt_embeds=negative, num_inference_steps=num_steps,
                guidance_scale=3.0, generator=torch.Generator().manual_seed(0), output_type="pt",
            ).images

    plain = sample()
    with eps_scaling(pipe, "1.0"):
        assert torch.equal(sample(), plain)
    with eps_scaling(pipe, spec):
        scaled = sample()
    calls = divide_unet_output(unet, lambdas)
    torch.testing.assert_close(scaled, sample(), rtol=0, atol=1e-5)
    assert calls == lambdas  # one call per step: both guidance halves go in one batch
    assert (scaled - plain).abs().max() > 1e-4


# --- ADM's sampler and the diffusers scheduler walk the same trajectory ------------------------


def closed_form_eps(x, timestep, learned_variance=False):
    """A smooth 'network' of x and the original timestep; with learned variance, 2*C channels."""
    t = torch.as_tensor(timestep, dtype=x.dtype).reshape(-1, 1, 1, 1) / 1000.0
    eps = torch.tanh(1.3 * x) * (0.6 + 0.4 * t) + 0.2 * torch.sin(3.0 * x)
    if not learned_variance:
        return eps
    return torch.cat([eps, torch.tanh(x - t)], dim=1)


def adm_diffusion(respacing, learn_sigma):
    from guided_diffusion.script_util import create_gaussian_diffusion

    return create_gaussian_diffusion(
        steps=1000, noise_schedule="cosine", timestep_respacing=respacing, learn_sigma=learn_sigma
    )


def diffusers_trajectory(scheduler, x, learned_variance, generator, **step_kwargs):
    samples = []
    for timestep in scheduler.timesteps:
        out = closed_form_eps(x, int(timestep), learned_variance)
        x = scheduler.step(out, timestep, x, generator=generator, **step_kwargs).prev_sample
        samples.append(x)
    return torch.stack(samples)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_adm_ddim_and_diffusers_ddim_with_es_give_the_same_trajectory(eta):
    """ADM "ddim10" on the cosine schedule is diffusers' squaredcos_cap_v2 with leading spacing; ADM
    clips x0 and re-derives the noise from it, which is diffusers' use_clipped_model_output."""
    from guided_diffusion.image_noise import ImageNoise

    spec, indices = "linear:k=0.004,b=1.002", [5, 9]
    diffusion = adm_diffusion("ddim10", learn_sigma=False)
    adm = torch.stack([  # x_T and every step's noise from the images' own streams
        out["sample"] for out in diffusion.ddim_sample_loop_progressive(
            closed_form_eps, (2, 3, 8, 8), clip_denoised=True, eta=eta, eps_scale=spec,
            generator=ImageNoise(0, indices),
        )
    ])

    scheduler = diffusers.DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True, set_alpha_to_one=True,
        timestep_spacing="leading", steps_offset=0,
    )
    scheduler.set_timesteps(10)
    apply_eps_scaling(scheduler, spec)
    # x_T from the same streams, then a generator list continues them as ADM does
    streams = ImageNoise(0, indices)
    x = streams.randn((2, 3, 8, 8))
    ours = diffusers_trajectory(scheduler, x, False, streams.generators, eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(ours, adm, rtol=0, atol=1e-4)

    remove_eps_scaling(scheduler)
    streams = ImageNoise(0, indices)
    x = streams.randn((2, 3, 8, 8))
    unscaled = diffusers_trajectory(scheduler, x, False, streams.generators, eta=eta, use_clipped_model_output=True)
    assert (unscaled[-1] - adm[-1]).abs().max() > 1e-3


def test_adm_ancestral_learned_range_and_diffusers_ddpm_with_es_give_the_same_trajectory():
    """ADM respacing "10" keeps timesteps 0, 111, ..., 999: diffusers' DDPMScheduler with those as
    custom timesteps and learned-range variance takes the same steps."""
    from guided_diffusion.respace import space_timesteps
    from guided_diffusion.image_noise import ImageNoise

    spec, indices = "1.01", [0, 3, 4]
    diffusion = adm_diffusion("10", learn_sigma=True)
    adm = torch.stack([
        out["sample"] for out in diffusion.p_sample_loop_progressive(
            lambda x, t: closed_form_eps(x, t, learned_variance=True), (3, 3, 8, 8), clip_denoised=True,
            eps_scale=spec, generator=ImageNoise(1, indices),
        )
    ])

    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", variance_type="learned_range", clip_sample=True
    )
    scheduler.set_timesteps(timesteps=sorted(space_timesteps(1000, "10"), reverse=True))
    assert scheduler.timesteps.tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    with eps_scaling(scheduler, spec):
        streams = ImageNoise(1, indices)
        ours = diffusers_trajectory(scheduler, streams.randn((3, 3, 8, 8)), True, streams.generators)
    torch.testing.assert_close(ours, adm, rtol=0, atol=1e-4)


# --- applying, removing, nesting ---------------------------------------------------------------


def test_remove_and_context_manager_restore_the_previous_state(ddim_pipe):
    plain = run(ddim_pipe, 3)
    apply_eps_scaling(ddim_pipe, 1.1)
    with eps_scaling(ddim_pipe, 1.2) as scheduler:
        assert scheduler is ddim_pipe.scheduler
        assert installed_eps_scale(ddim_pipe).b == 1.2
    assert installed_eps_scale(ddim_pipe).b == 1.1
    apply_eps_scaling(ddim_pipe, "linear:k=0.01,b=1.0")  # replaces, does not stack
    assert installed_eps_scale(ddim_pipe).k == 0.01
    remove_eps_scaling(ddim_pipe)
    remove_eps_scaling(ddim_pipe)  # a second removal is harmless
    assert installed_eps_scale(ddim_pipe) is None
    assert "step" not in vars(ddim_pipe.scheduler)
    assert torch.equal(run(ddim_pipe, 3), plain)

    scheduler = ddim_pipe.scheduler
    own_step = functools.partial(type(scheduler).step, scheduler)  # someone's step set on the instance
    scheduler.step = own_step
    apply_eps_scaling(scheduler, 1.1)
    remove_eps_scaling(scheduler)
    assert scheduler.step is own_step
    del scheduler.step


def test_a_deep_copied_scheduler_steps_itself_with_the_same_lambdas():
    import copy

    k, b = 0.004, 0.98
    original = linear_scheduler(diffusers.EulerDiscreteScheduler)
    apply_eps_scaling(original, f"linear:k={k},b={b}")
    original.set_timesteps(3)
    copied = copy.deepcopy(original)
    got = step_through(copied, 6, None)
    expected = step_through(linear_scheduler(diffusers.EulerDiscreteScheduler), 6, lambda i: lam(k, b, i, 6))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert len(original.timesteps) == 3 and original.step_index is None
    assert installed_eps_scale(copied) == installed_eps_scale(original)


def test_the_wrapped_step_keeps_its_signature_for_pipelines_that_inspect_it(ddim_pipe):
    import inspect

    with eps_scaling(ddim_pipe, 1.01):
        assert "eta" in inspect.signature(ddim_pipe.scheduler.step).parameters


# --- bad input ---------------------------------------------------------------------------------


# Models that predict v, x0 or a flow velocity, and what is refused for them:
# tests/test_diffusers_prediction_types.py


def test_unknown_scheduler_and_non_pipeline_are_refused():
    with pytest.raises(ValueError, match="does not support PNDMScheduler.*DDIMScheduler"):
        apply_eps_scaling(diffusers.PNDMScheduler(), 1.017)
    with pytest.raises(ValueError, match="expected a diffusers pipeline.*got str"):
        apply_eps_scaling("google/ddpm-cifar10-32", 1.017)


def test_bad_lambda_specs_fail_with_the_schedule_error():
    scheduler = linear_scheduler(diffusers.DDIMScheduler)
    with pytest.raises(EpsScaleError, match="cannot read eps_scale"):
        apply_eps_scaling(scheduler, "fast")
    with pytest.raises(EpsScaleError, match="b = 0"):
        apply_eps_scaling(scheduler, 0)
    apply_eps_scaling(scheduler, "table:1.01,1.02")
    scheduler.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(EpsScaleError, match="2 values but the sampler takes 3 steps"):
        scheduler.step(x, scheduler.timesteps[0], x)
    apply_eps_scaling(scheduler, "linear:k=-0.5,b=1.0")
    with pytest.raises(EpsScaleError, match="every lambda must be > 0"):
        scheduler.step(x, scheduler.timesteps[0], x)


def test_wrong_channel_count_and_foreign_timestep_are_refused():
    scheduler = linear_scheduler(diffusers.DDIMScheduler)
    apply_eps_scaling(scheduler, 1.01)
    scheduler.set_timesteps(4)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="model output has 5 channels but the sample has 3"):
        scheduler.step(torch.zeros(1, 5, 4, 4), scheduler.timesteps[0], x)
    with pytest.raises(ValueError, match="timestep 7 is not exactly one of the scheduler's timesteps"):
        scheduler.step(x, 7, x)


def test_missing_diffusers_gives_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"pip install 'guided-diffusion-es\[diffusers\]'"):
        require_diffusers()


# --- sampling a pipeline image by image, and the script ----------------------------------------


def tiny_ddpm_pipe():
    scheduler = linear_scheduler(diffusers.DDPMScheduler, variance_type="learned_range", clip_sample=True)
    return quiet(diffusers.DDPMPipeline(unet=tiny_unet(out_channels=6), scheduler=scheduler))


def test_sample_images_gives_each_image_its_own_noise_whatever_the_batch():
    pipe = tiny_ddpm_pipe()
    k, b, seed = 0.01, 1.03, 7
    apply_eps_scaling(pipe, f"linear:k={k},b={b}")
    images = sample_images(pipe, seed, [4, 1, 6], 4)
    assert images.shape == (3, 3, 8, 8) and images.min() >= -1 and images.max() <= 1
    for row, index in enumerate([4, 1, 6]):
        alone = ddpm_learned_range_by_hand(pipe.unet, (1, 3, 8, 8), image_generator(seed, index), 4, k, b)
        torch.testing.assert_close(images[row:row + 1], alone * 2 - 1, rtol=0, atol=3e-5)
    assert not torch.allclose(images, sample_images(pipe, seed + 1, [4, 1, 6], 4))


def record_batch_sizes(module, method):
    """Wrap ``module.method`` (an instance attribute) so that it records the batch of every call."""
    sizes, plain = [], getattr(module, method)

    def spy(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return plain(x, *args, **kwargs)

    setattr(module, method, spy)
    return sizes


@pytest.mark.parametrize("make_pipe", [tiny_ddpm_pipe, tiny_ldm], ids=["ddpm", "ldm"])
def test_sample_images_runs_the_networks_on_aligned_chunks_and_is_bit_identical_across_batches(make_pipe):
    pipe = make_pipe()
    apply_eps_scaling(pipe, "1.02")
    unet_calls = record_batch_sizes(pipe.unet, "forward")
    decoder = getattr(pipe, "vqvae", None)
    decode_calls = record_batch_sizes(decoder, "decode") if decoder is not None else []
    spies = (pipe.unet.forward, decoder and decoder.decode)
    call = {"eta": 0.0} if decoder is not None else {}  # DDPMPipeline takes no eta
    together = sample_images(pipe, 3, [4, 1, 6], 3, network_batch=4, **call)
    # Images 4 and 6 share chunk 1 (slots 0 and 2), image 1 is alone in chunk 0: two calls per step.
    assert unet_calls == [4] * 6 and decode_calls == ([4, 4] if decoder is not None else [])
    assert (pipe.unet.forward, decoder and decoder.decode) == spies  # the spies are back in place
    for row, index in enumerate([4, 1, 6]):
        assert torch.equal(sample_images(pipe, 3, [index], 3, network_batch=4, **call), together[row:row + 1])
    with pytest.raises(ValueError, match="--network_batch_size must be at least 1"):
        sample_images(pipe, 3, [0], 3, network_batch=0, **call)
    assert pipe.unet.forward is spies[0]


def test_sample_images_runs_the_unet_behind_the_speed_switches():
    pipe = tiny_ldm()
    plain = sample_images(pipe, 5, [0, 1, 2], 3, network_batch=4, eta=0.0)
    default = optimize_for_sampling(UNetNetwork(pipe.unet))  # fused attention, inference mode
    assert torch.equal(sample_images(pipe, 5, [0, 1, 2], 3, 4, default, eta=0.0), plain)
    calls = []
    faster = optimize_for_sampling(UNetNetwork(tiny_ldm().unet), channels_last=True, autocast_dtype="bf16")
    images = sample_images(pipe, 5, [0, 1, 2], 3, 4, lambda x, t: calls.append(x.shape[0]) or faster(x, t), eta=0.0)
    assert calls == [4] * 3 and images.shape == plain.shape
    assert 0 < (images - plain).abs().max() < 0.2  # bfloat16 convolutions: close, not equal


def test_sample_images_latent_pipeline_shape_and_per_image_noise():
    pipe = tiny_ldm()
    assert image_shape(pipe) == (16, 16, 3)
    pair = sample_images(pipe, 0, [2, 3], 3, eta=0.0)
    assert pair.shape == (2, 3, 16, 16)
    torch.testing.assert_close(sample_images(pipe, 0, [3], 3, eta=0.0), pair[1:], rtol=0, atol=1e-5)


# Which pipeline/scheduler pairings sample_images accepts, and why it refuses the others:
# tests/test_diffusers_pairings.py


def test_use_scheduler_keeps_the_noise_schedule():
    pipe = tiny_ddpm_pipe()
    original = pipe.scheduler.alphas_cumprod.clone()
    assert use_scheduler(pipe, "pipeline") is pipe.scheduler
    assert isinstance(use_scheduler(pipe, "ddim"), diffusers.DDIMScheduler)
    assert torch.equal(pipe.scheduler.alphas_cumprod, original)
    with pytest.raises(ValueError, match="unknown scheduler 'heun'"):
        use_scheduler(pipe, "heun")


@pytest.fixture(scope="module")
def saved_ddpm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddpm_pipe")
    tiny_ddpm_pipe().save_pretrained(folder)
    return folder


def test_loaded_pipeline_and_weight_digest(saved_ddpm, tmp_path):
    pipe = load_pipeline(str(saved_ddpm))
    assert type(pipe).__name__ == "DDPMPipeline"
    digest = pipeline_weights_sha256(pipe)
    assert digest == pipeline_weights_sha256(tiny_ddpm_pipe())
    with torch.no_grad():
        next(pipe.unet.parameters()).view(-1)[0] += 1e-3
    assert pipeline_weights_sha256(pipe) != digest
    with pytest.raises(UsageError, match="has no model_index.json, so it is not a diffusers pipeline folder"):
        load_pipeline(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(UsageError, match="is a file; give the pipeline's folder"):
        load_pipeline(str(tmp_path / "weights.bin"))


def test_script_writes_adm_npz_per_image_and_resumes(saved_ddpm, tmp_path):
    out = tmp_path / "run"
    flags = [f"--model={saved_ddpm}", "--steps=4", "--eps_scale=linear:k=0.01,b=1.03", "--seed=7",
             "--num_samples=5", "--batch_size=2", f"--output_dir={out}"]
    sample_in_process(*flags, "--keep_shards=True")
    npz = out / "samples_5x8x8x3.npz"
    images = np.load(npz)["arr_0"]
    assert images.dtype == np.uint8 and images.shape == (5, 8, 8, 3)
    pipe = load_pipeline(str(saved_ddpm))
    for index in (0, 3, 4):
        alone = ddpm_learned_range_by_hand(pipe.unet, (1, 3, 8, 8), image_generator(7, index), 4, 0.01, 1.03)
        expected = (alone[0].permute(1, 2, 0) * 255).numpy()
        assert np.abs(images[index].astype(np.float64) - expected).max() <= 1.0
    side = json.loads(npz.with_suffix(".json").read_text())
    assert side["eps_scale"] == "linear:k=0.01,b=1.03" and side["pipeline"] == "DDPMPipeline"
    assert side["eps_scale_values"] == pytest.approx([1.03, 1.04, 1.05, 1.06])
    assert side["model_sha256"] == pipeline_weights_sha256(pipe) and side["scheduler_class"] == "DDPMScheduler"

    first = npz.read_bytes()
    npz.unlink()
    npz.with_suffix(".json").unlink()
    next((out / "shards").glob("shard-00000002-*.npz")).unlink()  # as if killed before that batch
    sample_in_child(*flags)  # the one run as a user runs it: a fresh process resumes from the shards
    assert npz.read_bytes() == first
    other = tmp_path / "batch3"
    sample_in_process(*[f.replace(str(out), str(other)).replace("--batch_size=2", "--batch_size=3") for f in flags])
    assert (other / npz.name).read_bytes() == first  # the same bytes whatever the batch size
    fast = tmp_path / "channels_last"
    sample_in_process(*[f.replace(str(out), str(fast)) for f in flags], "--channels_last=True")
    assert np.abs(np.load(fast / npz.name)["arr_0"].astype(int) - images.astype(int)).max() <= 1
    assert json.loads((fast / npz.name).with_suffix(".json").read_text())["channels_last"] is True

    proc = sample_in_process(*[f for f in flags if not f.startswith("--eps_scale")], "--eps_scale=1.0", check=False)
    assert proc.returncode == 2 and "error:" in proc.stderr and "other settings" in proc.stderr


@pytest.mark.parametrize("flags,message", [
    (["--model={missing}"], "error: --model {missing}: there is no such folder, and it is not a model id"),
    (["--model={ddpm}", "--eps_scale=fast"], "error: cannot read eps_scale 'fast'"),
    (["--model={ddpm}", "--eta=0.5"], "error: --eta 0.5: DDPMPipeline takes no eta"),
    (["--model={ddpm}", "--steps=0"], "error: --steps must be at least 1"),
    (["--model={flow}"], "error: DDPMScheduler does not read a model with prediction_type 'flow_prediction'"),
])
def test_script_bad_input_is_one_error_line(saved_ddpm, tmp_path, flags, message):
    flow = tmp_path / "flow"
    pipe = tiny_ddpm_pipe()
    pipe.scheduler = linear_scheduler(diffusers.DDPMScheduler, prediction_type="flow_prediction",
                                      variance_type="learned_range")
    pipe.save_pretrained(flow)
    paths = dict(missing=tmp_path / "nothing" / "here", ddpm=saved_ddpm, flow=flow)
    flags = [f.format(**paths) for f in flags] + [f"--output_dir={tmp_path / 'out'}"]
    message = message.format(**paths)
    proc = sample_in_process(*flags, check=False)
    code, err = proc.returncode, proc.stderr
    assert code == 2 and err.startswith(message) and err.count("\n") == 1
    assert not (tmp_path / "out").exists()

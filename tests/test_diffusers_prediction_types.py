"""Epsilon Scaling for diffusers models that predict v, x0 or a flow velocity instead of the noise.

ES divides the noise by lambda_t. For such a model the bridge hands the scheduler the output whose
noise is the model's noise divided by lambda_t, for the same x_t. The expected values here come
from the conversions written out step by step (output -> eps and x0 -> eps / lambda -> x0' ->
output'), from noise levels computed here (alphas_cumprod of the linear schedule, in float64), or
from the same scheduler configured for a noise-predicting model and fed eps / lambda_t.
"""

import inspect
import math
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
    remove_eps_scaling,
    rescale_prediction,
    sample_images,
    use_scheduler,
)
from adm_common.errors import UsageError  # noqa: E402
from guided_diffusion.image_noise import image_generator  # noqa: E402
from diffusers_models import linear_alphas_cumprod, linear_scheduler, make_pipe, sample_in_process  # noqa: E402

SEED, STEPS, K, B = 5, 3, 0.02, 1.03


def lam(step, num_steps, k=K, b=B):
    return k * (num_steps - 1 - step) + b


def noise_of(prediction, out, x_t, abar):
    """The noise that a v or x0 output stands for at x_t = sqrt(abar) x0 + sqrt(1 - abar) eps."""
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    if prediction == "v_prediction":
        return a * out + s * x_t
    return (x_t - a * out) / s  # "sample"


def converted(prediction, out, x_t, abar, lam_t):
    """The output whose noise is out's divided by lam_t, for the same x_t, written out step by step."""
    a, s = math.sqrt(abar), math.sqrt(1 - abar)
    eps = noise_of(prediction, out, x_t, abar) / lam_t
    x0 = (x_t - s * eps) / a
    return a * eps - s * x0 if prediction == "v_prediction" else x0


# --- one scheduler step at a time --------------------------------------------------------------

VP_SCHEDULERS = [
    (diffusers.DDPMScheduler, {}),
    (diffusers.DDIMScheduler, {}),
    (diffusers.DDIMScheduler, {"clip_sample": True, "timestep_spacing": "trailing"}),
    (diffusers.EulerDiscreteScheduler, {}),
    (diffusers.EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    (diffusers.EulerAncestralDiscreteScheduler, {}),
    (diffusers.DPMSolverMultistepScheduler, {}),
    (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
    (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
    (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
]
CASES = [(cls, options, prediction) for cls, options in VP_SCHEDULERS for prediction in ("v_prediction", "sample")
         if not (cls is diffusers.EulerAncestralDiscreteScheduler and prediction == "sample")]
CASE_IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in o.items())}-{p}" for c, o, p in CASES]


def step_abar(scheduler, index, timestep):
    """abar of the step: alphas_cumprod at the timestep, or 1 / (1 + sigma^2) of a sigma scheduler."""
    if isinstance(scheduler, (diffusers.DDPMScheduler, diffusers.DDIMScheduler)):
        return float(scheduler.alphas_cumprod[int(timestep)])
    return 1.0 / (1.0 + float(scheduler.sigmas[index]) ** 2)


def network(model_input, index):
    """A smooth stand-in for a network of the (variance-preserving) model input."""
    return torch.tanh(1.5 * model_input) * 0.7 + 0.1 * math.cos(index) * model_input


def walk(scheduler, num_steps, feed, dtype=torch.float32):
    """The scheduler's documented loop; ``feed(model_input, index, timestep, sample)`` is the model output."""
    scheduler.set_timesteps(num_steps)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype) * scheduler.init_noise_sigma
    gen = torch.Generator().manual_seed(2)
    for index, timestep in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(x, timestep)
        x = scheduler.step(feed(model_input, index, timestep, x), timestep, x, generator=gen).prev_sample
    return x


@pytest.mark.parametrize("cls,options,prediction", CASES, ids=CASE_IDS)
def test_a_v_or_x0_model_steps_as_a_noise_model_fed_its_noise_divided_by_lambda(cls, options, prediction):
    num_steps = 5
    scaled = linear_scheduler(cls, prediction_type=prediction, **options)
    apply_eps_scaling(scaled, f"linear:k={K},b={B}")
    got = walk(scaled, num_steps, lambda x, i, *_: network(x, i))
    noise_model = linear_scheduler(cls, prediction_type="epsilon", **options)

    def noise_divided(model_input, index, timestep, _):  # model_input is the model's x_t
        abar = step_abar(noise_model, index, timestep)
        return noise_of(prediction, network(model_input, index), model_input, abar) / lam(index, num_steps)

    expected = walk(noise_model, num_steps, noise_divided)
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    unscaled = walk(linear_scheduler(cls, prediction_type=prediction, **options), num_steps,
                    lambda x, i, *_: network(x, i))
    assert (got - unscaled).abs().max() > 1e-3


def test_a_flow_model_on_flow_sigmas_steps_as_a_noise_model_fed_its_noise_divided_by_lambda():
    """x_t = (1 - s) x0 + s eps and u = eps - x0, so the noise is x_t + (1 - s) u."""
    options = dict(use_flow_sigmas=True)
    scaled = linear_scheduler(diffusers.DPMSolverMultistepScheduler, prediction_type="flow_prediction", **options)
    apply_eps_scaling(scaled, f"linear:k={K},b={B}")
    got = walk(scaled, 5, lambda x, i, *_: network(x, i))
    noise_model = linear_scheduler(diffusers.DPMSolverMultistepScheduler, prediction_type="epsilon", **options)

    def noise_divided(x_t, index, timestep, _):
        s = float(noise_model.sigmas[index])
        return (x_t + (1 - s) * network(x_t, index)) / lam(index, 5)

    torch.testing.assert_close(got, walk(noise_model, 5, noise_divided), rtol=0, atol=2e-5)


def recording_step(scheduler):
    """Set a step on the instance that records the model output it is handed (ES wraps it)."""
    handed = []

    def step(model_output, timestep, sample, *args, **kwargs):
        handed.append(model_output)
        return type(scheduler).step(scheduler, model_output, timestep, sample, *args, **kwargs)

    scheduler.step = step
    return handed


@pytest.mark.parametrize("cls,options,prediction", CASES, ids=CASE_IDS)
def test_in_float64_the_handed_output_is_the_written_out_conversion_and_lambda_one_hands_it_untouched(
        cls, options, prediction):
    num_steps = 4
    scheduler = linear_scheduler(cls, prediction_type=prediction, **options)
    handed = recording_step(scheduler)
    apply_eps_scaling(scheduler, "table:1.0,1.04,1.0,0.97")  # t = 3..0: 0.97, 1.0, 1.04, 1.0
    outputs, expected = [], []

    def feed(model_input, index, timestep, sample):
        out = network(model_input, index)
        outputs.append(out)
        lam_t = [0.97, 1.0, 1.04, 1.0][index]
        abar = step_abar(scheduler, index, timestep)
        # x_t in float64: Euler steps x_t / sqrt(abar), and scales its model input with float32 coefficients
        x_t = sample * math.sqrt(abar) if cls.__name__.startswith("Euler") else sample
        expected.append(converted(prediction, out, x_t, abar, lam_t))
        return out

    walk(scheduler, num_steps, feed, dtype=torch.float64)
    assert all(h.dtype == torch.float64 for h in handed)
    for index in (1, 3):  # lambda 1: the very output the model gave
        assert handed[index] is outputs[index]
    for index in (0, 2):
        torch.testing.assert_close(handed[index], expected[index], rtol=0, atol=1e-12)
        assert (handed[index] - outputs[index]).abs().max() > 1e-3
    # and the written-out conversion itself is exact at lambda 1
    abar = step_abar(scheduler, 0, scheduler.timesteps[0])
    x_t = torch.linspace(-2, 2, 48, dtype=torch.float64)
    torch.testing.assert_close(converted(prediction, outputs[0].flatten()[:48], x_t, abar, 1.0),
                               outputs[0].flatten()[:48], rtol=0, atol=1e-14)
    remove_eps_scaling(scheduler)


def test_rescaling_by_lambda_then_by_one_over_lambda_gives_the_prediction_back_in_float64():
    gen = torch.Generator().manual_seed(0)
    prediction, sample = torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64).unbind(0)
    for coefficient in (0.7, -3.2, 40.0):
        there = rescale_prediction(prediction, sample, 1.3, coefficient)
        back = rescale_prediction(there, sample, 1 / 1.3, coefficient)
        torch.testing.assert_close(back, prediction, rtol=0, atol=1e-13)
        assert (there - prediction).abs().max() > 0.1
    half = rescale_prediction(prediction.half(), sample, 1.3, 0.7)
    assert half.dtype == torch.float16  # handed on in the model's dtype


def test_learned_variance_channels_of_a_v_model_are_kept():
    scheduler = linear_scheduler(diffusers.DDPMScheduler, prediction_type="v_prediction", variance_type="learned_range")
    handed = recording_step(scheduler)
    apply_eps_scaling(scheduler, "1.05")
    scheduler.set_timesteps(3)
    x = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    out = torch.randn(1, 6, 4, 4, generator=torch.Generator().manual_seed(1))
    t = scheduler.timesteps[0]
    scheduler.step(out, t, x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(handed[0][:, 3:], out[:, 3:])
    abar = float(linear_alphas_cumprod()[int(t)])
    torch.testing.assert_close(handed[0][:, :3], converted("v_prediction", out[:, :3], x, abar, 1.05),
                               rtol=0, atol=1e-6)


# --- refusals ----------------------------------------------------------------------------------

REFUSED_SCHEDULERS = [
    (diffusers.EulerAncestralDiscreteScheduler, dict(prediction_type="sample"),
     "EulerAncestralDiscreteScheduler does not read a model with prediction_type 'sample' (it reads 'epsilon' or "
     "'v_prediction'), so there is no noise to scale"),
    (diffusers.DDIMScheduler, dict(prediction_type="flow_prediction"),
     "DDIMScheduler does not read a model with prediction_type 'flow_prediction'"),
    (diffusers.DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction"),
     "DPMSolverMultistepScheduler reads prediction_type 'flow_prediction' on its variance-preserving sigmas"),
    (diffusers.DPMSolverMultistepScheduler, dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
     "DPMSolverMultistepScheduler with algorithm_type 'dpmsolver' cannot step a flow prediction"),
    (diffusers.DPMSolverMultistepScheduler, dict(prediction_type="v_prediction", use_flow_sigmas=True),
     "DPMSolverMultistepScheduler reads a v-prediction with variance-preserving coefficients on flow sigmas"),
]


@pytest.mark.parametrize("cls,options,message", REFUSED_SCHEDULERS, ids=lambda v: getattr(v, "__name__", None))
def test_what_cannot_be_defined_is_refused_in_one_line(cls, options, message):
    scheduler = linear_scheduler(cls, **options)
    with pytest.raises(ValueError) as refused:
        apply_eps_scaling(scheduler, 1.02)
    assert str(refused.value).startswith(message) and "\n" not in str(refused.value)
    assert "step" not in vars(scheduler)


def test_a_zero_snr_step_is_refused_for_lambda_other_than_one_and_sampled_with_lambda_one():
    """With rescale_betas_zero_snr, alpha_t = 0 at the last training timestep: x_t is pure noise,
    so the noise of a v-model is x_t itself there and no output has it divided by lambda."""
    options = dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    scheduler = linear_scheduler(diffusers.DDIMScheduler, **options)
    apply_eps_scaling(scheduler, "1.02")
    with pytest.raises(ValueError) as refused:
        walk(scheduler, 3, lambda x, i, *_: network(x, i))
    assert str(refused.value).startswith("at timestep 99 alpha_t is 0 (a zero terminal SNR schedule)")
    assert "\n" not in str(refused.value)
    apply_eps_scaling(scheduler, "table:1.02,1.02,1.0")  # lambda 1 at the first step (t = 2)
    got = walk(scheduler, 3, lambda x, i, *_: network(x, i))
    noise_model = linear_scheduler(diffusers.DDIMScheduler, **dict(options, prediction_type="epsilon"))

    def handed(model_input, index, timestep, _):  # the first step takes the model's v as it is
        out = network(model_input, index)
        if index == 0:
            return out
        abar = step_abar(noise_model, index, timestep)
        return converted("v_prediction", out, model_input, abar, 1.02)

    v_model = linear_scheduler(diffusers.DDIMScheduler, **options)
    torch.testing.assert_close(got, walk(v_model, 3, handed), rtol=0, atol=2e-5)
    assert torch.isfinite(got).all()


def test_euler_churn_is_refused_for_a_v_model():
    scheduler = linear_scheduler(diffusers.EulerDiscreteScheduler, prediction_type="v_prediction")
    apply_eps_scaling(scheduler, "1.02")
    scheduler.set_timesteps(3)
    x = torch.zeros(1, 3, 4, 4)
    with pytest.raises(ValueError, match="^s_churn=0.5: EulerDiscreteScheduler adds noise to the sample before it "
                                         "reads a 'v_prediction' prediction"):
        scheduler.step(x, scheduler.timesteps[0], x, s_churn=0.5)


# --- pipelines: every pairing sample_images accepts --------------------------------------------


PAIRINGS = [
    ("ddpm_learned", "pipeline", 0.0), ("ddpm", "pipeline", 0.0), ("ddpm", "ddim", 0.0), ("ddpm", "dpmsolver", 0.0),
    ("ddim", "pipeline", 0.0), ("ddim", "ddim", 0.5),
    ("ldm", "pipeline", 0.0), ("ldm", "ddim", 0.5), ("ldm", "ddpm", 0.0), ("ldm", "euler", 0.0),
    ("ldm", "euler_ancestral", 0.0), ("ldm", "dpmsolver", 0.0), ("ldm_sde", "pipeline", 0.0),
]
PIPELINE_CASES = [(*pairing, prediction) for pairing in PAIRINGS for prediction in ("v_prediction", "sample")
                  if not (pairing[1] == "euler_ancestral" and prediction == "sample")]


@torch.no_grad()
def hand_loop(pipe, scheduler, index, prediction, k, b, eta):
    """Image ``index`` by the scheduler's documented loop, its output converted by the written-out
    formulas with abar of the linear schedule computed here (x_t: the model's input)."""
    abar_of = linear_alphas_cumprod()
    scheduler.set_timesteps(STEPS)
    gen = image_generator(SEED, index)
    unet, channels = pipe.unet, pipe.unet.config.in_channels
    x = torch.randn((1, channels, 8, 8), generator=gen) * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_t = scheduler.scale_model_input(x, t)
        out = unet(x_t, t).sample
        abar = float(abar_of[int(t)])
        head = converted(prediction, out[:, :channels].double(), x_t.double(), abar, lam(i, STEPS, k, b))
        out = torch.cat([head.float(), out[:, channels:]], dim=1)
        x = scheduler.step(out, t, x, generator=gen, **({} if eta is None else {"eta": eta})).prev_sample
    decoder = getattr(pipe, "vqvae", None)
    if decoder is not None:
        x = decoder.decode(x / decoder.config.scaling_factor).sample
    return (x / 2 + 0.5).clamp(0, 1) * 2 - 1


@pytest.mark.parametrize("kind,flag,eta,prediction", PIPELINE_CASES, ids=["-".join(map(str, c)) for c in PIPELINE_CASES])
def test_accepted_pairings_with_v_and_x0_models(kind, flag, eta, prediction):
    pipe = make_pipe(kind, prediction)
    config = pipe.scheduler.config
    cls = type(pipe.scheduler) if flag == "pipeline" else getattr(diffusers, SCHEDULER_FLAGS[flag])
    use_scheduler(pipe, flag)
    call = {"eta": eta} if "eta" in inspect.signature(pipe.__call__).parameters else {}

    def plain_pipeline():
        pipe.scheduler.set_timesteps(STEPS)  # LDMPipeline reads init_noise_sigma before it sets them
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(0)  # LDMPipeline's stochastic steps draw from the global generator
            return pipe(batch_size=2, generator=[image_generator(SEED, 0), image_generator(SEED, 1)],
                        num_inference_steps=STEPS, output_type="np", **call).images

    plain = plain_pipeline()
    with eps_scaling(pipe, "1.0"):
        assert (plain_pipeline() == plain).all()  # bit for bit
    unscaled = sample_images(pipe, SEED, [0, 1], STEPS, eta=eta)
    with eps_scaling(pipe, "table:1,1,1"):
        assert torch.equal(sample_images(pipe, SEED, [0, 1], STEPS, eta=eta), unscaled)

    apply_eps_scaling(pipe, f"linear:k={K},b={B}")
    images = sample_images(pipe, SEED, [0, 1], STEPS, eta=eta)
    step_eta = eta if cls is diffusers.DDIMScheduler else None
    for index in (0, 1):
        expected = hand_loop(pipe, cls.from_config(config), index, prediction, K, B, step_eta)
        torch.testing.assert_close(images[index:index + 1], expected, rtol=0, atol=3e-5)
    assert (images - unscaled).abs().max() > 1e-4  # lambda acted


@pytest.mark.parametrize("kind,flag,prediction,message", [
    ("ldm", "euler_ancestral", "sample", "EulerAncestralDiscreteScheduler does not read a model with prediction_type "
                                         "'sample'"),
    ("ddpm_learned", "dpmsolver", "v_prediction", "the UNet predicts 'v_prediction' and variance (6 channels for a "
     "3-channel sample); DPMSolverMultistepScheduler sets a learned variance aside only beside a noise prediction"),
])
def test_pairings_that_cannot_step_the_model_are_refused_in_one_line(kind, flag, prediction, message):
    pipe = make_pipe(kind, prediction)
    use_scheduler(pipe, flag)
    with pytest.raises(UsageError, match="^" + re.escape(message)) as refused:
        check_pairing(pipe, STEPS)
    assert "\n" not in str(refused.value)


def test_script_samples_a_v_prediction_pipeline_with_es_as_the_hand_loop(tmp_path):
    folder, out = tmp_path / "vpred", tmp_path / "out"
    make_pipe("ddpm", "v_prediction").save_pretrained(folder)
    sample_in_process(f"--model={folder}", "--scheduler=ddim", f"--steps={STEPS}",
                      f"--eps_scale=linear:k={K},b={B}", f"--seed={SEED}", "--num_samples=2", "--batch_size=2",
                      f"--output_dir={out}")
    images = np.load(out / "samples_2x8x8x3.npz")["arr_0"]
    pipe = make_pipe("ddpm", "v_prediction")
    for index in (0, 1):
        scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
        expected = hand_loop(pipe, scheduler, index, "v_prediction", K, B, 0.0)
        expected = ((expected[0] + 1) * 127.5).clamp(0, 255).permute(1, 2, 0).numpy()
        assert np.abs(images[index].astype(np.float64) - expected).max() <= 1.0

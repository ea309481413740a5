"""Epsilon Scaling and seeding in the ADM samplers.

Checked against ADM-ES's reference vectors (../shared/reference/admes_golden.pt) and against hand
computations of pred_xstart = (x - sqrt(1 - abar_t) * eps / lambda_t) / sqrt(abar_t).
"""

import math

import pytest
import torch as th
from adm_reference import (
    assert_close,
    assert_loop_close,
    golden_cond_fn,
    golden_diffusion,
    golden_network,
    guidance_diffusion,
    make_diffusion,
    pmv_tolerance,
    unconditional,
)

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.eps_scaling import EpsScaleError
from guided_diffusion.image_noise import ImageNoise

SHAPE = (3, 2, 4, 4)
EPS_CONST = 0.3


def constant_eps_model(x, t):
    return th.full_like(x, EPS_CONST)


def abar_of(diffusion, t):
    return float(diffusion.alphas_cumprod[t])


def hand_xstart(x, abar, eps):
    return (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)


def x0_tolerance(x, abar):
    """float32 rounding of (x - sqrt(1 - abar) eps) / sqrt(abar), relative to the magnitudes."""
    return 1e-6 * (1 + x.abs().max().item()) / math.sqrt(abar)


def lambdas(diffusion, spec):
    """lambda_t by hand for the specs used here."""
    n = diffusion.num_timesteps
    if spec.startswith("linear:"):
        fields = dict(part.split("=") for part in spec[len("linear:") :].split(","))
        return [float(fields["k"]) * t + float(fields["b"]) for t in range(n)]
    if spec.startswith("table:"):
        return [float(v) for v in spec[len("table:") :].split(",")]
    return [float(spec)] * n


# ---------------------------------------------------------------- reference vectors of ADM-ES


@pytest.mark.parametrize("index", [0, 1, 2, 3])
def test_scaled_p_mean_variance_and_ddim_equal_adm_es(admes_golden, index):
    case = admes_golden["diffusion"][index]
    net = golden_network("u32_new_order" if case["learn_sigma"] else "u32_plain")
    diffusion = golden_diffusion(case)
    with th.no_grad():
        for i, expected in case["pmv"].items():
            t = th.full((case["x"].shape[0],), int(i))
            out = diffusion.p_mean_variance(
                net, case["x"], t, clip_denoised=True, eps_scale=case["eps_scale"]
            )
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                atol = pmv_tolerance(diffusion, int(i), key)
                assert_close(out[key], expected[key], atol, f"lambda {case['eps_scale']} pmv[{i}] {key}")
    # The same lambda as the diffusion's default instead of a call argument.
    scaled = golden_diffusion(case, eps_scale=case["eps_scale"])
    x = case["x"]
    sample = scaled.ddim_sample_loop(net, x.shape, noise=x, clip_denoised=True, eta=0.0)
    assert_loop_close(sample, case["ddim_eta0"], f"lambda {case['eps_scale']} ddim_eta0")


def test_scaled_condition_mean_equals_adm_es(admes_golden):
    case = admes_golden["guidance"][0]
    model = unconditional(golden_network("u32_new_order"))
    cond_fn = golden_cond_fn(case["scale"])
    diffusion = guidance_diffusion(eps_scale=case["eps_scale"])
    x, kwargs = case["x"], {"y": case["y"]}
    with th.no_grad():
        for i, expected in case["cond_mean"].items():
            t = th.full((x.shape[0],), int(i))
            pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kwargs)
            mean = diffusion.condition_mean(cond_fn, pmv, x, t, model_kwargs=kwargs)
            assert_close(mean, expected, 1e-4, f"lambda {case['eps_scale']} cond_mean[{i}]")


# ---------------------------------------------------------------- lambda = 1 is the baseline, bit for bit

IDENTITY_SPECS = [None, 1.0, "1.0", "linear:k=0,b=1", "table:" + ",".join(["1"] * 6)]


def _model_for(mean_type):
    weight = th.linspace(-0.5, 0.5, 4).view(1, 4, 1, 1)

    def model(x, t):
        out = th.tanh(x * weight[:, : x.shape[1]] + t.float().view(-1, 1, 1, 1) / 500)
        return out if mean_type != gd.ModelMeanType.START_X else out.clamp(-0.9, 0.9)

    return model


@pytest.mark.parametrize("mean_type", list(gd.ModelMeanType))
@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_lambda_one_reproduces_unscaled_sampling_bit_for_bit(mean_type, loop):
    diffusion = make_diffusion("6", mean_type=mean_type)
    model = _model_for(mean_type)
    results = []
    for spec in IDENTITY_SPECS:
        sample = getattr(diffusion, loop)(
            model, SHAPE, eps_scale=spec, generator=th.Generator().manual_seed(5)
        )
        results.append(sample)
    for spec, sample in zip(IDENTITY_SPECS[1:], results[1:], strict=True):
        assert th.equal(sample, results[0]), f"eps_scale={spec!r} changed the samples"
    # ... and lambda = 1.001 does change them.
    scaled = getattr(diffusion, loop)(model, SHAPE, eps_scale=1.001, generator=th.Generator().manual_seed(5))
    assert not th.equal(scaled, results[0])


@pytest.mark.parametrize("mean_type", [gd.ModelMeanType.START_X, gd.ModelMeanType.PREVIOUS_X])
def test_lambda_one_keeps_adm_formulas_for_x0_and_xprev_models(mean_type):
    """At lambda = 1 no round trip through the implied noise happens (it would not be exact)."""
    diffusion = make_diffusion("6", mean_type=mean_type)
    model = _model_for(mean_type)
    x, t = th.randn(SHAPE), th.tensor([5, 3, 1])
    out = diffusion.p_mean_variance(model, x, t, clip_denoised=True, eps_scale=1.0)
    raw = model(x, th.tensor(diffusion.timestep_map)[t])
    if mean_type == gd.ModelMeanType.START_X:
        assert th.equal(out["pred_xstart"], raw.clamp(-1, 1))
        assert th.equal(out["mean"], diffusion.q_posterior_mean_variance(raw.clamp(-1, 1), x, t)[0])
    else:
        assert th.equal(out["mean"], raw)
        assert th.equal(out["pred_xstart"], diffusion._predict_xstart_from_xprev(x, t, raw).clamp(-1, 1))


# ---------------------------------------------------------------- per-step lambda against a hand computation


@pytest.mark.parametrize("spec", ["linear:k=0.05,b=0.9", "table:0.8,1.3,0.95,1.1,1.02,0.7", "1.017"])
@pytest.mark.parametrize("loop", ["p_sample_loop_progressive", "ddim_sample_loop_progressive"])
def test_every_step_divides_eps_by_its_lambda(spec, loop):
    diffusion = make_diffusion("6", "linear")
    lam = lambdas(diffusion, spec)
    x = th.randn(SHAPE)
    steps = getattr(diffusion, loop)(
        constant_eps_model,
        SHAPE,
        noise=x,
        clip_denoised=False,
        eps_scale=spec,
        generator=th.Generator().manual_seed(0),
    )
    seen = []
    for step, out in enumerate(steps):
        t = diffusion.num_timesteps - 1 - step
        expected = hand_xstart(x, abar_of(diffusion, t), EPS_CONST / lam[t])
        atol = x0_tolerance(x, abar_of(diffusion, t))  # x grows: nothing is clipped
        assert_close(out["pred_xstart"], expected, atol, f"{spec} t={t}")
        if loop.startswith("ddim"):
            # Deterministic DDIM (eta = 0) moves along the same scaled eps.
            abar_prev = float(diffusion.alphas_cumprod_prev[t])
            direct = expected * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev) * EPS_CONST / lam[t]
            assert_close(out["sample"], direct, atol, f"{spec} ddim sample t={t}")
        seen.append(t)
        x = out["sample"]
    assert seen == list(range(diffusion.num_timesteps))[::-1]


def test_per_sample_timesteps_get_their_own_lambda():
    diffusion = make_diffusion("6", "cosine")
    x, t = th.randn(SHAPE), th.tensor([5, 0, 2])
    out = diffusion.p_mean_variance(
        constant_eps_model, x, t, clip_denoised=False, eps_scale="linear:k=0.1,b=1"
    )
    for row, ti in enumerate(t.tolist()):
        abar = abar_of(diffusion, ti)
        expected = hand_xstart(x[row], abar, EPS_CONST / (0.1 * ti + 1))
        assert_close(out["pred_xstart"][row], expected, x0_tolerance(x, abar), f"row {row}")


def test_start_x_and_previous_x_models_scale_their_implied_noise():
    lam = 1.25
    x, t = th.randn(SHAPE), th.tensor([4, 2, 1])
    x0_hat = th.full(SHAPE, 0.2)
    for mean_type in (gd.ModelMeanType.START_X, gd.ModelMeanType.PREVIOUS_X):
        diffusion = make_diffusion("6", "cosine", mean_type=mean_type)
        if mean_type == gd.ModelMeanType.START_X:
            model_out = x0_hat
        else:  # the x_{t-1} mean that x0_hat implies
            model_out = diffusion.q_posterior_mean_variance(x0_hat, x, t)[0]
        model = lambda *_, out=model_out: out  # noqa: E731
        out = diffusion.p_mean_variance(model, x, t, clip_denoised=False, eps_scale=lam)
        for row, ti in enumerate(t.tolist()):
            abar = abar_of(diffusion, ti)
            implied_eps = (x[row] - math.sqrt(abar) * 0.2) / math.sqrt(1 - abar)
            expected = hand_xstart(x[row], abar, implied_eps / lam)
            atol = x0_tolerance(x, abar)
            assert_close(out["pred_xstart"][row], expected, atol, f"{mean_type} pred_xstart row {row}")
        expected_mean = diffusion.q_posterior_mean_variance(out["pred_xstart"], x, t)[0]
        assert_close(out["mean"], expected_mean, 1e-5, f"{mean_type} mean")


def test_guided_ddim_divides_eps_once():
    lam, grad = 1.2, 0.05
    diffusion = make_diffusion("6", "cosine", eps_scale=lam)
    x, t = th.randn(SHAPE), th.full((SHAPE[0],), 3)
    cond_fn_calls = []

    def cond_fn(x, ts, **kwargs):
        cond_fn_calls.append(ts.clone())
        return th.full_like(x, grad)

    out = diffusion.ddim_sample(constant_eps_model, x, t, clip_denoised=False, cond_fn=cond_fn, eta=0.0)
    abar, abar_prev = abar_of(diffusion, 3), float(diffusion.alphas_cumprod_prev[3])
    eps = EPS_CONST / lam - math.sqrt(1 - abar) * grad  # scaled once, then guided
    x0 = hand_xstart(x, abar, eps)
    assert_close(out["pred_xstart"], x0, 1e-5, "guided x0")
    assert_close(
        out["sample"], x0 * math.sqrt(abar_prev) + math.sqrt(1 - abar_prev) * eps, 1e-5, "guided sample"
    )
    # The classifier sees the original timestep, as the model does.
    assert cond_fn_calls[0].tolist() == [diffusion.timestep_map[3]] * SHAPE[0]


def test_call_eps_scale_overrides_the_diffusion_default():
    x, t = th.randn(SHAPE), th.full((SHAPE[0],), 2)
    default = make_diffusion("6", eps_scale="1.1")
    plain = make_diffusion("6")
    by_default = default.p_mean_variance(constant_eps_model, x, t, clip_denoised=False)
    by_call = plain.p_mean_variance(constant_eps_model, x, t, clip_denoised=False, eps_scale=1.1)
    assert th.equal(by_default["pred_xstart"], by_call["pred_xstart"])
    overridden = default.p_mean_variance(constant_eps_model, x, t, clip_denoised=False, eps_scale=1.0)
    unscaled = plain.p_mean_variance(constant_eps_model, x, t, clip_denoised=False)
    assert th.equal(overridden["pred_xstart"], unscaled["pred_xstart"])
    expected = hand_xstart(x, abar_of(plain, 2), EPS_CONST / 1.1)
    assert_close(by_default["pred_xstart"], expected, 1e-5, "default lambda")


def test_reverse_ddim_uses_the_same_scaled_eps():
    diffusion = make_diffusion("6", "cosine")
    x, t = th.randn(SHAPE), th.full((SHAPE[0],), 2)
    out = diffusion.ddim_reverse_sample(constant_eps_model, x, t, clip_denoised=False, eps_scale=1.3)
    abar, abar_next = abar_of(diffusion, 2), float(diffusion.alphas_cumprod_next[2])
    x0 = hand_xstart(x, abar, EPS_CONST / 1.3)
    assert_close(
        out["sample"], x0 * math.sqrt(abar_next) + math.sqrt(1 - abar_next) * EPS_CONST / 1.3, 1e-5, "reverse"
    )
    with pytest.raises(ValueError, match="eta=0.0"):
        diffusion.ddim_reverse_sample(constant_eps_model, x, t, eta=0.5)


def test_training_and_likelihood_never_scale():
    x0, t, noise = th.rand(SHAPE) * 2 - 1, th.tensor([0, 3, 5]), th.randn(SHAPE)
    var_type = gd.ModelVarType.LEARNED_RANGE
    model = lambda x, ts: th.cat([th.tanh(x), th.zeros_like(x)], 1)  # noqa: E731
    scaled = make_diffusion("6", var_type=var_type, eps_scale=1.5).training_losses(model, x0, t, noise=noise)
    plain = make_diffusion("6", var_type=var_type).training_losses(model, x0, t, noise=noise)
    for key in ("mse", "vb", "loss"):
        assert th.equal(scaled[key], plain[key])


# ---------------------------------------------------------------- randomness


def test_global_rng_is_consumed_as_adm_does():
    """generator=None: x_T = randn(shape), then one randn_like(x) per step, the last one included."""
    diffusion = make_diffusion("6", var_type=gd.ModelVarType.FIXED_SMALL)
    model = _model_for(gd.ModelMeanType.EPSILON)
    th.manual_seed(11)
    sample = diffusion.p_sample_loop(model, SHAPE, progress=True)
    after = th.randn(1)

    th.manual_seed(11)
    x = th.randn(*SHAPE)
    for i in reversed(range(diffusion.num_timesteps)):
        t = th.full((SHAPE[0],), i)
        out = diffusion.p_mean_variance(model, x, t)
        noise = th.randn_like(x)
        x = out["mean"] + (i > 0) * th.exp(0.5 * out["log_variance"]) * noise
    assert th.equal(sample, x)
    assert th.equal(after, th.randn(1))


@pytest.mark.parametrize("loop, eta", [("p_sample_loop", 0.0), ("ddim_sample_loop", 1.0)])
def test_image_noise_gives_each_image_the_same_sample_in_any_batch(loop, eta):
    diffusion = make_diffusion("5", "cosine")
    kwargs = {"eta": eta} if loop.startswith("ddim") else {}
    model = _model_for(gd.ModelMeanType.EPSILON)
    run = getattr(diffusion, loop)

    def sample(indices):
        shape = (len(indices),) + SHAPE[1:]
        return run(model, shape, eps_scale=1.02, generator=ImageNoise(7, indices), **kwargs)

    batch = sample([0, 1, 2])
    assert th.equal(sample([2, 0]), batch[[2, 0]])
    assert th.equal(sample([1]), batch[[1]])
    assert not th.equal(batch[0], batch[1])
    other_seed = run(model, (1,) + SHAPE[1:], generator=ImageNoise(8, [0]), **kwargs)
    assert not th.equal(other_seed, batch[[0]])


def test_torch_generator_makes_sampling_repeatable():
    diffusion = make_diffusion("5")
    model = _model_for(gd.ModelMeanType.EPSILON)
    a = diffusion.ddim_sample_loop(model, SHAPE, eta=0.5, generator=th.Generator().manual_seed(3))
    b = diffusion.ddim_sample_loop(model, SHAPE, eta=0.5, generator=th.Generator().manual_seed(3))
    c = diffusion.ddim_sample_loop(model, SHAPE, eta=0.5, generator=th.Generator().manual_seed(4))
    assert th.equal(a, b) and not th.equal(a, c)


# ---------------------------------------------------------------- bad input fails before any work

BAD_SPECS = [
    ("table:1.0,1.1", "2 values but the sampler takes 6 steps"),
    (0, "non-positive"),
    (-1.01, "non-positive"),
    (float("nan"), "finite"),
    ("nan", "finite"),
    ("linear:k=-0.5,b=1", "at step t = 5"),
    ("fast", "cannot read eps_scale"),
]


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_bad_eps_scale_fails_before_the_model_runs(spec, message):
    diffusion = make_diffusion("6")
    calls = []

    def model(x, t):
        calls.append(1)
        return th.zeros_like(x)

    x, t = th.zeros(SHAPE), th.full((SHAPE[0],), 5)
    entry_points = [
        lambda: diffusion.p_sample_loop(model, SHAPE, eps_scale=spec),
        lambda: diffusion.ddim_sample_loop(model, SHAPE, eps_scale=spec),
        lambda: next(diffusion.p_sample_loop_progressive(model, SHAPE, eps_scale=spec)),
        lambda: next(diffusion.ddim_sample_loop_progressive(model, SHAPE, eps_scale=spec)),
        lambda: diffusion.p_mean_variance(model, x, t, eps_scale=spec),
        lambda: diffusion.p_sample(model, x, t, eps_scale=spec),
        lambda: diffusion.ddim_sample(model, x, t, eps_scale=spec),
        lambda: diffusion.ddim_reverse_sample(model, x, t, eps_scale=spec),
    ]
    for call in entry_points:
        rng_before = th.random.get_rng_state()
        with pytest.raises(EpsScaleError, match=message):
            call()
        assert th.equal(th.random.get_rng_state(), rng_before), "noise was drawn before the error"
    assert calls == []
    with pytest.raises(ValueError, match=message):
        make_diffusion("6", eps_scale=spec)


def test_a_table_fits_the_respaced_chain_not_the_base_process():
    table = "table:" + ",".join(["1.01"] * 6)
    diffusion = make_diffusion("6", eps_scale=table)
    assert diffusion.eps_scale.values(6) == [1.01] * 6
    sample = diffusion.ddim_sample_loop(constant_eps_model, SHAPE, noise=th.zeros(SHAPE))
    assert th.equal(
        sample,
        make_diffusion("6").ddim_sample_loop(
            constant_eps_model, SHAPE, noise=th.zeros(SHAPE), eps_scale=1.01
        ),
    )

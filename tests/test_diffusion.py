"""The diffusion process, respacing, VLB losses and timestep samplers.

Checked against closed forms, independent computations (torch.distributions, the exact normal
CDF) and the reference vectors of the original ADM code (../shared/reference/adm_golden.pt).
"""

import math

import numpy as np
import pytest
import torch as th
import torch.nn.functional as F

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion.losses import approx_standard_normal_cdf, discretized_gaussian_log_likelihood, normal_kl
from guided_diffusion.resample import LossSecondMomentResampler, UniformSampler, create_named_schedule_sampler
from guided_diffusion.respace import SpacedDiffusion, space_timesteps

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

# ---------------------------------------------------------------- schedules


def test_linear_schedule_is_ddpm_range_rescaled_to_step_count():
    for n in (1000, 250):
        betas = gd.get_named_beta_schedule("linear", n)
        scale = 1000 / n
        expected = np.array([scale * (1e-4 + i * (0.02 - 1e-4) / (n - 1)) for i in range(n)])
        assert betas.dtype == np.float64 and betas.shape == (n,)
        np.testing.assert_allclose(betas, expected, rtol=1e-12)


def test_cosine_schedule_follows_its_alpha_bar():
    n = 1000
    betas = gd.get_named_beta_schedule("cosine", n)

    def f(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    alpha_bar = np.cumprod(1 - betas)
    expected = np.array([f((i + 1) / n) / f(0) for i in range(n)])
    # Unclipped steps follow alpha_bar exactly; the last beta is clipped to 0.999.
    np.testing.assert_allclose(alpha_bar[:-1], expected[:-1], rtol=1e-9)
    assert betas[-1] == 0.999
    assert (betas[:-1] < 0.999).all()


def test_bad_schedule_and_betas_are_refused():
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        gd.get_named_beta_schedule("quadratic", 10)
    common = dict(
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_LARGE,
        loss_type=gd.LossType.MSE,
    )
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        gd.GaussianDiffusion(betas=np.array([0.1, 0.0, 0.2]), **common)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):  # beta 1 would make alpha_bar 0
        gd.GaussianDiffusion(betas=np.array([0.1, 0.5, 1.0]), **common)
    with pytest.raises(ValueError, match="at least 2 steps"):
        gd.GaussianDiffusion(betas=np.array([0.1]), **common)


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_matches_its_closed_form_and_moments():
    diffusion = make_diffusion("1000", "linear")
    x0 = th.tensor([[0.5, -0.25, 0.9]]).repeat(4, 1)
    t = th.tensor([0, 100, 500, 999])
    abar = th.tensor(np.cumprod(1 - gd.get_named_beta_schedule("linear", 1000))[[0, 100, 500, 999]])

    mean, var, log_var = diffusion.q_mean_variance(x0, t)
    assert_close(mean.double(), abar.sqrt()[:, None] * x0.double(), 1e-6, "q mean")
    assert_close(var.double(), (1 - abar)[:, None].expand(4, 3), 1e-6, "q variance")
    assert_close(log_var.double(), th.log(1 - abar)[:, None].expand(4, 3), 1e-5, "q log variance")

    noise = th.randn(4, 3)
    x_t = diffusion.q_sample(x0, t, noise=noise)
    expected = abar.sqrt()[:, None] * x0.double() + (1 - abar).sqrt()[:, None] * noise.double()
    assert_close(x_t.double(), expected, 1e-6, "q_sample")

    # Fresh noise: empirical moments of 20000 draws.
    gen_state = th.random.get_rng_state()
    th.manual_seed(0)
    many = diffusion.q_sample(x0[1:3].repeat(10000, 1), th.tensor([100, 500]).repeat(10000))
    th.random.set_rng_state(gen_state)
    draws = many.view(10000, 2, 3).double()
    assert_close(draws.mean(0), abar[1:3].sqrt()[:, None] * x0[1:3].double(), 0.02, "empirical mean")
    assert_close(draws.var(0), (1 - abar[1:3])[:, None].expand(2, 3), 0.03, "empirical variance")

    with pytest.raises(ValueError, match="noise shape"):
        diffusion.q_sample(x0, t, noise=th.zeros(4, 2))


def test_posterior_matches_bayes_rule():
    diffusion = make_diffusion("50", "cosine")
    betas = th.tensor(diffusion.betas)
    abar = th.cumprod(1 - betas, 0)
    t = th.tensor([1, 10, 30, 49])
    x0 = th.randn(4, 5)
    x_t = th.randn(4, 5)

    # q(x_{t-1} | x_0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1})
    # q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t)
    abar_prev = abar[t - 1][:, None]
    alpha = (1 - betas[t])[:, None]
    precision = 1 / (1 - abar_prev) + alpha / betas[t][:, None]
    var = 1 / precision
    mean = var * (
        abar_prev.sqrt() * x0.double() / (1 - abar_prev) + alpha.sqrt() * x_t.double() / betas[t][:, None]
    )

    got_mean, got_var, got_log_var = diffusion.q_posterior_mean_variance(x0, x_t, t)
    assert_close(got_mean.double(), mean, 1e-5, "posterior mean")
    assert_close(got_var.double() / var, th.ones_like(var), 1e-5, "posterior variance (relative)")
    assert_close(got_log_var.double(), var.log(), 1e-5, "posterior log variance")

    # At t = 0 the posterior is a point mass; its log-variance takes t = 1's value.
    _, var0, log_var0 = diffusion.q_posterior_mean_variance(x0[:1], x_t[:1], th.tensor([0]))
    assert var0.abs().max() == 0
    assert_close(
        log_var0, got_log_var.new_full((1, 5), float(diffusion.posterior_log_variance_clipped[1])), 0, "t=0"
    )


def test_x0_eps_and_xprev_predictions_invert_each_other():
    diffusion = make_diffusion("20", "linear")
    t = th.tensor([0, 7, 19])
    x_t, x0 = th.randn(3, 4), th.randn(3, 4)
    abar = th.tensor(diffusion.alphas_cumprod)[t][:, None]
    eps = diffusion._predict_eps_from_xstart(x_t, t, x0)
    assert_close(
        eps.double(), (x_t.double() - abar.sqrt() * x0.double()) / (1 - abar).sqrt(), 1e-4, "eps from x0"
    )
    assert_close(diffusion._predict_xstart_from_eps(x_t, t, eps), x0, 1e-4, "x0 from eps")
    xprev = diffusion.q_posterior_mean_variance(x0, x_t, t)[0]
    assert_close(diffusion._predict_xstart_from_xprev(x_t, t, xprev), x0, 1e-4, "x0 from x_{t-1}")


# ---------------------------------------------------------------- respacing


def test_space_timesteps_equals_reference(adm_golden):
    for spec, steps in adm_golden["space_timesteps"].items():
        assert sorted(space_timesteps(1000, spec)) == list(steps), spec


def test_space_timesteps_closed_forms_and_errors():
    assert space_timesteps(1000, "ddim25") == set(range(0, 1000, 40))
    assert space_timesteps(10, "10") == set(range(10))
    assert space_timesteps(100, [1, 1]) == {0, 50}
    assert space_timesteps(9, "2,3,2") == {0, 2, 3, 4, 5, 6, 8}
    # ADM adds the stride up step by step: 10 x 49.95 is 499.49999... there, not 499.5
    assert 499 in space_timesteps(1000, "21") and 500 not in space_timesteps(1000, "21")
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(10, "ddim7")
    with pytest.raises(ValueError, match="between 1 and 5"):
        space_timesteps(10, "6,1")
    with pytest.raises(ValueError, match="cannot read timestep respacing"):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError, match="cannot read timestep respacing"):
        space_timesteps(1000, "ddimX")


def test_spaced_diffusion_keeps_alpha_bar_and_maps_timesteps():
    betas = gd.get_named_beta_schedule("linear", 1000)
    common = dict(
        betas=betas,
        model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL,
        loss_type=gd.LossType.MSE,
    )
    kept = [0, 3, 400, 999]
    spaced = SpacedDiffusion(use_timesteps=kept, **common)
    np.testing.assert_allclose(spaced.alphas_cumprod, np.cumprod(1 - betas)[kept], rtol=1e-12)
    assert spaced.timestep_map == kept and spaced.num_timesteps == 4 and spaced.original_num_steps == 1000

    seen = []

    def model(x, ts):
        seen.append(ts.clone())
        return th.zeros_like(x)

    x = th.zeros(4, 2)
    spaced.p_mean_variance(model, x, th.tensor([0, 1, 2, 3]))
    assert seen[-1].tolist() == kept

    rescaled = SpacedDiffusion(use_timesteps=kept, rescale_timesteps=True, **common)
    rescaled.p_mean_variance(model, x, th.tensor([3, 2, 1, 0]))
    assert th.allclose(seen[-1], th.tensor([999.0, 400.0, 3.0, 0.0]))

    plain = gd.GaussianDiffusion(rescale_timesteps=True, **{**common, "betas": betas[:250] * 4})
    plain.p_mean_variance(model, x, th.tensor([249, 100, 1, 0]))
    assert th.allclose(seen[-1], th.tensor([996.0, 400.0, 4.0, 0.0]))

    with pytest.raises(ValueError, match="outside the base process"):
        SpacedDiffusion(use_timesteps=[0, 1000], **common)


# ---------------------------------------------------------------- losses.py


def test_normal_kl_matches_torch_distributions():
    m1, m2 = th.randn(6), th.randn(6)
    lv1, lv2 = th.randn(6), th.randn(6)
    expected = th.distributions.kl_divergence(
        th.distributions.Normal(m1, (0.5 * lv1).exp()), th.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert_close(normal_kl(m1, lv1, m2, lv2), expected, 1e-5, "normal_kl")
    # Numbers stand for constant tensors.
    assert_close(normal_kl(m1, lv1, 0.0, 0.0), normal_kl(m1, lv1, th.zeros(6), th.zeros(6)), 0, "scalars")
    with pytest.raises(ValueError, match="at least one tensor"):
        normal_kl(0.0, 0.0, 1.0, 0.0)


def test_discretized_likelihood_is_a_distribution_over_256_levels():
    levels = th.linspace(-1, 1, 256, dtype=th.float64)[:, None]
    for mean, log_scale in ((0.1, -1.0), (-0.7, -3.0), (0.95, -0.5)):
        means = th.full_like(levels, mean)
        log_scales = th.full_like(levels, log_scale)
        probs = discretized_gaussian_log_likelihood(levels, means=means, log_scales=log_scales).exp()
        # The bins tile the real line, so the probabilities telescope to 1.
        assert abs(probs.sum().item() - 1.0) < 1e-9
        # Each bin's mass is close to the exact Gaussian's (the CDF is an approximation).
        exact = th.distributions.Normal(mean, math.exp(log_scale))
        upper = th.where(levels > 0.999, th.tensor(1.0, dtype=th.float64), exact.cdf(levels + 1 / 255))
        lower = th.where(levels < -0.999, th.tensor(0.0, dtype=th.float64), exact.cdf(levels - 1 / 255))
        assert_close(probs, upper - lower, 2e-3, "bin mass")
    x = th.linspace(-4, 4, 101)
    assert_close(approx_standard_normal_cdf(x), th.special.ndtr(x), 1e-3, "approximate normal cdf")
    with pytest.raises(ValueError, match="one shape"):
        discretized_gaussian_log_likelihood(th.zeros(2), means=th.zeros(3), log_scales=th.zeros(2))


# ---------------------------------------------------------------- training losses and likelihood


def test_training_losses_equal_their_definitions():
    th.manual_seed(1)
    x0, noise = th.rand(3, 2, 4, 4) * 2 - 1, th.randn(3, 2, 4, 4)
    t = th.tensor([0, 3, 9])
    weight = th.randn(4, 2, 1, 1)

    def model(x, ts):
        return F.conv2d(x, weight) * (1 + ts.float()[:, None, None, None] / 100)

    # Epsilon, fixed variance: the loss is the noise MSE.
    diffusion = make_diffusion("10", "cosine")
    eps_model = lambda x, ts: model(x, ts)[:, :2]  # noqa: E731
    x_t = diffusion.q_sample(x0, t, noise=noise)
    terms = diffusion.training_losses(eps_model, x0, t, noise=noise)
    expected = ((eps_model(x_t, th.tensor(diffusion.timestep_map)[t]) - noise) ** 2).mean(dim=(1, 2, 3))
    assert_close(terms["loss"], expected, 1e-6, "mse loss")
    assert "vb" not in terms

    # Start-x target.
    startx = make_diffusion("10", "cosine", mean_type=gd.ModelMeanType.START_X)
    terms = startx.training_losses(eps_model, x0, t, noise=noise)
    expected = ((eps_model(x_t, th.tensor(startx.timestep_map)[t]) - x0) ** 2).mean(dim=(1, 2, 3))
    assert_close(terms["mse"], expected, 1e-6, "start_x mse")

    # KL loss at t > 0: KL between the true posterior and the model's Gaussian, in bits.
    kl_diffusion = make_diffusion("10", "cosine", var_type=gd.ModelVarType.LEARNED, loss_type=gd.LossType.KL)
    terms = kl_diffusion.training_losses(model, x0, t, noise=noise)
    out = model(x_t, th.tensor(kl_diffusion.timestep_map)[t])
    eps, log_var = out[:, :2], out[:, 2:]
    pred_x0 = kl_diffusion._predict_xstart_from_eps(x_t, t, eps)
    model_mean = kl_diffusion.q_posterior_mean_variance(pred_x0, x_t, t)[0]
    true_mean, true_var, _ = kl_diffusion.q_posterior_mean_variance(x0, x_t, t)
    kl = th.distributions.kl_divergence(
        th.distributions.Normal(true_mean[1:], true_var[1:].sqrt()),
        th.distributions.Normal(model_mean[1:], (0.5 * log_var[1:]).exp()),
    )
    assert_close(terms["loss"][1:], kl.mean(dim=(1, 2, 3)) / math.log(2), 1e-4, "kl loss")
    # At t = 0 it is the decoder NLL of x0.
    nll = -discretized_gaussian_log_likelihood(x0[:1], means=model_mean[:1], log_scales=0.5 * log_var[:1])
    assert_close(terms["loss"][:1], nll.mean(dim=(1, 2, 3)) / math.log(2), 1e-4, "decoder nll")
    rescaled = make_diffusion(
        "10", "cosine", var_type=gd.ModelVarType.LEARNED, loss_type=gd.LossType.RESCALED_KL
    )
    assert_close(
        rescaled.training_losses(model, x0, t, noise=noise)["loss"], terms["loss"] * 10, 1e-3, "rescaled kl"
    )

    with pytest.raises(ValueError, match="must output 4 channels"):
        kl_diffusion.training_losses(eps_model, x0, t, noise=noise)


def test_training_losses_train_the_variance_only_through_the_vb():
    diffusion = make_diffusion("10", "cosine", var_type=gd.ModelVarType.LEARNED_RANGE)
    x0, t = th.rand(2, 2, 4, 4) * 2 - 1, th.tensor([2, 6])
    weight = th.randn(4, 2, 1, 1, requires_grad=True)
    terms = diffusion.training_losses(lambda x, ts: F.conv2d(x, weight), x0, t)
    (grad_vb,) = th.autograd.grad(terms["vb"].sum(), weight, retain_graph=True)
    (grad_mse,) = th.autograd.grad(terms["mse"].sum(), weight)
    assert grad_vb[:2].abs().max() == 0 and grad_vb[2:].abs().max() > 0
    assert grad_mse[2:].abs().max() == 0 and grad_mse[:2].abs().max() > 0
    assert_close(terms["loss"], terms["mse"] + terms["vb"], 0, "loss = mse + vb")


def test_calc_bpd_loop_adds_up_and_prior_is_a_closed_form():
    diffusion = make_diffusion("4", "cosine", var_type=gd.ModelVarType.LEARNED_RANGE)
    x0 = th.rand(2, 3, 4, 4) * 2 - 1
    zero_model = lambda x, ts: th.zeros(2, 6, 4, 4)  # noqa: E731
    out = diffusion.calc_bpd_loop(
        zero_model, x0, clip_denoised=False, generator=th.Generator().manual_seed(0)
    )
    assert out["vb"].shape == (2, 4) and out["mse"].shape == (2, 4) and out["xstart_mse"].shape == (2, 4)
    assert_close(out["total_bpd"], out["vb"].sum(1) + out["prior_bpd"], 1e-5, "total bpd")
    abar = th.tensor(diffusion.alphas_cumprod)
    mean, var = abar[-1].sqrt() * x0.double(), 1 - abar[-1]
    prior = 0.5 * (var + mean**2 - 1 - var.log())
    assert_close(out["prior_bpd"].double(), prior.mean(dim=(1, 2, 3)) / math.log(2), 1e-6, "prior bpd")
    # The loop draws its noise from the generator at t = 3, 2, 1, 0. A zero-noise model predicts
    # x0 = x_t / sqrt(abar): its eps error is the noise, its x0 error the noise * sqrt(1/abar - 1).
    gen = th.Generator().manual_seed(0)
    for column, t in enumerate([3, 2, 1, 0]):
        noise = th.randn(x0.shape, generator=gen).double()
        assert_close(out["mse"][:, column].double(), (noise**2).mean(dim=(1, 2, 3)), 1e-5, f"eps mse t={t}")
        x0_err = (noise**2).mean(dim=(1, 2, 3)) * (1 / abar[t] - 1)
        assert_close(
            out["xstart_mse"][:, column].double(), x0_err, 1e-4 * float(1 / abar[t]), f"x0 mse t={t}"
        )


# ---------------------------------------------------------------- resample.py


def test_uniform_sampler_weights_are_one():
    diffusion = make_diffusion("10")
    sampler = create_named_schedule_sampler("uniform", diffusion)
    assert isinstance(sampler, UniformSampler)
    np.random.seed(0)
    t, w = sampler.sample(500, "cpu")
    assert t.dtype == th.int64 and t.min() >= 0 and t.max() <= 9 and len(set(t.tolist())) == 10
    assert th.equal(w, th.ones(500))
    with pytest.raises(ValueError, match="unknown schedule sampler 'importance'"):
        create_named_schedule_sampler("importance", diffusion)


def test_loss_second_moment_weights_follow_rms_history():
    diffusion = make_diffusion("4")
    sampler = create_named_schedule_sampler("loss-second-moment", diffusion)
    assert isinstance(sampler, LossSecondMomentResampler)
    history = {0: [1.0, 3.0], 1: [2.0, 2.0], 2: [0.5, 0.5], 3: [4.0, 0.0]}
    sampler = LossSecondMomentResampler(diffusion, history_per_term=2, uniform_prob=0.1)
    sampler.update_with_local_losses(th.tensor([0, 1, 2, 3]), th.tensor([9.0, 9.0, 9.0, 9.0]))
    assert np.array_equal(sampler.weights(), np.ones(4))  # not warmed up yet: one loss each
    # Two more rounds; the first round's 9.0 is shifted out.
    for i in range(2):
        sampler.update_with_local_losses(
            th.tensor([0, 1, 2, 3]), th.tensor([history[t][i] for t in range(4)])
        )
    rms = np.array([math.sqrt((a * a + b * b) / 2) for a, b in history.values()])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-12)
    np.random.seed(0)
    t, w = sampler.sample(1000, "cpu")
    np.testing.assert_allclose(w.numpy(), 1 / (4 * expected[t.numpy()]), rtol=1e-6)


def _gather_worker(rank, store_path, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    sampler = LossSecondMomentResampler(make_diffusion("4"), history_per_term=3)
    local = {0: ([0, 1, 1], [1.0, 2.0, 3.0]), 1: ([3], [7.0])}[rank]
    sampler.update_with_local_losses(th.tensor(local[0]), th.tensor(local[1]))
    results[rank] = (sampler._loss_history.tolist(), sampler._loss_counts.tolist())
    dist.destroy_process_group()


def test_loss_aware_sampler_gathers_every_rank(tmp_path):
    import torch.multiprocessing as mp

    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_gather_worker, args=(str(tmp_path / "store"), results), nprocs=2)
        results = dict(results)
    expected = ([[1.0, 0, 0], [2.0, 3.0, 0], [0, 0, 0], [7.0, 0, 0]], [1, 2, 0, 1])
    assert results[0] == expected and results[1] == expected


# ---------------------------------------------------------------- reference vectors of the original ADM


@pytest.mark.parametrize("index", [0, 1])
def test_p_mean_variance_equals_adm(adm_golden, index):
    case = adm_golden["diffusion"][index]
    net = golden_network("u32_new_order" if case["learn_sigma"] else "u32_plain")
    diffusion = golden_diffusion(case)
    with th.no_grad():
        for i, expected in case["pmv"].items():
            t = th.full((case["x"].shape[0],), int(i))
            out = diffusion.p_mean_variance(net, case["x"], t, clip_denoised=True)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                atol = pmv_tolerance(diffusion, int(i), key)
                assert_close(out[key], expected[key], atol, f"case {index} pmv[{i}] {key}")


@pytest.mark.parametrize("index", [0, 1])
def test_ddim_loop_and_training_losses_equal_adm(adm_golden, index):
    case = adm_golden["diffusion"][index]
    net = golden_network("u32_new_order" if case["learn_sigma"] else "u32_plain")
    diffusion = golden_diffusion(case)
    x = case["x"]
    sample = diffusion.ddim_sample_loop(net, x.shape, noise=x, clip_denoised=True, eta=0.0)
    assert_loop_close(sample, case["ddim_eta0"], f"case {index} ddim_eta0")

    t = th.tensor([0, diffusion.num_timesteps - 1])
    with th.no_grad():
        terms = diffusion.training_losses(net, case["x_start"], t, noise=case["noise"])
    for key, expected in case["training_losses"].items():
        rel = ((terms[key] - expected).abs() / expected.abs().clamp(min=1)).max().item()
        assert rel < 1e-4, f"case {index} training_losses {key}: {terms[key]} vs {expected}"


def test_classifier_guidance_equals_adm(adm_golden):
    case = adm_golden["guidance"][0]
    model = unconditional(golden_network("u32_new_order"))
    cond_fn = golden_cond_fn(case["scale"])
    diffusion = guidance_diffusion()
    x, kwargs = case["x"], {"y": case["y"]}
    with th.no_grad():
        for i, expected in case["cond_mean"].items():
            t = th.full((x.shape[0],), int(i))
            pmv = diffusion.p_mean_variance(model, x, t, clip_denoised=True, model_kwargs=kwargs)
            mean = diffusion.condition_mean(cond_fn, pmv, x, t, model_kwargs=kwargs)
            assert_close(mean, expected, 1e-4, f"cond_mean[{i}]")
            score = diffusion.condition_score(cond_fn, pmv, x, t, model_kwargs=kwargs)
            for key in ("mean", "variance", "log_variance", "pred_xstart"):
                assert_close(score[key], case["cond_score"][i][key], 1e-4, f"cond_score[{i}] {key}")
    sample = diffusion.ddim_sample_loop(
        model, x.shape, noise=x, clip_denoised=True, eta=0.0, cond_fn=cond_fn, model_kwargs=kwargs
    )
    assert_loop_close(sample, case["ddim_guided"], "ddim_guided")


def test_schedule_arrays_are_uploaded_once_per_diffusion_and_go_with_it():
    import gc
    import weakref

    from guided_diffusion import gaussian_diffusion as gd_module
    from guided_diffusion.script_util import create_gaussian_diffusion

    def model(x, t):
        return th.zeros_like(x)

    uploads = []
    real_from_numpy = th.from_numpy

    def counting_from_numpy(arr):
        uploads.append(arr.shape)
        return real_from_numpy(arr)

    def loop(diffusion):
        before = len(uploads)
        gd_module.th.from_numpy = counting_from_numpy
        try:
            sample = diffusion.p_sample_loop(model, (2, 3, 4, 4), generator=th.Generator().manual_seed(0))
        finally:
            gd_module.th.from_numpy = real_from_numpy
        return len(uploads) - before, sample

    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="10")
    first, sample = loop(diffusion)
    assert first > 0  # the loop reads schedule arrays
    assert [loop(diffusion)[0] for _ in range(2)] == [0, 0]  # later loops upload nothing
    temporary = create_gaussian_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="10")
    again, same = loop(temporary)
    assert again == first and th.equal(same, sample)  # its own uploads, the same numbers
    collected = weakref.ref(temporary)
    del temporary
    gc.collect()
    assert collected() is None  # nothing outside the diffusion keeps it (or its uploads) alive


@pytest.mark.parametrize("loop,step", [("p_sample_loop", "p_sample"), ("ddim_sample_loop", "ddim_sample")])
def test_loops_call_the_public_step_a_subclass_overrides(loop, step):
    """ADM's loops call self.p_sample / self.ddim_sample, so forks that override a step (as
    TS-DPM-ADM does with ddim_sample) keep working: the override sees every step, and what it
    returns is what the loop continues from."""
    base = SpacedDiffusion(space_timesteps(20, "5"), betas=gd.get_named_beta_schedule("cosine", 20),
                           model_mean_type=gd.ModelMeanType.EPSILON, model_var_type=gd.ModelVarType.FIXED_SMALL,
                           loss_type=gd.LossType.MSE)
    seen = []

    def override(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0):
        seen.append(int(t[0]))  # ADM's exact signature: the loop passes nothing ADM's lacks by default
        return {"sample": x * 0 + len(seen), "pred_xstart": x}

    diffusion = type("Fork", (SpacedDiffusion,), {step: override})(
        base.use_timesteps, betas=gd.get_named_beta_schedule("cosine", 20), model_mean_type=gd.ModelMeanType.EPSILON,
        model_var_type=gd.ModelVarType.FIXED_SMALL, loss_type=gd.LossType.MSE)
    out = getattr(diffusion, loop)(lambda x, t: th.zeros_like(x), (2, 1, 2, 2), noise=th.ones(2, 1, 2, 2))
    assert seen == [4, 3, 2, 1, 0] and th.equal(out, th.full((2, 1, 2, 2), 5.0))

"""EDM samplers with Epsilon Scaling (edm/samplers.py): closed forms on Gaussian data, hand-computed
steps, noise streams, the ADM-checkpoint wrapper, and scripts/edm_sample.py on an ADM model."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sample_scripts import run_in_process, run_script

from guided_diffusion.eps_scaling import EpsScaleError
from guided_diffusion.edm.samplers import (
    ADMDenoiser,
    edm_sigmas,
    iddpm_sigmas,
    karras_sample,
    network_evaluations,
    sampling_sigmas,
)
from guided_diffusion.image_noise import ImageNoise


def gaussian_denoiser(data_std):
    """The exact denoiser of data N(0, s^2 I): E[x0 | x0 + sigma n = x] = x s^2 / (s^2 + sigma^2)."""

    def denoise(x, sigma, class_labels=None):
        sigma = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        return x * data_std**2 / (data_std**2 + sigma**2)

    return denoise


def latents(n=4096, seed=0):
    return torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


def exact_flow(noise, data_std, sigma_max=80.0):
    """The probability-flow ODE solved exactly from sigma_max to 0: x(s) is proportional to sqrt(s^2 + sigma^2)."""
    return noise.double() * sigma_max * data_std / math.sqrt(data_std**2 + sigma_max**2)


# ---------------------------------------------------------------------------------------------
# Gaussian data, exact denoiser


def test_heun_with_many_steps_lands_on_the_data_distribution():
    noise, s = latents(), 0.7
    x = karras_sample(gaussian_denoiser(s), noise.shape, noise=noise, num_steps=120)
    assert float(x.std()) == pytest.approx(float(exact_flow(noise, s).std()), rel=2e-3)
    assert float(x.std()) == pytest.approx(s, rel=0.05)  # 4096 draws: the sample std is within a few %


@pytest.mark.parametrize(
    "solver, quoted",
    [("heun", 0.529), ("euler", 0.424)],
)
def test_design_numbers_at_18_steps(solver, quoted):
    """DESIGN.md: data std 0.5, exact denoiser, 18 EDM steps end with std 0.529 (Heun) and 0.424
    (Euler) where the exact flow of the same latents ends with 0.502. The ratios are what the
    solver does; they hold for any set of latents (the problem is linear)."""
    noise, s = latents(), 0.5
    x = karras_sample(gaussian_denoiser(s), noise.shape, noise=noise, num_steps=18, solver=solver)
    ratio = float(x.std() / exact_flow(noise, s).std())
    # the quoted numbers are rounded to 3 decimals: the ratio lies within their rounding intervals
    assert (quoted - 5e-4) / (0.502 + 5e-4) <= ratio <= (quoted + 5e-4) / (0.502 - 5e-4)


def test_lambda_signs_as_in_the_paper_table():
    """lambda < 1 moves Heun toward the truth, lambda > 1 moves Euler toward it (DESIGN.md)."""
    noise, s = latents(), 0.5
    truth = float(exact_flow(noise, s).std())

    def error(solver, lam):
        x = karras_sample(gaussian_denoiser(s), noise.shape, noise=noise, num_steps=18, solver=solver, eps_scale=lam)
        return abs(float(x.std()) - truth)

    assert error("heun", 0.99) < error("heun", 1.0) < error("heun", 1.01)
    assert error("euler", 1.01) < error("euler", 1.0) < error("euler", 0.99)


def edm_algorithm2(denoise, noise, sigmas, solver, lambdas):
    """EDM's Algorithm 2 written out in float64 numpy, eps divided by lambdas[i] at step i."""
    x = noise.numpy().astype(np.float64) * sigmas[0]
    n = len(sigmas) - 1
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s)) / s / lambdas[i]
        x_next = x + (s_next - s) * d
        if solver == "heun" and i < n - 1:
            d2 = (x_next - denoise(x_next, s_next)) / s_next / lambdas[i]
            x_next = x + (s_next - s) * (d + d2) / 2
        x = x_next
    return x


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_matches_algorithm2_by_hand_with_a_linear_lambda(solver):
    """A nonlinear denoiser and lambda_t = 0.01 t + 1.02: step i uses t = N - 1 - i for both
    evaluations of a Heun step."""
    n_steps = 4
    noise = latents(8, seed=3)
    sigmas = edm_sigmas(n_steps).tolist() + [0.0]
    lambdas = [0.01 * (n_steps - 1 - i) + 1.02 for i in range(n_steps)]

    def np_denoise(x, s):
        return 0.5 * np.tanh(x / (1 + s))

    def torch_denoise(x, sigma, labels=None):
        return 0.5 * torch.tanh(x / (1 + sigma.reshape(-1, 1)))

    x = karras_sample(torch_denoise, noise.shape, noise=noise, num_steps=n_steps, solver=solver,
                      eps_scale="linear:k=0.01,b=1.02")
    expected = edm_algorithm2(np_denoise, noise, sigmas, solver, lambdas)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-12, atol=1e-12)
    # and the scaling mattered
    plain = edm_algorithm2(np_denoise, noise, sigmas, solver, [1.0] * n_steps)
    assert np.abs(expected - plain).max() > 1e-3


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_lambda_one_reproduces_the_unscaled_sampler_exactly(solver):
    noise = latents(16, seed=5)
    den = gaussian_denoiser(0.6)
    common = dict(noise=noise, num_steps=7, solver=solver, S_churn=5.0)
    base = karras_sample(den, noise.shape, generator=ImageNoise(1, range(16)), **common)
    for lam in (1.0, "1.0", "table:" + ",".join(["1"] * 7)):
        again = karras_sample(den, noise.shape, eps_scale=lam, generator=ImageNoise(1, range(16)), **common)
        assert torch.equal(base, again)


def test_churn_follows_edm_with_per_image_noise():
    """One churned Euler step by hand: sigma_hat = sigma (1 + gamma), x += sqrt(sigma_hat^2 - sigma^2) S_noise n."""
    shape = (3, 2)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    den = gaussian_denoiser(0.5)
    churn = 0.6  # gamma = min(0.6 / 2, sqrt(2) - 1) = 0.3 on levels in [S_min, S_max]: 80, not 0.002
    x = karras_sample(den, shape, noise=noise, num_steps=2, solver="euler", S_churn=churn, S_min=1.0, S_max=100.0,
                      S_noise=1.007, churn_generator=ImageNoise(9, [4, 5, 6]))
    sig = edm_sigmas(2).tolist() + [0.0]
    n0 = ImageNoise(9, [4, 5, 6]).randn(shape).double()
    s_hat = sig[0] * 1.3
    x0 = noise.double() * sig[0] + math.sqrt(s_hat**2 - sig[0] ** 2) * 1.007 * n0
    x1 = x0 + (sig[1] - s_hat) * (x0 - x0 * 0.25 / (0.25 + s_hat**2)) / s_hat
    x2 = x1 + (0 - sig[1]) * (x1 - x1 * 0.25 / (0.25 + sig[1] ** 2)) / sig[1]
    torch.testing.assert_close(x, x2, rtol=1e-12, atol=1e-12)


def test_image_noise_makes_samples_independent_of_the_batch():
    den = gaussian_denoiser(0.5)
    kw = dict(num_steps=5, S_churn=10.0)
    big = karras_sample(den, (4, 3), generator=ImageNoise(7, [0, 1, 2, 3]), **kw)
    one = karras_sample(den, (1, 3), generator=ImageNoise(7, [2]), **kw)
    assert torch.equal(big[2:3], one)
    other_seed = karras_sample(den, (1, 3), generator=ImageNoise(8, [2]), **kw)
    assert not torch.equal(one, other_seed)


def test_sigma_discretizations_against_closed_forms():
    s = edm_sigmas(5, 0.002, 80.0, 7.0)
    i = np.arange(5)
    expected = (80 ** (1 / 7) + i / 4 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(s.numpy(), expected, rtol=1e-13)
    # iDDPM: without the C_1 clip the recursion telescopes to u_j = sqrt(abar(M) / abar(j) - 1)
    abar = lambda j: math.sin(0.5 * math.pi * j / 1000 / 1.008) ** 2  # noqa: E731
    u = [math.sqrt(abar(1000) / abar(j) - 1) for j in range(1, 1001)]
    u = [math.sqrt((u[0] ** 2 + 1) / 0.001 - 1)] + u  # u_0: abar(0) = 0, the ratio is clipped to C_1
    inside = [v for v in u if 0.002 <= v <= 81]
    picks = np.array([inside[round((len(inside) - 1) / 5 * k)] for k in range(6)])
    # EDM evaluates abar in float32: 1 + sigma^2 carries float32's relative error (~1e-6)
    np.testing.assert_allclose(1 + iddpm_sigmas(6).numpy() ** 2, 1 + picks**2, rtol=3e-6)


# The noise levels EDM's ablation_sampler (generate.py, NVlabs/edm 008a4e5, --disc iddpm, 6 steps,
# CPU) evaluates an iDDPMPrecond with its defaults at, printed by EDM's code. The lowest is the
# network's u_999 (its sigma_min): with the levels computed as exactly as possible instead,
# u_999 falls below the network's float32 u_999 and the range test drops it.
EDM_IDDPM_6 = {
    (None, None): ["0x1.40d09a0000000p+6", "0x1.80e8b80000000p+1", "0x1.5f63c80000000p+0",
                   "0x1.761ada0000000p-1", "0x1.5601740000000p-2", "0x1.a4e4f00000000p-8"],
    (1e-5, None): ["0x1.40d09a0000000p+6", "0x1.80e8b80000000p+1", "0x1.5f63c80000000p+0",
                   "0x1.761ada0000000p-1", "0x1.5601740000000p-2", "0x1.a4e4f00000000p-8"],
    (1e-5, 1e4): ["0x1.40d4ca0000000p+9", "0x1.8b2a980000000p+1", "0x1.6408480000000p+0",
                  "0x1.79ca380000000p-1", "0x1.598f300000000p-2", "0x1.a4e4f00000000p-8"],
}


@pytest.mark.parametrize("bounds", list(EDM_IDDPM_6))
def test_iddpm_discretization_on_an_iddpm_network_gives_edms_levels(bounds):
    from guided_diffusion.edm.networks import build_edm_network

    net = build_edm_network("iDDPMPrecond", dict(img_resolution=8, img_channels=3, model_channels=16,
                                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
    sigmas = sampling_sigmas(net, 6, "iddpm", sigma_min=bounds[0], sigma_max=bounds[1])
    assert [float(v).hex() for v in sigmas[:-1]] == EDM_IDDPM_6[bounds] and float(sigmas[-1]) == 0.0


def test_sampling_sigmas_respects_the_denoiser():
    den = gaussian_denoiser(0.5)
    den.sigma_min, den.sigma_max = 0.01, 20.0
    den.round_sigma = lambda s: torch.round(s * 100) / 100
    sig = sampling_sigmas(den, 6)
    assert float(sig[0]) == 20.0 and float(sig[-2]) == 0.01 and float(sig[-1]) == 0.0
    assert torch.equal(sig[:-1], torch.round(sig[:-1] * 100) / 100)
    assert network_evaluations("heun", 18) == 35 and network_evaluations("euler", 35) == 35


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(solver="rk4"), "solver"),
        (dict(num_steps=1), "num_steps"),
        (dict(discretization="vp"), "discretization"),
        (dict(sigma_min=5.0, sigma_max=1.0), "sigma_min"),
        (dict(S_churn=-1.0), "S_churn"),
        (dict(eps_scale="table:1.0,1.0"), "table"),
        (dict(eps_scale=0.0), "non-positive"),
        (dict(noise=torch.zeros(3, 2)), "noise has shape"),
    ],
)
def test_bad_arguments_fail_with_clear_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        karras_sample(gaussian_denoiser(0.5), (2, 2), **{"num_steps": 4, **kwargs})
    assert issubclass(EpsScaleError, ValueError)


# ---------------------------------------------------------------------------------------------
# ADM epsilon models as denoisers


def adm_alphas_cumprod(schedule, steps=1000):
    """ADM's schedules, computed here from their definitions (Nichol & Dhariwal 2021)."""
    if schedule == "linear":
        scale = 1000 / steps
        betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    else:
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / steps) / f(i / steps), 0.999) for i in range(steps)])
    return np.cumprod(1 - betas)


class RecordingEpsModel:
    """Returns eps = 0.1 * input + 0.001 * t (and junk variance channels); remembers its inputs."""

    def __init__(self, learn_sigma=False):
        self.learn_sigma = learn_sigma
        self.calls = []

    def __call__(self, x, t, **kwargs):
        self.calls.append((x.clone(), t.clone(), kwargs))
        eps = 0.1 * x + 0.001 * t.to(x.dtype).reshape(-1, 1, 1, 1)
        return torch.cat([eps, torch.full_like(x, 99.0)], 1) if self.learn_sigma else eps


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_adm_wrapper_picks_the_nearest_timestep(schedule):
    abar = adm_alphas_cumprod(schedule)
    grid = np.sqrt((1 - abar) / abar)
    chosen = [0, 1, 17, 250, 500, 998, 999]
    # exact grid values, and points 40% / 60% of the way to the next level
    queries = [grid[j] for j in chosen]
    expect = list(chosen)
    for j in (3, 400, 900):
        queries += [grid[j] + 0.4 * (grid[j + 1] - grid[j]), grid[j] + 0.6 * (grid[j + 1] - grid[j])]
        expect += [j, j + 1]
    queries += [grid[0] / 10, grid[-1] * 10]  # outside the range: the end steps
    expect += [0, 999]
    model = RecordingEpsModel()
    den = ADMDenoiser(model, abar)
    x = torch.randn(len(queries), 3, 2, 2, dtype=torch.float64)
    sigma = torch.tensor(queries, dtype=torch.float64)
    out = den(x, sigma)
    model_x, model_t, _ = model.calls[-1]
    assert model_t.tolist() == expect
    assert den.round_sigma(sigma).tolist() == pytest.approx([grid[j] for j in expect], rel=1e-12)
    c_in = 1 / np.sqrt(np.array(queries) ** 2 + 1)
    np.testing.assert_allclose(model_x.numpy(), (x.numpy() * c_in[:, None, None, None]).astype(np.float32), rtol=1e-6)
    eps = (0.1 * model_x + 0.001 * torch.tensor(expect, dtype=torch.float32).reshape(-1, 1, 1, 1)).double()
    torch.testing.assert_close(out, x - sigma.reshape(-1, 1, 1, 1) * eps, rtol=1e-12, atol=1e-12)
    assert den.sigma_min == pytest.approx(grid[0]) and den.sigma_max == pytest.approx(grid[-1])


def test_adm_wrapper_drops_variance_rescales_and_maps_respaced_steps():
    abar_full = adm_alphas_cumprod("cosine")
    kept = [0, 99, 499, 999]
    diffusion = SimpleNamespace(alphas_cumprod=abar_full[kept], timestep_map=kept, original_num_steps=1000,
                                rescale_timesteps=True)
    model = RecordingEpsModel(learn_sigma=True)
    den = ADMDenoiser.from_diffusion(model, diffusion)
    sig = torch.sqrt(torch.tensor((1 - abar_full[kept]) / abar_full[kept]))
    x = torch.ones(4, 3, 2, 2, dtype=torch.float64)
    labels = torch.tensor([[0, 1.0], [1, 0], [0, 1], [1, 0]])
    out = den(x, sig, labels)
    model_x, t, kwargs = model.calls[-1]
    assert t.dtype == torch.float32 and t.tolist() == [k * 1000 / 1000 for k in kept]
    assert kwargs["y"].tolist() == [1, 0, 1, 0]
    eps = (0.1 * model_x + 0.001 * t.reshape(-1, 1, 1, 1)).double()  # the 99.0 variance channels are dropped
    torch.testing.assert_close(out, x - sig.reshape(-1, 1, 1, 1) * eps, rtol=1e-12, atol=1e-12)
    den(x, sig, torch.tensor([3, 1, 4, 1]))
    assert model.calls[-1][2]["y"].tolist() == [3, 1, 4, 1]


def test_adm_wrapper_rejects_bad_input():
    with pytest.raises(ValueError, match="alphas_cumprod"):
        ADMDenoiser(RecordingEpsModel(), [1.0, 0.5])
    with pytest.raises(ValueError, match="decrease"):
        ADMDenoiser(RecordingEpsModel(), [0.5, 0.9])
    den = ADMDenoiser(lambda x, t: torch.zeros(x.shape[0], 5, *x.shape[2:]), adm_alphas_cumprod("cosine", 10))
    with pytest.raises(ValueError, match="channels"):
        den(torch.zeros(1, 3, 2, 2), torch.tensor([1.0]))


def test_adm_wrapper_with_exact_eps_samples_gaussian_data():
    """An eps model that is exact for N(0, s^2) data, through the wrapper and EDM's Heun: the
    discrete timestep grid and ADM's input scaling keep the end std near s."""
    abar = adm_alphas_cumprod("linear")
    s = 0.5

    def exact_eps(x_t, t):
        a = torch.tensor(abar, dtype=torch.float64)[t].reshape(-1, 1)
        # x_t = sqrt(a) x0 + sqrt(1 - a) eps: E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a)
        return ((1 - a).sqrt() * x_t.double() / (a * s**2 + 1 - a)).float()

    den = ADMDenoiser(exact_eps, abar)
    noise = latents(64)  # the map from noise to sample is linear: its gain does not depend on the batch
    x = karras_sample(den, noise.shape, noise=noise, num_steps=40)
    assert float(x.std()) == pytest.approx(float(noise.std()) * s, rel=0.01)


# ---------------------------------------------------------------------------------------------
# scripts/edm_sample.py on an ADM checkpoint


ADM_FLAGS = ["--image_size", "8", "--num_channels", "32", "--num_res_blocks", "1", "--attention_resolutions", "4",
             "--channel_mult", "1,2", "--num_head_channels", "16", "--learn_sigma", "True", "--class_cond", "True",
             "--num_classes", "3", "--diffusion_steps", "50", "--noise_schedule", "cosine"]


def run(*args, child=False):
    """scripts/edm_sample.py ARGS in this process (run_in_process), or with ``child`` in a child process."""
    return (run_script if child else run_in_process)("edm_sample.py", *args, check=False)


@pytest.fixture(scope="module")
def adm_checkpoint(tmp_path_factory):
    from guided_diffusion.script_util import create_model_and_diffusion, model_and_diffusion_defaults

    flags = model_and_diffusion_defaults()
    flags.update(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,2",
                 num_head_channels=16, learn_sigma=True, class_cond=True, num_classes=3, diffusion_steps=50,
                 noise_schedule="cosine")
    torch.manual_seed(0)
    model, _ = create_model_and_diffusion(**flags)
    with torch.no_grad():  # ADM starts its output layer at zero: make every layer count
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    path = tmp_path_factory.mktemp("adm") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def test_edm_sample_script_on_an_adm_checkpoint(adm_checkpoint, tmp_path):
    common = [*ADM_FLAGS, "--model_path", str(adm_checkpoint), "--num_samples", "3", "--num_steps", "3",
              "--solver", "euler", "--eps_scale", "1.004", "--sigma_max", "1.5", "--progress", "False", "--seed", "4"]
    # the one child process here: edm_sample.py as the user runs it
    a = run(*common, "--batch_size", "2", "--output_dir", str(tmp_path / "a"), child=True)
    assert a.returncode == 0, a.stderr
    b = run(*common, "--batch_size", "3", "--output_dir", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    npz_a, npz_b = np.load(tmp_path / "a" / "samples_3x8x8x3.npz"), np.load(tmp_path / "b" / "samples_3x8x8x3.npz")
    assert npz_a["arr_0"].dtype == np.uint8 and npz_a["arr_0"].shape == (3, 8, 8, 3)
    assert np.array_equal(npz_a["arr_1"], npz_b["arr_1"])
    # the same bytes whatever the batch: the network runs in fixed, index-aligned chunks
    assert (tmp_path / "a" / "samples_3x8x8x3.npz").read_bytes() == (tmp_path / "b" / "samples_3x8x8x3.npz").read_bytes()
    assert len(np.unique(npz_a["arr_0"])) > 20  # not saturated: the comparison means something
    sidecar = json.loads((tmp_path / "a" / "samples_3x8x8x3.json").read_text())
    assert sidecar["eps_scale"] == "1.004" and sidecar["eps_scale_values"] == [1.004] * 3
    assert sidecar["network_evaluations"] == 3 and sidecar["solver"] == "euler"


def test_edm_sample_script_errors_are_one_line(tmp_path):
    r = run("--num_samples", "1", "--output_dir", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert "--network" in r.stderr
    r = run("--network", str(tmp_path / "missing.pkl"), "--output_dir", str(tmp_path))
    assert r.returncode == 2 and "does not exist" in r.stderr

"""Time-Shift sampling (guided_diffusion/time_shift.py) in ADM's DDIM and ancestral loops.

Checked on Gaussian data with the exact noise predictor: the chosen timesteps against the rule
computed here in numpy, the DDIM update against its closed form, TS-DPM-ADM's quirks against the
worked example of the authors' code (cosine schedule, ddim5 / ddim10, window 80, cutoff 300).
"""

import math

import numpy as np
import pytest
import torch

from guided_diffusion.image_noise import ImageNoise
from guided_diffusion.script_util import create_gaussian_diffusion
from guided_diffusion.time_shift import StepShifter, TimeShift, TimeShiftError, parse_time_shift, time_shift_from_flags

from gaussian_chains import GaussianEps, gaussian_diffusion, tiny_unet_and_diffusion

S2 = 0.3
SHAPE = (4, 3, 8, 8)


def linear_abar(steps=100):
    """alpha_bar of DDPM's linear schedule rescaled to ``steps``, computed here."""
    scale = 1000 / steps
    betas = np.linspace(scale * 1e-4, scale * 0.02, steps)
    return np.cumprod(1 - betas)


def cosine_abar(steps=1000):
    f = [math.cos((s / steps + 0.008) / 1.008 * math.pi / 2) ** 2 for s in range(steps + 1)]
    betas = np.minimum([1 - f[i + 1] / f[i] for i in range(steps)], 0.999)
    return np.cumprod(1 - betas)


def paper_choice(x, current, scheduled, window, abar):
    """The paper rule, independently: per-image unbiased variance vs 1 - abar_k around the next time."""
    half = window // 2
    ks = np.arange(max(0, scheduled - half), min(scheduled + half, current - 1) + 1)
    variance = x.reshape(len(x), -1).astype(np.float64).var(axis=1, ddof=1)
    return ks[np.argmin((variance[:, None] - (1 - abar[ks])[None, :]) ** 2, axis=1)]


def run(diffusion, model, kind, shift, indices=range(SHAPE[0]), seed=5, **kwargs):
    loop = diffusion.ddim_sample_loop_progressive if kind == "ddim" else diffusion.p_sample_loop_progressive
    shape = (len(indices), *SHAPE[1:])
    return list(loop(model, shape, generator=ImageNoise(seed, list(indices)), time_shift=shift, **kwargs))


@pytest.mark.parametrize("window", [16, 30])  # 30: half the window passes the current step, which bounds it
@pytest.mark.parametrize("kind", ["ddim", "ancestral"])
def test_paper_rule_chooses_what_the_rule_gives(kind, window):
    diffusion = gaussian_diffusion("10")
    model = GaussianEps(S2 * 4)  # data wider than the noise: the variance falls inside the window
    abar = linear_abar()
    shift = TimeShift(window=window, cutoff=10)
    record = []
    steps = run(diffusion, model, kind, shift, time_shift_record=record)
    grid = diffusion.timestep_map
    inputs = [None] + [s["sample"] for s in steps[:-1]]
    shifted = 0
    for n, (out, x) in enumerate(zip(steps, inputs)):
        i = len(grid) - 1 - n
        scheduled = grid[i - 1] if i > 0 else -1
        if n == 0 or i == 0 or not scheduled > shift.cutoff:
            expected = np.full(SHAPE[0], scheduled)
        else:
            expected = paper_choice(x.numpy(), grid[i], scheduled, shift.window, abar)
        np.testing.assert_array_equal(out["time_shift_t"].numpy(), expected, err_msg=f"step {n}")
        assert record[n] is out["time_shift_t"]
        shifted += int((expected != scheduled).sum())
    assert shifted > 0  # the test exercises real shifts


def test_shifted_ddim_step_is_the_closed_form_with_the_chosen_alpha_bar():
    diffusion = gaussian_diffusion("10")
    model = GaussianEps(S2 * 4)
    abar = linear_abar()
    steps = run(diffusion, model, "ddim", TimeShift(window=16, cutoff=10))
    grid = diffusion.timestep_map
    for n in range(1, len(steps) - 1):
        i = len(grid) - 1 - n
        x = steps[n - 1]["sample"].numpy().astype(np.float64)
        c, s = grid[i], steps[n]["time_shift_t"].numpy()
        eps = math.sqrt(1 - abar[c]) * x / (abar[c] * S2 * 4 + 1 - abar[c])
        x0 = np.clip((x - math.sqrt(1 - abar[c]) * eps) / math.sqrt(abar[c]), -1, 1)
        eps = (x - math.sqrt(abar[c]) * x0) / math.sqrt(1 - abar[c])
        a_s = abar[s].reshape(-1, 1, 1, 1)
        expected = np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps
        np.testing.assert_allclose(steps[n]["sample"].numpy(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sigma_small", [True, False])
def test_shifted_posterior_at_the_scheduled_step_is_adms(sigma_small):
    diffusion = create_gaussian_diffusion(steps=100, noise_schedule="cosine", timestep_respacing="10",
                                          sigma_small=sigma_small)
    t = torch.arange(1, 10)
    x0, xt = torch.randn(9, 3, 4, 4), torch.randn(9, 3, 4, 4)
    target = torch.from_numpy(diffusion.alphas_cumprod_prev[1:10])
    mean, variance = diffusion._shifted_posterior(x0, xt, t, target)
    adm_mean, posterior_variance, _ = diffusion.q_posterior_mean_variance(x0, xt, t)
    betas = torch.from_numpy(diffusion.betas[1:10]).float().view(-1, 1, 1, 1).expand_as(xt)
    torch.testing.assert_close(mean, adm_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(variance, posterior_variance if sigma_small else betas, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["ddim", "ancestral"])
@pytest.mark.parametrize("off", [None, "", TimeShift(0, 300), "window=0,cutoff=5", TimeShift(1, 0), TimeShift(30, 39)])
def test_off_is_the_plain_sampler_bit_for_bit(kind, off):
    model, diffusion = tiny_unet_and_diffusion()  # learned variance, 40 steps respaced to 5
    loop = diffusion.ddim_sample_loop if kind == "ddim" else diffusion.p_sample_loop
    kwargs = dict(generator=None, eps_scale="linear:k=0.01,b=1.0")
    plain = loop(model, (3, 3, 8, 8), **dict(kwargs, generator=ImageNoise(3, [0, 1, 2])))
    shifted = loop(model, (3, 3, 8, 8), **dict(kwargs, generator=ImageNoise(3, [0, 1, 2])), time_shift=off)
    assert torch.equal(plain, shifted)


@pytest.mark.parametrize("kind", ["ddim", "ancestral"])
def test_each_image_is_the_same_alone_and_in_a_batch(kind):
    diffusion = gaussian_diffusion("10")
    model = GaussianEps(S2 * 4)
    shift = TimeShift(window=16, cutoff=10)
    batch = run(diffusion, model, kind, shift)
    for image in (0, 3):
        alone = run(diffusion, model, kind, shift, indices=[image])
        for step_batch, step_alone in zip(batch, alone):
            assert torch.equal(step_batch["time_shift_t"][image : image + 1], step_alone["time_shift_t"])
            assert torch.equal(step_batch["sample"][image : image + 1], step_alone["sample"])


def image_with_variance(v):
    z = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    z = (z - z.mean()) / z.reshape(-1).std()
    return (z * math.sqrt(v)).float()


def test_tsdpm_adm_rule_reproduces_the_authors_worked_example():
    abar = cosine_abar()
    abar_prev = np.append(1.0, abar[:-1])

    def walk(respacing, cutoff=300):
        diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing=respacing)
        shifter = StepShifter(TimeShift(80, cutoff, "tsdpm_adm"), diffusion.timestep_map,
                              diffusion.original_alphas_cumprod, diffusion.alphas_cumprod_prev)
        rows = {}
        for i in range(len(diffusion.timestep_map) - 1, -1, -1):
            c = diffusion.timestep_map[i]
            chosen, target = shifter.step(image_with_variance(1 - abar[c]), i)
            rows[c] = (int(chosen), None if target is None else float(target))
        return rows

    ddim5 = walk("ddim5")  # D = 1000 // 4 = 250, not the stride 200
    assert ddim5[800] == (800, None)  # the first step is never shifted
    assert ddim5[600] == (609, abar[358]) and ddim5[400] == (409, abar[158])
    assert ddim5[200] == (200, None) and ddim5[0] == (0, None)  # at or below the cutoff: plain
    ddim10 = walk("ddim10")  # D = 111
    for c in (800, 700, 600, 500, 400):
        assert ddim10[c] == (c + 9, abar[c - 103])
    wrapped = walk("ddim5", cutoff=0)  # cutoff 0 is not off: n = c, and the index c - D wraps
    assert wrapped[600] == (600, abar_prev[350]) and wrapped[200] == (200, abar_prev[1000 - 50])
    assert wrapped[0] == (0, None)


def test_tsdpm_adm_window_at_the_low_edge_is_zero_to_window():
    abar = cosine_abar()
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim50")
    shifter = StepShifter(TimeShift(80, 10, "tsdpm_adm"), diffusion.timestep_map, diffusion.original_alphas_cumprod,
                          diffusion.alphas_cumprod_prev)
    i = diffusion.timestep_map.index(20)  # c - h = -20 <= 0: candidates k = 0 .. 80, offset 0
    x = image_with_variance(0.9995)
    variance = float(x.reshape(-1).var())
    flipped = abar[::-1][: 80 + 1]
    chosen, _ = shifter.step(x, i)
    assert int(chosen) == int(np.argmin((variance - flipped) ** 2))


def test_tsdpm_adm_loop_targets_its_alpha_bar():
    diffusion = create_gaussian_diffusion(steps=1000, noise_schedule="cosine", timestep_respacing="ddim5")
    model = GaussianEps(S2, steps=1000, schedule="cosine")
    abar = cosine_abar()
    steps = run(diffusion, model, "ddim", "window=80,cutoff=300,rule=tsdpm_adm")
    x = steps[0]["sample"].numpy().astype(np.float64)  # the input of the step at c = 600
    c, n = 600, steps[1]["time_shift_t"].numpy()
    eps = math.sqrt(1 - abar[c]) * x / (abar[c] * S2 + 1 - abar[c])
    x0 = np.clip((x - math.sqrt(1 - abar[c]) * eps) / math.sqrt(abar[c]), -1, 1)
    eps = (x - math.sqrt(abar[c]) * x0) / math.sqrt(1 - abar[c])
    a_s = abar[n - 250 - 1].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(steps[1]["sample"].numpy(), np.sqrt(a_s) * x0 + np.sqrt(1 - a_s) * eps,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make, message", [
    (lambda: TimeShift(-2, 300), "window must be >= 0"),
    (lambda: TimeShift(80, 2.5), "cutoff must be a whole number"),
    (lambda: TimeShift(True, 300), "window must be a whole number"),
    (lambda: TimeShift(80, 300, "shifted"), "rule 'shifted' is not one of paper, tsdpm_adm"),
    (lambda: parse_time_shift("window=80"), "needs both window= and cutoff="),
    (lambda: parse_time_shift("window=8o,cutoff=3"), "must be whole numbers"),
    (lambda: parse_time_shift("width=80,cutoff=3"), "cannot read time shift"),
    (lambda: time_shift_from_flags(True, -1, 300), "window must be >= 0"),
])
def test_bad_settings_are_one_line_errors(make, message):
    with pytest.raises(TimeShiftError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("shift, kind, message", [
    (TimeShift(100, 10), "ddim", "window 100 is not below the 100 diffusion steps"),
    (TimeShift(10, 100), "ddim", "cutoff 100 is outside 0..99"),
    (TimeShift(10, 10, "tsdpm_adm"), "ancestral", "tsdpm_adm is TS-DPM-ADM's DDIM sampler"),
])
def test_settings_that_do_not_fit_the_chain_are_refused_before_sampling(shift, kind, message):
    diffusion = gaussian_diffusion("10")
    calls = []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)

    with pytest.raises(TimeShiftError, match=message) as error:
        run(diffusion, model, kind, shift)
    assert "\n" not in str(error.value) and not calls


def test_flags_and_string_form_round_trip():
    assert time_shift_from_flags(False, 80, 300) is None
    shift = time_shift_from_flags(True, 80, 300)
    assert shift == TimeShift(80, 300, "paper") and parse_time_shift(str(shift)) == shift
    assert parse_time_shift("window=80,cutoff=300,rule=tsdpm_adm") == TimeShift(80, 300, "tsdpm_adm")

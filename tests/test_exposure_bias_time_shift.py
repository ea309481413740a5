"""Exposure-bias chains with Time-Shift sampling: the chains take the sampling loops' own shifted
steps, so their final samples are the loops' samples from the same x_T and noise streams."""

import pytest
import torch
from gaussian_chains import GaussianEps, gaussian_data, gaussian_diffusion

from guided_diffusion.analysis.exposure_bias import measure_exposure_bias
from guided_diffusion.image_noise import ImageNoise
from guided_diffusion.time_shift import TimeShift, TimeShiftError

SHIFT = TimeShift(window=30, cutoff=20)


def chain_start(diffusion, data, streams):
    """x_T as the chains make it: data noised to the first step with each image's first draw."""
    t = torch.full((len(data),), diffusion.num_timesteps - 1, dtype=torch.long)
    return diffusion.q_sample(data, t, noise=streams.randn(data.shape))


@pytest.mark.parametrize("use_ddim", [True, False])
def test_time_shifted_chains_end_where_the_time_shifted_loop_ends(use_ddim):
    diffusion, model, data = gaussian_diffusion("10"), GaussianEps(1.3, 1.02), gaussian_data(1.3, n=16)
    run = measure_exposure_bias(diffusion, model, data, "1.01", seed=4, batch_size=16, clip_denoised=False,
                                use_ddim=use_ddim, time_shift=SHIFT, forward_norms=False)
    loop = diffusion.ddim_sample_loop if use_ddim else diffusion.p_sample_loop
    record, streams = [], ImageNoise(4, range(16))
    expected = loop(model, tuple(data.shape), noise=chain_start(diffusion, data, streams), clip_denoised=False,
                    eps_scale="1.01", generator=streams, time_shift=SHIFT, time_shift_record=record)
    assert torch.equal(run.samples, expected)
    plain = measure_exposure_bias(diffusion, model, data, "1.01", seed=4, batch_size=16, clip_denoised=False,
                                  use_ddim=use_ddim, forward_norms=False)
    scheduled = [int(diffusion.timestep_map[i - 1]) if i else -1 for i in range(9, -1, -1)]
    assert len(record) == 10 and all(len(c) == 16 for c in record)
    shifted = any(int(t) != s for c, s in zip(record, scheduled) for t in c)
    assert shifted and not torch.equal(run.samples, plain.samples)  # the shift did move some images


def test_time_shifted_chains_do_not_depend_on_the_batch_size():
    diffusion, model, data = gaussian_diffusion("10"), GaussianEps(0.8, 1.05), gaussian_data(0.8, n=12)
    runs = [measure_exposure_bias(diffusion, model, data, None, seed=1, batch_size=b, clip_denoised=False,
                                  time_shift=SHIFT, forward_norms=False) for b in (12, 5)]
    assert torch.equal(runs[0].samples, runs[1].samples)
    assert [r["delta"] for r in runs[0].rows] == [r["delta"] for r in runs[1].rows]


def test_a_time_shift_the_chain_cannot_take_is_refused_before_any_step():
    diffusion, model, data = gaussian_diffusion("10"), GaussianEps(1.0), gaussian_data(1.0, n=4)
    with pytest.raises(TimeShiftError):
        measure_exposure_bias(diffusion, model, data, None, time_shift=TimeShift(window=30, cutoff=20,
                                                                                  rule="tsdpm_adm"))

"""Log-likelihood helpers for the variational bound: Gaussian KL and a discretized decoder.

Values are in nats; callers divide by log(2) for bits.
"""

import numpy as np
import torch as th


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise.

    Any argument may be a Python number; at least one must be a tensor, which sets dtype and device.
    """
    reference = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, th.Tensor)), None)
    if reference is None:
        raise ValueError("normal_kl needs at least one tensor argument to set dtype and device")
    logvar1, logvar2 = (
        v if isinstance(v, th.Tensor) else th.tensor(v).to(reference) for v in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + th.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * th.exp(-logvar2)
    )


def approx_standard_normal_cdf(x):
    """Phi(x) by the tanh approximation (GELU's), accurate to about 1e-3 and cheap to differentiate."""
    return 0.5 * (1.0 + th.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * th.pow(x, 3))))


def discretized_gaussian_log_likelihood(x, *, means, log_scales):
    """Log-probability of 8-bit images x (scaled to [-1, 1]) under a Gaussian binned to 256 levels.

    Each pixel value owns the bin x +- 1/255; the outermost bins extend to -inf and +inf.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"x, means and log_scales must have one shape, got {tuple(x.shape)}, "
            f"{tuple(means.shape)}, {tuple(log_scales.shape)}"
        )
    centered = x - means
    inv_std = th.exp(-log_scales)
    cdf_upper = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = th.log(cdf_upper.clamp(min=1e-12))
    log_survival_lower = th.log((1.0 - cdf_lower).clamp(min=1e-12))
    log_bin = th.log((cdf_upper - cdf_lower).clamp(min=1e-12))
    return th.where(
        x < -0.999,
        log_cdf_upper,
        th.where(x > 0.999, log_survival_lower, log_bin),
    )

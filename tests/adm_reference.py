"""Helpers for the tests that compare against ADM's reference vectors (../shared/reference/adm_golden.pt):
the reference diffusions and networks, and the tolerances those comparisons use."""

import functools

import torch as th
import torch.nn.functional as F
from conftest import load_reference

from guided_diffusion import gaussian_diffusion as gd
from guided_diffusion import unet
from guided_diffusion.respace import SpacedDiffusion, space_timesteps


def make_diffusion(
    respacing="10",
    schedule="cosine",
    mean_type=gd.ModelMeanType.EPSILON,
    var_type=gd.ModelVarType.FIXED_LARGE,
    loss_type=gd.LossType.MSE,
    **kwargs,
):
    return SpacedDiffusion(
        use_timesteps=space_timesteps(1000, respacing),
        betas=gd.get_named_beta_schedule(schedule, 1000),
        model_mean_type=mean_type,
        model_var_type=var_type,
        loss_type=loss_type,
        **kwargs,
    )


def golden_diffusion(case, eps_scale=None):
    """The diffusion of one reference case (mean type epsilon, loss MSE, as the case says)."""
    var_type = gd.ModelVarType.LEARNED_RANGE if case["learn_sigma"] else gd.ModelVarType.FIXED_LARGE
    diffusion = make_diffusion(case["respacing"], case["schedule"], var_type=var_type, eps_scale=eps_scale)
    assert diffusion.timestep_map == list(case["timestep_map"])
    return diffusion


@functools.lru_cache(maxsize=None)
def _network(name):
    case = load_reference("adm_golden.pt")["unets"][name]
    net = getattr(unet, case["kind"])(**case["kwargs"])
    net.load_state_dict({k: v.float() for k, v in case["state_dict"].items()})
    net.eval()
    with th.no_grad():
        out = net(case["x"], case["t"], **({"y": case["y"]} if case.get("y") is not None else {}))
    # Guards the comparisons below: a network mismatch belongs to unet.py's tests, not these.
    assert th.allclose(out, case["out"], atol=1e-4), f"network {name} does not reproduce its reference output"
    return net


def golden_network(name):
    """A reference network (float16 weights in a float32 model), checked against its own output."""
    return _network(name)


def golden_cond_fn(scale):
    """scale * d/dx log softmax(classifier(x, t))[y], as ADM's classifier_sample.py."""
    classifier = golden_network("classifier_attention")

    def cond_fn(x, t, y=None):
        with th.enable_grad():
            x_in = x.detach().requires_grad_(True)
            log_probs = F.log_softmax(classifier(x_in, t), dim=-1)
            selected = log_probs[range(len(log_probs)), y.view(-1)]
            return th.autograd.grad(selected.sum(), x_in)[0] * scale

    return cond_fn


def unconditional(net):
    """The model of the guidance case: an unconditional network that ignores y."""
    return lambda x, t, y=None: net(x, t)


def guidance_diffusion(eps_scale=None):
    return make_diffusion("ddim10", "linear", var_type=gd.ModelVarType.LEARNED_RANGE, eps_scale=eps_scale)


def pmv_tolerance(diffusion, i, key):
    """Tolerance of a reference p_mean_variance output at chain index i.

    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) multiplies float32 rounding in the network output
    (~1e-6 here) by sqrt(1 / abar - 1), which reaches 2e4 at the last cosine step.
    """
    if key in ("mean", "pred_xstart"):
        return max(1e-4, 1e-6 * float(diffusion.sqrt_recipm1_alphas_cumprod[i]))
    return 1e-4


def assert_close(actual, expected, atol, what):
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol}"


def assert_loop_close(actual, expected, what):
    """A whole sampling loop against a reference: the first (noisiest) step's amplified x0 error
    (see pmv_tolerance) is carried along, so a few pixels may differ by ~1e-3; the rest must not."""
    err = (actual - expected).abs()
    assert err.max().item() <= 1e-2, f"{what}: max abs error {err.max().item():.3g} > 1e-2"
    assert err.mean().item() <= 1e-5, f"{what}: mean abs error {err.mean().item():.3g} > 1e-5"

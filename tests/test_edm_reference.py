"""EDM's real pickles (../shared/reference/edm/, written by EDM's own code) against what EDM's code
reported for them (expected.pt): the network record, the attributes samplers read, the 18 Heun
noise levels and the network's outputs."""

import json
import math

import pytest
import torch

from conftest import REFERENCE_DIR, load_reference
from guided_diffusion.edm.networks import build_edm_network
from guided_diffusion.edm.pickles import convert_edm_pickle, load_edm_network
from guided_diffusion.edm.samplers import BoundDenoiser, edm_sigmas, karras_sample, sampling_sigmas

NAMES = ["edm-ddpmpp-cond-16", "vp-ddpmpp-uncond-16"]


@pytest.fixture(scope="module")
def expected():
    return load_reference("edm/expected.pt")


def reference_network(expected, name):
    path = REFERENCE_DIR / "edm" / expected["nets"][name]["file"]
    if not path.exists():
        pytest.skip(f"EDM reference pickle not found at {path} (it lives in ../shared/reference/edm)")
    return load_edm_network(path)


@pytest.mark.parametrize("name", NAMES)
def test_record_and_attributes_are_edms(expected, name):
    ref = expected["nets"][name]
    net, config = reference_network(expected, name)
    assert config["class_name"] == ref["class_name"] == type(net).__name__
    assert config["init_kwargs"] == json.loads(ref["init_kwargs"])
    # exactly what EDM's object reports (VP: float32 sigma(epsilon_t) = 2^-10, sigma(1))
    assert net.sigma_min == ref["sigma_min"] and net.sigma_max == ref["sigma_max"]
    fresh = build_edm_network(ref["class_name"], json.loads(ref["init_kwargs"]))
    assert fresh.sigma_min == ref["sigma_min"] and fresh.sigma_max == ref["sigma_max"]


def test_vp_range_is_edms_float32_one(expected):
    """A --sigma_min below the network's clips to EDM's 0.0009765625, not to the exact 0.0010005."""
    net, _ = reference_network(expected, "vp-ddpmpp-uncond-16")
    assert net.sigma_min == 0.0009765625 != pytest.approx(math.sqrt(math.expm1(0.1 * 1e-5 + 0.5 * 19.9e-10)), rel=1e-3)
    sigmas = sampling_sigmas(net, 8, sigma_min=1e-4, sigma_max=500.0)
    assert torch.equal(sigmas[:-1], edm_sigmas(8, net.sigma_min, net.sigma_max)) and float(sigmas[-1]) == 0.0
    # (sigma^(1/rho))^rho is sigma up to rounding, at both ends
    assert float(sigmas[0]) == pytest.approx(net.sigma_max, rel=1e-14)
    assert float(sigmas[-2]) == pytest.approx(net.sigma_min, rel=1e-14)


@pytest.mark.parametrize("name", NAMES)
def test_heun18_noise_levels_are_edms(expected, name):
    ref = expected["nets"][name]
    net, _ = reference_network(expected, name)
    levels = sampling_sigmas(net, 18)
    assert levels.dtype == torch.float64 and torch.equal(levels, ref["heun18_t_steps"])

    # and the sampler calls the network at exactly these levels, as one 0-d level per call:
    # t_0, t_1 (correction), t_1, t_2, ..., t_16, t_17 (correction), t_17 (the last Euler step)
    seen = []

    def record(x, sigma, labels):
        seen.append(sigma)
        return torch.zeros_like(x)

    karras_sample(BoundDenoiser(record, net), (1, 3, 16, 16), noise=torch.zeros(1, 3, 16, 16), num_steps=18)
    t = ref["heun18_t_steps"]
    order = [t[0]] + [t[k] for k in range(1, 18) for _ in range(2)]
    assert len(seen) == 35 and all(s.dim() == 0 and s.dtype == torch.float64 for s in seen)
    assert torch.equal(torch.stack(seen), torch.stack(order))


def _repeated_inputs(calls, index):
    """An earlier call with the same x, sigma and labels, if any."""
    def same(a, b):
        return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))

    mine = calls[index]
    return next((j for j in range(index) if all(same(calls[j][k], mine[k]) for k in ("x", "sigma", "labels"))), None)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("index", [0, 1, 2])
def test_outputs_are_edms(expected, name, index):
    calls = expected["nets"][name]["calls"]
    net, _ = reference_network(expected, name)
    call = calls[index]
    earlier = _repeated_inputs(calls, index)
    if earlier is not None and not torch.equal(calls[earlier]["D"], call["D"]):
        pytest.skip(
            f"expected.pt call {index} repeats call {earlier}'s x, sigma and labels with another D; EDM's own "
            f"network (eval mode, no augment labels) gives call {earlier}'s D for them, so this D came from "
            "inputs expected.pt does not record (augment labels fit it): nothing to compare"
        )
    out = net(call["x"], call["sigma"], call["labels"])
    scale = float(call["D"].abs().max())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, call["D"], rtol=1e-5, atol=2e-6 * scale)


def test_converted_network_keeps_edms_attributes(expected, tmp_path):
    net, _ = reference_network(expected, "vp-ddpmpp-uncond-16")
    src = REFERENCE_DIR / "edm" / expected["nets"]["vp-ddpmpp-uncond-16"]["file"]
    out = convert_edm_pickle(src, tmp_path / "vp.safetensors")
    converted, config = load_edm_network(out)
    ref = expected["nets"]["vp-ddpmpp-uncond-16"]
    assert config["attributes"] == {"sigma_min": ref["sigma_min"], "sigma_max": ref["sigma_max"]}
    assert converted.sigma_min == net.sigma_min and converted.sigma_max == net.sigma_max
    call = ref["calls"][0]
    assert torch.equal(converted(call["x"], call["sigma"]), net(call["x"], call["sigma"]))

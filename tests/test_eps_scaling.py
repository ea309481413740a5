"""lambda_t schedules: parsing, validation and values against hand computations."""

import math

import pytest
import torch

from guided_diffusion.eps_scaling import (
    EpsScale,
    EpsScaleError,
    parse_eps_scale,
    resolve_eps_scale,
    sampling_order_t,
    scale_eps,
)


@pytest.mark.parametrize(
    "spec, t, n, expected",
    [
        ("1.017", 7, 10, 1.017),
        (1.006, 0, 100, 1.006),
        ("linear:k=0.0025,b=1.0", 19, 20, 1.0 + 0.0025 * 19),
        ("linear:k=0.0002,b=1.0041", 0, 20, 1.0041),
        ("linear:b=1.0034,k=0.0008", 10, 20, 1.0034 + 0.008),
        ("table:1.1,1.2,1.3", 2, 3, 1.3),
        (None, 3, 5, 1.0),
        ("", 3, 5, 1.0),
    ],
)
def test_values_match_hand_computation(spec, t, n, expected):
    assert parse_eps_scale(spec).value(t, n) == pytest.approx(expected, rel=0, abs=1e-12)


def test_string_form_round_trips():
    for text in ("1.017", "linear:k=0.0025,b=1.0", "table:1.01,1.02,0.99"):
        schedule = parse_eps_scale(text)
        assert parse_eps_scale(str(schedule)) == schedule


def test_identity_detection():
    assert parse_eps_scale("1.0").is_identity
    assert parse_eps_scale("table:1,1,1").is_identity
    assert not parse_eps_scale("linear:k=0.001,b=1.0").is_identity


@pytest.mark.parametrize(
    "bad",
    ["0", "0.0", "-1.0", "nan", "inf", "abc", "linear:b=1.0", "linear:k=x,b=1", "linear:k=1,k=2",
     "table:", "table:1.0,-1.0", "table:1.0,nan", "linear:k=0.1,q=1", True, [1.0]],
)
def test_malformed_or_non_positive_lambda_is_refused(bad):
    with pytest.raises(EpsScaleError) as info:
        parse_eps_scale(bad)
    assert "\n" not in str(info.value)


def test_table_of_wrong_length_is_refused_before_use():
    schedule = parse_eps_scale("table:1.01,1.02")
    with pytest.raises(EpsScaleError, match="2 values but the sampler takes 3 steps"):
        schedule.validate(3)
    with pytest.raises(EpsScaleError):
        scale_eps(torch.ones(2, 1), schedule, torch.tensor([0, 1]), 3)


def test_linear_schedule_reaching_zero_is_refused():
    with pytest.raises(EpsScaleError, match="every lambda must be > 0"):
        parse_eps_scale("linear:k=-0.1,b=1.0").validate(20)


def test_scale_eps_identity_returns_input_unchanged():
    eps = torch.randn(3, 2, 4, 4)
    assert scale_eps(eps, parse_eps_scale(1.0), torch.tensor([5, 5, 5]), 10) is eps


def test_scale_eps_per_sample_steps():
    eps = torch.ones(3, 2, 2, 2, dtype=torch.float64)
    schedule = parse_eps_scale("linear:k=0.01,b=1.0")
    out = scale_eps(eps, schedule, torch.tensor([0, 4, 9]), 10)
    for row, t in zip(out, (0, 4, 9)):
        assert torch.allclose(row, torch.full_like(row, 1.0 / (1.0 + 0.01 * t)))
    table = parse_eps_scale("table:2,4,8")
    out = scale_eps(eps[:2], table, 2, 3)
    assert torch.equal(out, eps[:2] / 8)


def test_resolve_prefers_call_value_over_default():
    assert resolve_eps_scale(None, "1.01").b == 1.01
    assert resolve_eps_scale("1.02", "1.01").b == 1.02
    assert resolve_eps_scale(None, None).is_identity


def test_sampling_order_maps_first_step_to_noisiest_index():
    assert [sampling_order_t(i, 4) for i in range(4)] == [3, 2, 1, 0]


def test_dataclass_validates_direct_construction():
    with pytest.raises(EpsScaleError):
        EpsScale(b=math.nan)
    with pytest.raises(EpsScaleError):
        EpsScale(table=())

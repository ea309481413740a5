"""Mixed-precision training: master parameters, dynamic loss scaling, and steps checked against
a hand-computed gradient of a tiny model whose every value is exact in float16."""

import math

import pytest
import torch
import torch.nn as nn

from guided_diffusion import logger
from guided_diffusion.fp16_util import (
    MixedPrecisionTrainer,
    check_overflow,
    convert_module_to_f16,
    get_param_groups_and_shapes,
    make_master_params,
    master_params_to_model_params,
    unflatten_master_params,
)

LR = 0.125


class Tiny(nn.Module):
    """y[l] = s * (w . x[:, l] + b): a 1x1 conv (halved by convert_to_fp16) and a float32 scale."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 1, 1)
        self.scale = nn.Parameter(torch.tensor([2.0]))
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([[[1.0], [0.5]]]))
            self.conv.bias.copy_(torch.tensor([0.25]))

    def convert_to_fp16(self):
        self.apply(convert_module_to_f16)

    def forward(self, x):
        return self.conv(x.to(self.conv.weight.dtype)).float() * self.scale


X = torch.tensor([[[1.0, 2.0], [3.0, -1.0]]])  # [batch 1, channels 2, positions 2]
TARGET = torch.tensor([[[1.0, 2.0]]])

# By hand: conv output [2.75, 1.75], y = [5.5, 3.5], residual y - target = [4.5, 1.5];
# loss = sum(residual^2) / 2, so dL/dconv = residual * s = [9, 3] and
GRAD_W = torch.tensor([[[9.0 * 1 + 3.0 * 2], [9.0 * 3 + 3.0 * -1]]])  # [[15], [24]]
GRAD_B = torch.tensor([9.0 + 3.0])  # 12
GRAD_S = torch.tensor([4.5 * 2.75 + 1.5 * 1.75])  # 15


def loss_of(model):
    return (model(X) - TARGET).square().sum() / 2


def train_step(trainer, opt):
    trainer.zero_grad()
    trainer.backward(loss_of(trainer.model))
    return trainer.optimize(opt)


def expected_after_one_step():
    model = Tiny()
    return {
        "conv.weight": model.conv.weight.detach() - LR * GRAD_W,
        "conv.bias": model.conv.bias.detach() - LR * GRAD_B,
        "scale": model.scale.detach() - LR * GRAD_S,
    }


def test_float32_step_is_plain_sgd_on_the_hand_computed_gradient():
    trainer = MixedPrecisionTrainer(Tiny())
    opt = torch.optim.SGD(trainer.master_params, lr=LR)
    logger.dumpkvs()
    assert train_step(trainer, opt)
    logged = logger.dumpkvs()
    assert math.isclose(logged["grad_norm"], math.sqrt(15**2 + 24**2 + 12**2 + 15**2), rel_tol=1e-6)
    assert math.isclose(logged["param_norm"], math.sqrt(1 + 0.25 + 0.0625 + 4), rel_tol=1e-6)
    for name, value in trainer.model.named_parameters():
        torch.testing.assert_close(value.detach(), expected_after_one_step()[name], rtol=0, atol=0)


def test_fp16_skips_overflowing_steps_then_steps_like_float32_sgd():
    model = Tiny()
    # The largest scaled float16 gradient is 24 * 2**lg: it overflows (> 65504) for lg >= 12.
    trainer = MixedPrecisionTrainer(model, use_fp16=True, fp16_scale_growth=0.25, initial_lg_loss_scale=13)
    assert model.conv.weight.dtype == torch.float16 and model.scale.dtype == torch.float32
    opt = torch.optim.SGD(trainer.master_params, lr=LR)
    before = [p.detach().clone() for p in trainer.master_params]

    assert not train_step(trainer, opt)
    assert trainer.lg_loss_scale == 12
    assert not train_step(trainer, opt)
    assert trainer.lg_loss_scale == 11
    for master, old in zip(trainer.master_params, before):
        assert torch.equal(master.detach(), old) and master.grad is None

    assert train_step(trainer, opt)
    assert trainer.lg_loss_scale == 11.25
    expected = expected_after_one_step()
    # Every value here is exact in float16, so the half model matches float32 SGD exactly.
    for name, value in model.named_parameters():
        torch.testing.assert_close(value.detach().float(), expected[name], rtol=0, atol=0)
    state = trainer.master_params_to_state_dict(trainer.master_params)
    assert all(state[name].dtype == torch.float32 for name in expected)
    for name in expected:
        torch.testing.assert_close(state[name], expected[name], rtol=0, atol=0)


def test_master_params_accumulate_updates_too_small_for_float16():
    model = Tiny()
    trainer = MixedPrecisionTrainer(model, use_fp16=True, fp16_scale_growth=0.0, initial_lg_loss_scale=4)
    lr = 1e-6  # 24 * lr is below half a float16 step at 0.5 (2**-13)
    opt = torch.optim.SGD(trainer.master_params, lr=lr)
    start = Tiny().conv.weight.detach()
    assert train_step(trainer, opt)
    assert torch.equal(model.conv.weight.detach().float(), start)  # the half copy did not move
    for _ in range(9):  # the half model is unchanged, so every step has the same gradient
        assert train_step(trainer, opt)
    master = trainer.master_params_to_state_dict(trainer.master_params)["conv.weight"]
    torch.testing.assert_close(master, start - 10 * lr * GRAD_W, rtol=0, atol=1e-6)  # float32 rounding
    assert torch.equal(model.conv.weight.detach(), master.half())
    assert not torch.equal(model.conv.weight.detach().float(), start)  # 0.5 - 2.4e-4 now rounds down


def test_state_dict_round_trip_through_master_params():
    trainer = MixedPrecisionTrainer(Tiny(), use_fp16=True)
    state = {"conv.weight": torch.full((1, 2, 1), 3.0), "conv.bias": torch.tensor([-1.0]), "scale": torch.tensor([0.5])}
    masters = trainer.state_dict_to_master_params(state)
    assert [m.shape for m in masters] == [p.shape for p in trainer.master_params]
    back = trainer.master_params_to_state_dict(masters)
    for name, value in state.items():
        assert torch.equal(back[name], value)
    with pytest.raises(ValueError, match="lacks 1 of the model's parameters"):
        trainer.state_dict_to_master_params({"conv.weight": state["conv.weight"], "conv.bias": state["conv.bias"]})


def test_flattening_groups_vectors_and_matrices():
    model = Tiny()
    groups = get_param_groups_and_shapes(model.named_parameters())
    assert [[name for name, _ in group] for group, _ in groups] == [["scale", "conv.bias"], ["conv.weight"]]
    masters = make_master_params(groups)
    assert masters[0].tolist() == [2.0, 0.25] and masters[1].tolist() == [[1.0, 0.5]]
    views = unflatten_master_params(groups[1][0], masters[1])
    assert views[0].shape == (1, 2, 1)
    with torch.no_grad():
        masters[1].mul_(2)
    master_params_to_model_params(groups, masters)
    assert model.conv.weight.flatten().tolist() == [2.0, 1.0]


def test_overflow_check_and_fp16_needs_a_convertible_model():
    assert check_overflow(float("inf")) and check_overflow(float("nan")) and not check_overflow(1e30)
    with pytest.raises(ValueError, match="convert_to_fp16"):
        MixedPrecisionTrainer(nn.Linear(2, 2), use_fp16=True)

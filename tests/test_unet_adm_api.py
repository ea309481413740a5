"""What ADM's users do with the networks beyond calling them: one timestep for the whole batch,
assigning ``model.dtype``, counting attention operations for thop, and nn.py's CheckpointFunction
and SiLU."""

import pytest
import torch

from guided_diffusion import nn as gnn
from guided_diffusion.unet import (
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    SuperResModel,
    UNetModel,
    count_flops_attn,
)


def _randomized(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model.eval()


def _unet(**overrides):
    kwargs = dict(image_size=16, in_channels=3, model_channels=32, out_channels=3, num_res_blocks=1,
                  attention_resolutions=(2,), channel_mult=(1, 2), num_head_channels=16,
                  use_scale_shift_norm=True, resblock_updown=True)
    kwargs.update(overrides)
    return _randomized(UNetModel(**kwargs))


@pytest.mark.parametrize("kind", ["unconditional", "conditional", "classifier", "superres"])
def test_one_timestep_serves_the_whole_batch(kind):
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([417])
    extra = {}
    if kind == "classifier":
        model = _randomized(EncoderUNetModel(image_size=16, in_channels=3, model_channels=32, out_channels=5,
                                             num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2),
                                             num_head_channels=16, pool="attention"))
    elif kind == "superres":
        model = _randomized(SuperResModel(image_size=16, in_channels=3, model_channels=32, out_channels=3,
                                          num_res_blocks=1, attention_resolutions=(2,), channel_mult=(1, 2)))
        extra["low_res"] = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    else:
        model = _unet(num_classes=10 if kind == "conditional" else None)
        if kind == "conditional":
            extra["y"] = torch.tensor([0, 4, 9])
    with torch.no_grad():
        shared = model(x, t, **extra)
        per_image = model(x, t.repeat(3), **extra)
        alone = torch.cat([model(x[i : i + 1], t, **{k: v[i : i + 1] for k, v in extra.items()}) for i in range(3)])
    assert torch.equal(shared, per_image)
    torch.testing.assert_close(shared, alone, rtol=1e-4, atol=1e-5)  # batch-size-dependent kernels
    with pytest.raises(ValueError, match=r"\[3\] \(one per image\) or \[1\]"):
        model(x, torch.tensor([1, 2]), **extra)


def test_dtype_is_assignable_as_adms_attribute():
    model = _unet()
    seen = []
    model.input_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 4])
    assert model.dtype == torch.float32
    model.convert_to_fp16()
    assert model.dtype == torch.float16  # follows the convolutions until assigned
    model.convert_to_fp32()
    model.dtype = torch.float16  # ADM's forward casts the input to model.dtype
    assert model.dtype is torch.float16
    with pytest.raises(RuntimeError):
        model(x, t)  # float16 input into float32 convolutions, as in ADM
    assert seen[-1] == torch.float16
    model.dtype = torch.float32
    with torch.no_grad():
        assert model(x, t).dtype == torch.float32
    assert seen[-1] == torch.float32
    model.dtype = None  # back to following the convolutions
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    assert "_assigned_dtype" not in model.state_dict()


class _Counted(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention
        self.register_buffer("total_ops", torch.zeros(1, dtype=torch.float64))


@pytest.mark.parametrize("attention", [QKVAttention, QKVAttentionLegacy])
def test_attention_operation_count_is_two_matmuls_of_t_squared_by_c(attention):
    batch, heads, ch, side = 2, 4, 8, 3
    tokens = side * side
    counted = _Counted(attention(heads))
    hook = counted.attention.register_forward_hook(
        lambda module, inputs, output: attention.count_flops(counted, inputs, output)
    )
    counted.attention(torch.randn(batch, 3 * heads * ch, tokens))
    hook.remove()
    # q k^T and weights @ v: batch * heads * (tokens x ch x tokens) multiply-adds each
    assert counted.total_ops.item() == 2 * batch * heads * tokens * ch * tokens
    again = _Counted(attention(heads))
    count_flops_attn(again, None, (torch.zeros(batch, heads * ch, side, side),))  # ADM's y[0], 2-D tokens
    assert again.total_ops.item() == 2 * batch * (side * side) ** 2 * heads * ch


def test_checkpoint_function_gives_the_gradients_of_plain_autograd():
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4, generator=gen, requires_grad=True)
    w = torch.randn(5, 3, generator=gen)

    def run(inp):
        return torch.tanh(layer(inp)) * 2

    params = list(layer.parameters())
    plain = torch.autograd.grad((run(x) * w).sum(), [x] + params)
    out = gnn.CheckpointFunction.apply(run, 1, x, *params)
    assert out.requires_grad
    checkpointed = torch.autograd.grad((out * w).sum(), [x] + params)
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    # the same through ADM's calling convention of nn.checkpoint with params
    assert torch.equal(gnn.checkpoint(run, (x,), params, False), run(x))


def test_silu_is_x_times_sigmoid_x_under_adms_name():
    x = torch.linspace(-6, 6, 101)
    silu = gnn.SiLU()
    assert isinstance(silu, torch.nn.SiLU)
    torch.testing.assert_close(silu(x), x / (1 + torch.exp(-x)), rtol=1e-6, atol=1e-7)
    assert silu.forward(x=x).shape == x.shape  # ADM's parameter name

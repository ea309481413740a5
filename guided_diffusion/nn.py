"""Small building blocks shared by the networks, with ADM's names and signatures.

``checkpoint`` differs from ADM on purpose: it uses ``torch.utils.checkpoint`` (non-reentrant,
RNG state preserved), so the recomputed forward pass draws the same dropout masks as the first
one and a checkpointed model gets the same gradients as an unchecked one.
"""

import math

import torch
import torch.nn as nn
import torch.utils.checkpoint

class SiLU(nn.SiLU):
    """x * sigmoid(x): torch's SiLU under ADM's name (ADM wrote its own for torch < 1.7)."""

    def forward(self, x):
        return super().forward(x)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that normalizes in float32 whatever the input dtype, and returns the input dtype."""

    def forward(self, x):
        return super().forward(x.float()).type(x.dtype)


def _pick_by_dims(dims, choices, what):
    if dims not in choices:
        raise ValueError(f"unsupported dims {dims} for {what}; use 1, 2 or 3")
    return choices[dims]


def conv_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D convolution (nn.Conv1d/2d/3d arguments after `dims`)."""
    return _pick_by_dims(dims, {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}, "conv_nd")(*args, **kwargs)


def linear(*args, **kwargs):
    """nn.Linear, under ADM's name."""
    return nn.Linear(*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1D, 2D or 3D average pooling (nn.AvgPool1d/2d/3d arguments after `dims`)."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    return _pick_by_dims(dims, pools, "avg_pool_nd")(*args, **kwargs)


def update_ema(target_params, source_params, rate=0.99):
    """In place: target <- rate * target + (1 - rate) * source, parameter by parameter."""
    with torch.no_grad():
        for target, source in zip(target_params, source_params):
            target.mul_(rate).add_(source, alpha=1 - rate)


def zero_module(module):
    """Set every parameter of `module` to zero and return the module (output layers start at 0)."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


def scale_module(module, scale):
    """Multiply every parameter of `module` by `scale` in place and return the module."""
    with torch.no_grad():
        for p in module.parameters():
            p.mul_(scale)
    return module


def mean_flat(tensor):
    """Mean over every dimension but the first (the batch)."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def normalization(channels):
    """The networks' normalization layer: 32 groups, computed in float32."""
    return GroupNorm32(32, channels)


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding of (possibly fractional) timesteps: [N] -> [N x dim].

    The first half of the columns are cosines, the second half sines, at frequencies
    max_period ** (-i / half) for i = 0 .. half-1; an odd `dim` gets a zero last column.
    """
    half = dim // 2
    # ADM's order of operations, on the CPU: (-log P * i) / half, then exp. Dividing i by half
    # first differs in the last bit when half is not a power of two (192-channel models).
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(timesteps.device)
    angles = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class CheckpointFunction(torch.autograd.Function):
    """ADM's gradient checkpoint as an autograd Function: ``apply(run_function, length, *args)``.

    ``args`` are ``length`` inputs followed by the parameters ``run_function`` uses. The forward
    pass keeps only the inputs; backward runs ``run_function`` again with gradients on and
    differentiates that. Unlike ``checkpoint`` above, dropout draws new masks in the second run,
    as in ADM; it is here for code that calls it directly.
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [x.detach().requires_grad_(True) for x in ctx.input_tensors]
        with torch.enable_grad():
            # views, so that a function that starts with an in-place op does not modify the
            # detached leaves themselves
            outputs = ctx.run_function(*[x.view_as(x) for x in inputs])
        if isinstance(outputs, torch.Tensor):
            outputs = (outputs,)
        grads = torch.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        del ctx.input_tensors, ctx.input_params
        return (None, None) + tuple(grads)


def checkpoint(func, inputs, params, flag):
    """Run func(*inputs), recomputing its activations in backward instead of storing them if `flag`.

    `params` is accepted for ADM compatibility; torch's non-reentrant checkpoint finds the
    parameters itself. Nothing is checkpointed when gradients are off (sampling).
    """
    if flag and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(func, *inputs, use_reentrant=False, preserve_rng_state=True)
    return func(*inputs)

"""ADM's networks: UNetModel, SuperResModel and EncoderUNetModel (the noisy-image classifier).

Names, constructor arguments and state_dict keys are guided-diffusion's, so its released
checkpoints load as they are. A UNetModel holds, in state_dict order:

- ``time_embed``: MLP (linear, SiLU, linear) from the sinusoidal timestep embedding of width
  ``model_channels`` to the block embedding of width ``4 * model_channels``;
- ``label_emb``: class embedding added to it (class-conditional models only);
- ``input_blocks``: block 0 is the input convolution; then, for each entry of ``channel_mult``
  (a level), ``num_res_blocks`` ResBlocks, each followed by an AttentionBlock when the level's
  downsample rate is in ``attention_resolutions``, and, below every level but the last, one
  block that halves the resolution (a ResBlock with ``down=True`` if ``resblock_updown``, else
  a Downsample);
- ``middle_block``: ResBlock, AttentionBlock, ResBlock;
- ``output_blocks``: the levels in reverse, ``num_res_blocks + 1`` blocks each; every block
  takes the previous output concatenated with the matching input block's output (the skip),
  and the last block of every level but the top one doubles the resolution;
- ``out``: GroupNorm, SiLU, convolution to ``out_channels``.

EncoderUNetModel is the input blocks and middle block followed by a pooling head (``out``).

Attention computes what ADM computes, in ADM's order of operations (q and k each scaled by
C^-1/4, two einsums, the softmax in float32), so outputs equal ADM's bit for bit. Inside
``with fused_attention():`` (the samplers' ``--fused_attention`` switch, speed.py) it runs through
torch's scaled_dot_product_attention instead: the same function, faster and without the T x T
weight tensor, rounded differently in the last bits. The two checkpoint families lay out q, k, v
differently inside the qkv projection: QKVAttentionLegacy (per head: q, k, v) and QKVAttention
(q of all heads, then k, then v).

Half precision as ADM does it: ``convert_to_fp16()`` turns the convolutions of the body (input,
middle, output blocks) to float16; embeddings, linear layers, normalization (computed in
float32 anyway) and the ``out`` head stay float32. The body computes in the dtype of its
convolutions (``model.dtype``), so a model built with ``use_fp16=True`` runs in float32 until
it is converted, which ADM's scripts do after loading the weights.
"""

import contextlib
import math
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from guided_diffusion.fp16_util import convert_module_to_f16, convert_module_to_f32
from guided_diffusion.nn import (
    avg_pool_nd,
    checkpoint,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embeddings `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A sequence of modules that passes the timestep embedding to those that take it."""

    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (the last two axes for dims=3), then a 3x3 conv if `use_conv`."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=1)

    def forward(self, x):
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling (the last two axes for dims=3): a strided 3x3 conv if `use_conv`, else average pooling."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=1)
        elif self.out_channels != self.channels:
            raise ValueError(
                f"Downsample without a conv cannot change channels ({channels} -> {out_channels}); "
                "pass use_conv=True"
            )
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally resampling by 2.

    The embedding is added to the features after the first conv, or, with
    `use_scale_shift_norm`, scales and shifts them after the second normalization.
    `use_conv` picks a 3x3 instead of a 1x1 conv for the skip when the channel count changes.
    """

    def __init__(
        self,
        channels,
        emb_channels,
        dropout,
        out_channels=None,
        use_conv=False,
        use_scale_shift_norm=False,
        dims=2,
        use_checkpoint=False,
        up=False,
        down=False,
    ):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out_channels = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), linear(emb_channels, emb_out_channels))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        in_norm, in_act, in_conv = self.in_layers
        # Resample between the activation and the conv, and resample the skip path the same way.
        h = in_conv(self.h_upd(in_act(in_norm(x))))
        x = self.x_upd(x)

        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out[(...,) + (None,) * (h.ndim - emb_out.ndim)]
        out_norm, out_act, out_dropout, out_conv = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_norm(h) * (1 + scale) + shift
        else:
            h = out_norm(h + emb_out)
        h = out_conv(out_dropout(out_act(h)))
        return self.skip_connection(x) + h


_FUSED_ATTENTION = False  # set only by fused_attention(); a plain global, so torch.compile can guard on it


@contextlib.contextmanager
def fused_attention(enabled: bool = True):
    """Within this context, attention runs through scaled_dot_product_attention (see the module
    docstring); outside it, ADM's own arithmetic."""
    global _FUSED_ATTENTION
    previous, _FUSED_ATTENTION = _FUSED_ATTENTION, bool(enabled)
    try:
        yield
    finally:
        _FUSED_ATTENTION = previous


def _multi_head_attention(qkv, n_heads, per_head_qkv):
    """softmax(q k^T / sqrt(C)) v for every head: [N x 3*H*C x T] -> [N x H*C x T].

    `per_head_qkv` chooses how the 3*H*C channels split: (head, q/k/v, C) for the legacy
    order, (q/k/v, head, C) for the new one.
    """
    batch, width, length = qkv.shape
    if width % (3 * n_heads):
        raise ValueError(f"qkv width {width} is not a multiple of 3 * {n_heads} heads")
    ch = width // (3 * n_heads)
    if _FUSED_ATTENTION:
        return _sdpa_attention(qkv, n_heads, ch, per_head_qkv)
    # ADM's order of operations: q and k each scaled by C^-1/4 before the product, softmax in float32
    quarter = 1 / math.sqrt(math.sqrt(ch))
    heads = batch * n_heads
    if per_head_qkv:
        q, k, v = qkv.reshape(heads, 3 * ch, length).split(ch, dim=1)
        q, k = q * quarter, k * quarter
    else:
        q, k, v = qkv.chunk(3, dim=1)  # scaled before the per-head view, as ADM's QKVAttention
        q, k = (q * quarter).view(heads, ch, length), (k * quarter).view(heads, ch, length)
        v = v.reshape(heads, ch, length)
    logits = torch.einsum("bct,bcs->bts", q, k)
    weights = torch.softmax(logits.float(), dim=-1).type(logits.dtype)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(batch, -1, length)


def _sdpa_attention(qkv, n_heads, ch, per_head_qkv):
    """The same attention through scaled_dot_product_attention. One token-major copy gives q, k,
    v a unit stride along C, which the fused kernels need."""
    batch, _, length = qkv.shape
    tokens = qkv.transpose(1, 2).contiguous()
    if per_head_qkv:
        q, k, v = tokens.view(batch, length, n_heads, 3, ch).unbind(3)
    else:
        q, k, v = tokens.view(batch, length, 3, n_heads, ch).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(2, 3).reshape(batch, n_heads * ch, length)


def count_flops_attn(model, _x, y):
    """A thop counter hook for the attention modules (``thop.profile(..., custom_ops={QKVAttention:
    QKVAttention.count_flops})``).

    thop does not see the two batched matrix products inside attention: q k^T and the weights
    times v, each T*T*C multiply-adds per sample for an output of shape [N x C x T] (C the
    channels of all heads). They are added to ``model.total_ops`` as 2 * N * T^2 * C. ``y`` is
    the output, or a sequence whose first element is (ADM reads ``y[0]``; thop passes the tensor,
    whose ``[0]`` would be one sample).
    """
    out = y[0] if isinstance(y, (tuple, list)) else y
    batch, channels, *spatial = out.shape
    tokens = math.prod(spatial)
    model.total_ops += torch.DoubleTensor([2 * batch * tokens**2 * channels])


class QKVAttentionLegacy(nn.Module):
    """Multi-head attention on qkv laid out per head as (q, k, v): [N x H*3*C x T] -> [N x H*C x T]."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        return _multi_head_attention(qkv, self.n_heads, per_head_qkv=True)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class QKVAttention(nn.Module):
    """Multi-head attention on qkv laid out as (q of all heads, k, v): [N x 3*H*C x T] -> [N x H*C x T]."""

    def __init__(self, n_heads):
        super().__init__()
        self.n_heads = n_heads

    def forward(self, qkv):
        return _multi_head_attention(qkv, self.n_heads, per_head_qkv=False)

    @staticmethod
    def count_flops(model, _x, y):
        return count_flops_attn(model, _x, y)


class AttentionBlock(nn.Module):
    """Self-attention over all spatial positions, added to the input.

    The head count is `num_heads`, or channels // `num_head_channels` when that is not -1.
    """

    def __init__(
        self,
        channels,
        num_heads=1,
        num_head_channels=-1,
        use_checkpoint=False,
        use_new_attention_order=False,
    ):
        super().__init__()
        self.channels = channels
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"{channels} channels cannot be split into heads of {num_head_channels} channels")
        else:
            self.num_heads = channels // num_head_channels
        if channels % self.num_heads:
            raise ValueError(f"{channels} channels cannot be split into {self.num_heads} heads")
        self.use_checkpoint = use_checkpoint
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.attention = QKVAttention(self.num_heads) if use_new_attention_order else QKVAttentionLegacy(self.num_heads)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x):
        return checkpoint(self._forward, (x,), self.parameters(), self.use_checkpoint)

    def _forward(self, x):
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        h = self.proj_out(self.attention(self.qkv(self.norm(x))))
        return (x + h).reshape(b, c, *spatial)


class AttentionPool2d(nn.Module):
    """CLIP-style attention pooling: the mean token attends to all positions; [N x C x H x W] -> [N x output_dim]."""

    def __init__(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(embed_dim, spacial_dim**2 + 1) / embed_dim**0.5)
        self.qkv_proj = conv_nd(1, embed_dim, 3 * embed_dim, 1)
        self.c_proj = conv_nd(1, embed_dim, output_dim or embed_dim, 1)
        self.num_heads = embed_dim // num_heads_channels
        self.attention = QKVAttention(self.num_heads)

    def forward(self, x):
        b, c, *_ = x.shape
        x = x.reshape(b, c, -1)
        x = torch.cat([x.mean(dim=-1, keepdim=True), x], dim=-1)
        x = x + self.positional_embedding[None].to(x.dtype)
        x = self.c_proj(self.attention(self.qkv_proj(x)))
        return x[:, :, 0]


class _TimestepTrunk(nn.Module):
    """What UNetModel and EncoderUNetModel share: the embeddings, the input blocks and the middle block.

    After construction, `_skip_channels` lists the output channels of every input block and
    `_ds` is the downsample rate at the bottom.
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout,
        channel_mult,
        conv_resample,
        dims,
        num_classes,
        use_checkpoint,
        use_fp16,
        num_heads,
        num_head_channels,
        num_heads_upsample,
        use_scale_shift_norm,
        resblock_updown,
        use_new_attention_order,
    ):
        super().__init__()
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.dropout = dropout
        self.channel_mult = channel_mult
        self.conv_resample = conv_resample
        self.dims = dims
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint
        self.use_fp16 = use_fp16
        self.num_heads = num_heads
        self.num_head_channels = num_head_channels
        self.num_heads_upsample = num_heads_upsample
        self.use_scale_shift_norm = use_scale_shift_norm
        self.resblock_updown = resblock_updown
        self.use_new_attention_order = use_new_attention_order

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim),
            nn.SiLU(),
            linear(time_embed_dim, time_embed_dim),
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, time_embed_dim)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, ch, 3, padding=1))])
        self._skip_channels = [ch]
        ds = 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [self._res_block(ch, int(mult * model_channels))]
                ch = int(mult * model_channels)
                if ds in attention_resolutions:
                    layers.append(self._attention_block(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self._skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                if resblock_updown:
                    down = self._res_block(ch, ch, down=True)
                else:
                    down = Downsample(ch, conv_resample, dims=dims, out_channels=ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                self._skip_channels.append(ch)
                ds *= 2
        self._ds = ds

        self.middle_block = TimestepEmbedSequential(
            self._res_block(ch, ch),
            self._attention_block(ch, num_heads),
            self._res_block(ch, ch),
        )

    def _res_block(self, channels, out_channels, up=False, down=False):
        return ResBlock(
            channels,
            self.model_channels * 4,
            self.dropout,
            out_channels=out_channels,
            dims=self.dims,
            use_checkpoint=self.use_checkpoint,
            use_scale_shift_norm=self.use_scale_shift_norm,
            up=up,
            down=down,
        )

    def _attention_block(self, channels, num_heads):
        return AttentionBlock(
            channels,
            use_checkpoint=self.use_checkpoint,
            num_heads=num_heads,
            num_head_channels=self.num_head_channels,
            use_new_attention_order=self.use_new_attention_order,
        )

    @property
    def dtype(self):
        """The dtype the blocks compute in: float16 after convert_to_fp16(), else float32.

        Assignable, as ADM's attribute is (``model.dtype = torch.float32``): an assigned dtype is
        used until ``None`` is assigned, which goes back to following the convolutions.
        """
        assigned = self.__dict__.get("_assigned_dtype")
        return assigned if assigned is not None else self.input_blocks[0][0].weight.dtype

    @dtype.setter
    def dtype(self, value):
        self.__dict__["_assigned_dtype"] = value

    def _body(self):
        return [self.input_blocks, self.middle_block]

    def convert_to_fp16(self):
        """Convert the convolutions of the input, middle (and output) blocks to float16."""
        for part in self._body():
            part.apply(convert_module_to_f16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16()."""
        for part in self._body():
            part.apply(convert_module_to_f32)

    def _check_inputs(self, x, timesteps, y):
        if x.ndim != self.dims + 2:
            spatial = {1: "L", 2: "H, W", 3: "D, H, W"}[self.dims]
            raise ValueError(f"x must have shape [N, C, {spatial}]; got {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"x has {x.shape[1]} channels but the model takes {self.in_channels}; "
                "pass images as [N, C, H, W] with the model's channel count"
            )
        factor = 2 ** (len(self.channel_mult) - 1)
        resampled = x.shape[-2:] if self.dims == 3 else x.shape[2:]
        if any(size % factor for size in resampled):
            raise ValueError(
                f"image size {tuple(x.shape[2:])} is not divisible by {factor}, which this model "
                f"(built for {self.image_size} px) needs; resize the images"
            )
        if timesteps.shape not in ((x.shape[0],), (1,)):
            raise ValueError(
                f"timesteps must have shape [{x.shape[0]}] (one per image) or [1] (one for all); "
                f"got {tuple(timesteps.shape)}"
            )
        if self.num_classes is None and y is not None:
            raise ValueError("labels y were given to an unconditional model; drop y or use a class-conditional model")
        if self.num_classes is not None:
            if y is None:
                raise ValueError(f"this model is class-conditional ({self.num_classes} classes): pass labels y")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y must have shape [{x.shape[0]}] (one label per image); got {tuple(y.shape)}")

    def _embed(self, timesteps, y, batch):
        # A single timestep serves the whole batch (ADM broadcasts it); expanding gives every
        # image the very embedding it would get alone.
        timesteps = timesteps.expand(batch)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        return emb


class UNetModel(_TimestepTrunk):
    """ADM's UNet; `attention_resolutions` are downsample rates (at 64 px, (2, 4, 8) = 32, 16, 8 px).

    forward(x [N x C x ...], timesteps [N] (or [1], shared by the batch), y [N] labels if
    class-conditional) -> [N x out_channels x ...].
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        num_classes=None,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
    ):
        super().__init__(
            image_size,
            in_channels,
            model_channels,
            out_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            dims,
            num_classes,
            use_checkpoint,
            use_fp16,
            num_heads,
            num_head_channels,
            num_heads_upsample,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        skip_channels = list(self._skip_channels)
        ch = skip_channels[-1]
        ds = self._ds
        self.output_blocks = nn.ModuleList([])
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [self._res_block(ch + skip_channels.pop(), int(model_channels * mult))]
                ch = int(model_channels * mult)
                if ds in attention_resolutions:
                    layers.append(self._attention_block(ch, self.num_heads_upsample))
                if level and i == num_res_blocks:
                    if resblock_updown:
                        layers.append(self._res_block(ch, ch, up=True))
                    else:
                        layers.append(Upsample(ch, conv_resample, dims=dims, out_channels=ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, int(channel_mult[0] * model_channels), out_channels, 3, padding=1)),
        )

    def _body(self):
        return [self.input_blocks, self.middle_block, self.output_blocks]

    def forward(self, x, timesteps, y=None):
        self._check_inputs(x, timesteps, y)
        emb = self._embed(timesteps, y, x.shape[0])
        h = x.type(self.dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


class SuperResModel(UNetModel):
    """A UNetModel that also sees a low-resolution image, upsampled bilinearly and concatenated to x.

    `in_channels` is the channel count of one image; the network takes twice that.
    """

    def __init__(self, image_size, in_channels, *args, **kwargs):
        super().__init__(image_size, in_channels * 2, *args, **kwargs)

    def forward(self, x, timesteps, low_res=None, **kwargs):
        image_channels = self.in_channels // 2
        if low_res is None:
            raise ValueError("SuperResModel needs the low-resolution images: pass low_res=[N, C, h, w]")
        if x.ndim != 4 or low_res.ndim != 4 or x.shape[1] != image_channels or low_res.shape[1] != image_channels:
            raise ValueError(
                f"x and low_res must both have shape [N, {image_channels}, H, W]; "
                f"got {tuple(x.shape)} and {tuple(low_res.shape)}"
            )
        upsampled = F.interpolate(low_res, x.shape[2:], mode="bilinear")
        return super().forward(torch.cat([x, upsampled], dim=1), timesteps, **kwargs)


class EncoderUNetModel(_TimestepTrunk):
    """The input half of the UNet with a pooling head: ADM's noisy-image classifier.

    `pool`: "adaptive" (average pool, 1x1 conv), "attention" (AttentionPool2d; needs
    `num_head_channels` and images of exactly `image_size`), "spatial" / "spatial_v2" (an MLP
    on the spatial means of every block's output). forward(x, timesteps) -> [N x out_channels].
    """

    def __init__(
        self,
        image_size,
        in_channels,
        model_channels,
        out_channels,
        num_res_blocks,
        attention_resolutions,
        dropout=0,
        channel_mult=(1, 2, 4, 8),
        conv_resample=True,
        dims=2,
        use_checkpoint=False,
        use_fp16=False,
        num_heads=1,
        num_head_channels=-1,
        num_heads_upsample=-1,
        use_scale_shift_norm=False,
        resblock_updown=False,
        use_new_attention_order=False,
        pool="adaptive",
    ):
        if pool not in ("adaptive", "attention", "spatial", "spatial_v2"):
            raise ValueError(f"unknown pool {pool!r}; use adaptive, attention, spatial or spatial_v2")
        if pool == "attention" and num_head_channels == -1:
            raise ValueError("pool='attention' needs num_head_channels (e.g. 64)")
        super().__init__(
            image_size,
            in_channels,
            model_channels,
            out_channels,
            num_res_blocks,
            attention_resolutions,
            dropout,
            channel_mult,
            conv_resample,
            dims,
            None,
            use_checkpoint,
            use_fp16,
            num_heads,
            num_head_channels,
            num_heads_upsample,
            use_scale_shift_norm,
            resblock_updown,
            use_new_attention_order,
        )
        self.pool = pool
        ch = self._skip_channels[-1]
        if pool == "adaptive":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                nn.AdaptiveAvgPool2d((1, 1)),
                zero_module(conv_nd(dims, ch, out_channels, 1)),
                nn.Flatten(),
            )
        elif pool == "attention":
            self.out = nn.Sequential(
                normalization(ch),
                nn.SiLU(),
                AttentionPool2d(image_size // self._ds, ch, num_head_channels, out_channels),
            )
        else:
            # The features are the spatial means of every input block's output and the middle block's.
            feature_size = sum(self._skip_channels) + ch
            if pool == "spatial":
                self.out = nn.Sequential(nn.Linear(feature_size, 2048), nn.ReLU(), nn.Linear(2048, out_channels))
            else:
                self.out = nn.Sequential(
                    nn.Linear(feature_size, 2048),
                    normalization(2048),
                    nn.SiLU(),
                    nn.Linear(2048, out_channels),
                )

    def forward(self, x, timesteps):
        self._check_inputs(x, timesteps, None)
        if self.pool == "attention" and tuple(x.shape[2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"images must be {self.image_size}x{self.image_size} for this classifier's attention pool; "
                f"got {tuple(x.shape[2:])}"
            )
        emb = self._embed(timesteps, None, x.shape[0])
        spatial_means = []
        h = x.type(self.dtype)
        for block in self.input_blocks:
            h = block(h, emb)
            if self.pool.startswith("spatial"):
                spatial_means.append(h.type(x.dtype).mean(dim=(2, 3)))
        h = self.middle_block(h, emb)
        if self.pool.startswith("spatial"):
            spatial_means.append(h.type(x.dtype).mean(dim=(2, 3)))
            return self.out(torch.cat(spatial_means, dim=-1))
        return self.out(h.type(x.dtype))

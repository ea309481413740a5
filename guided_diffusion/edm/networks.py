"""The networks of EDM (Karras et al., NeurIPS 2022), laid out so that EDM's released weights load.

Module and parameter names follow the state of EDM's released pickles exactly: a VPPrecond,
VEPrecond, iDDPMPrecond or EDMPrecond wrapper holds ``model``, a SongUNet (DDPM++ / NCSN++) or a
DhariwalUNet (ADM), whose encoder and decoder are ModuleDicts keyed ``{res}x{res}_{part}``.
The wrappers are denoisers D(x; sigma, class_labels) as edm/samplers.py expects them.

Weights of a freshly built network are placeholders (small random values); these classes exist
to run released weights, loaded with ``edm.pickles.load_edm_network``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding", "FourierEmbedding",
    "SongUNet", "DhariwalUNet", "VPPrecond", "VEPrecond", "iDDPMPrecond", "EDMPrecond",
    "PRECONDITIONERS", "ARCHITECTURES", "build_edm_network",
]


def _placeholder_weight(*shape) -> torch.Tensor:
    fan_in = max(1, math.prod(shape[1:]))
    return torch.randn(*shape) / math.sqrt(fan_in)


class Linear(nn.Module):
    """y = x W^T + b, with the weight cast to the input's dtype (fp16 runs keep fp32 weights).

    The product and the bias are two operations, as in EDM (a fused addmm rounds differently on
    some devices)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(_placeholder_weight(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x):
        out = torch.matmul(x, self.weight.to(x.dtype).t())
        return out if self.bias is None else out + self.bias.to(x.dtype)


def _resample_kernel(taps) -> torch.Tensor:
    """The separable FIR filter of EDM's resampling, as a normalised 1x1xKxK kernel."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """A KxK convolution (K = 0: none) with optional FIR up- or downsampling by 2 before it.

    ``fused_resample`` orders the two as EDM's NCSN++ encoder does: upsample then a padding-free
    convolution, or a padded convolution then the strided filter.
    """

    def __init__(self, in_channels, out_channels, kernel, bias=True, up=False, down=False,
                 resample_filter=(1, 1), fused_resample=False):
        if up and down:
            raise ValueError("a Conv2d resamples up or down, not both")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        self.weight = nn.Parameter(_placeholder_weight(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def _upsample(self, x, f, padding):
        kernel = (f * 4).tile(self.in_channels, 1, 1, 1)
        return F.conv_transpose2d(x, kernel, groups=self.in_channels, stride=2, padding=padding)

    def forward(self, x):
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and w is not None and self.up:
            # the transposed filter and the convolution share the padding: output 2H x 2W
            x = F.conv2d(self._upsample(x, f, max(f_pad - w_pad, 0)), w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and w is not None and self.down:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile(self.out_channels, 1, 1, 1), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = self._upsample(x, f, f_pad)
            if self.down:
                x = F.conv2d(x, f.tile(self.in_channels, 1, 1, 1), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C / 4) groups, as EDM sizes it."""

    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class UNetBlock(nn.Module):
    """Residual block (optionally resampling) with an optional self-attention layer after it.

    One class serves DDPM++, NCSN++ and ADM: ``adaptive_scale`` chooses ADM's scale-and-shift
    conditioning over an added bias, ``skip_scale`` is sqrt(1/2) in Song's networks.
    """

    def __init__(self, in_channels, out_channels, emb_channels, up=False, down=False, attention=False,
                 num_heads=None, channels_per_head=64, dropout=0.0, skip_scale=1.0, eps=1e-5,
                 resample_filter=(1, 1), resample_proj=False, adaptive_scale=True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            projects = resample_proj or out_channels != in_channels
            self.skip = Conv2d(in_channels, out_channels, 1 if projects else 0, up=up, down=down,
                               resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))  # one fused op, as EDM rounds it
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        h = (h + (x if self.skip is None else self.skip(x))) * self.skip_scale
        if self.num_heads:
            h = (self.proj(self._attend(self.norm2(h))) + h) * self.skip_scale
        return h

    def _attend(self, x):
        n, c, height, width = x.shape
        heads = self.num_heads
        # Channels of qkv are laid out [head][channel within head][q, k, v], as EDM's weights expect.
        q, k, v = self.qkv(x).reshape(n * heads, c // heads, 3, height * width).unbind(2)
        # softmax(q^T k / sqrt(c)) in float32 with k scaled first, then v times the weights: EDM's
        # order of operations, so the outputs are EDM's to the bit (a fused attention kernel is
        # as exact but rounds differently, and a sampler's 35 steps can carry that to a pixel)
        scaled_k = (k / math.sqrt(k.shape[1])).to(torch.float32)
        weights = torch.bmm(q.to(torch.float32).transpose(1, 2), scaled_k).softmax(dim=2).to(q.dtype)
        out = torch.bmm(v, weights.transpose(1, 2))
        return out.reshape(n, c, height, width)


class PositionalEmbedding(nn.Module):
    """[cos(x f_j), sin(x f_j)] with f_j = (1 / max_positions)^(j / (C/2 - endpoint))."""

    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        angles = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """[cos(2 pi f x), sin(2 pi f x)] with fixed random frequencies f (NCSN++)."""

    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        angles = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([angles.cos(), angles.sin()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder) and NCSN++ (Fourier, residual encoder).

    Encoder entries ``*_aux_*`` carry the input image alongside the features (``skip`` and
    ``residual`` encoders); the decoder's ``*_aux_norm`` / ``*_aux_conv`` produce the output.
    """

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
                 attn_resolutions=(16,), dropout=0.10, label_dropout=0, embedding_type="positional",
                 channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=(1, 1)):
        _check_choice("embedding_type", embedding_type, ("positional", "fourier"))
        _check_choice("encoder_type", encoder_type, ("standard", "skip", "residual"))
        _check_choice("decoder_type", decoder_type, ("standard", "skip"))
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                     eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False)

        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels, 3)
                cout = model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, 0, down=True, resample_filter=resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, 3, down=True, resample_filter=resample_filter, fused_resample=True
                    )
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skip_channels = [m.out_channels for name, m in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attention, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        out_channels, out_channels, 0, up=True, resample_filter=resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        emb = torch.cat(emb.chunk(2, dim=1)[::-1], dim=1)  # Song's networks order it [sin, cos]
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for name, module in self.enc.items():
            if "aux_down" in name:
                aux = module(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + module(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + module(aux)) / math.sqrt(2)
            else:
                x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
                skips.append(x)

        out = None
        normed = None
        for name, module in self.dec.items():
            if "aux_up" in name:
                out = module(out)
            elif "aux_norm" in name:
                normed = module(x)
            elif "aux_conv" in name:
                image = module(F.silu(normed))
                out = image if out is None else image + out
            else:
                if x.shape[1] != module.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = module(x, emb)
        return out


class DhariwalUNet(nn.Module):
    """ADM's U-Net (Dhariwal & Nichol) as EDM re-implemented it, with adaptive group norm."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4, num_blocks=3,
                 attn_resolutions=(32, 16, 8), dropout=0.10, label_dropout=0):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        self.map_label = Linear(label_dim, emb_channels, bias=False) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, model_channels * mult, 3)
                cout = model_channels * mult
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skip_channels = [m.out_channels for m in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skip_channels.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for module in self.enc.values():
            x = module(x, emb) if isinstance(module, UNetBlock) else module(x)
            skips.append(x)
        for module in self.dec.values():
            if x.shape[1] != module.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = module(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


ARCHITECTURES = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}


def _check_choice(what, value, choices):
    if value not in choices:
        raise ValueError(f"{what} {value!r} is not one of {', '.join(map(repr, choices))}")


class _Precond(nn.Module):
    """A denoiser D(x; sigma, class_labels) = c_skip x + c_out F(c_in x; c_noise) around a U-Net.

    ``sigma`` is a number or a tensor of one value per sample; ``class_labels`` are one-hot rows
    (as EDM passes them) or integer class indices. Returns float32, as EDM's wrappers do.
    """

    default_model_type = "SongUNet"
    output_factor = 1  # iDDPM's network also predicts variances: twice the image channels

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, model_type=None,
                 **model_kwargs):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        model_type = model_type or self.default_model_type
        if model_type not in ARCHITECTURES:
            raise ValueError(f"model_type {model_type!r} is not one of {', '.join(ARCHITECTURES)}")
        try:
            self.model = ARCHITECTURES[model_type](
                img_resolution=img_resolution, in_channels=img_channels,
                out_channels=img_channels * self.output_factor, label_dim=label_dim, **model_kwargs,
            )
        except TypeError as exc:
            raise ValueError(f"{model_type} cannot be built with these arguments: {exc}") from None

    def _labels(self, class_labels, batch, device):
        if self.label_dim == 0:
            return None
        if class_labels is None:  # EDM's convention: an all-zero label row
            return torch.zeros([1, self.label_dim], device=device)
        if not class_labels.is_floating_point():
            if class_labels.dim() != 1:
                raise ValueError("integer class labels must be one index per sample")
            return F.one_hot(class_labels.to(device).long(), self.label_dim).to(torch.float32)
        return class_labels.to(device=device, dtype=torch.float32).reshape(-1, self.label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        labels = self._labels(class_labels, x.shape[0], x.device)
        dtype = torch.float16 if self.use_fp16 and not force_fp32 and x.device.type == "cuda" else torch.float32
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        out = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels, **model_kwargs)
        return c_skip * x + c_out * out[:, : self.img_channels].to(torch.float32)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) at noise level ``sigma`` (shape N x 1 x 1 x 1)."""
        raise NotImplementedError

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance-preserving SDE of Song et al.: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        # EDM evaluates these in float32 (0.0009765625 and 152.1669769 for its defaults, where the
        # exact values are 0.0010005 and 152.1669703); samplers clip their range to them
        self.sigma_min = float(self._sigma(torch.tensor(epsilon_t, device="cpu")))
        self.sigma_max = float(self._sigma(torch.tensor(1, device="cpu")))

    def sigma(self, t):
        return self._sigma(torch.as_tensor(t))

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma):
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(_Precond):
    """Variance-exploding SDE: the network sees x unscaled and log(sigma / 2)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100,
                 model_type="SongUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        return 1, sigma, 1, (0.5 * sigma).log()


class iDDPMPrecond(_Precond):  # noqa: N801 (EDM's class name, stored in its pickles)
    """Improved DDPM (cosine schedule, M steps): sigma snaps to the M discrete levels ``u``.

    ``u`` is a buffer (EDM's pickles carry it); ``sigma_min`` and ``sigma_max`` are read from it,
    so a loaded network reports the levels of its file, as EDM's object does.
    """

    default_model_type = "DhariwalUNet"
    output_factor = 2

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000,
                 model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.C_1 = C_1
        self.C_2 = C_2
        self.M = M
        self.register_buffer("u", iddpm_sigma_levels(M, C_1, C_2, dtype=torch.float32))

    @property
    def sigma_min(self) -> float:
        return float(self.u[self.M - 1])

    @property
    def sigma_max(self) -> float:
        return float(self.u[0])

    def _nearest_level(self, sigma):
        sigma = torch.as_tensor(sigma)
        flat = sigma.to(device=self.u.device, dtype=torch.float32).reshape(1, -1, 1)
        # distances as torch.cdist gives them (EDM's choice): for 1001 levels it takes the
        # matrix-product form, whose rounding can differ from |a - b| where two levels are near-equal
        index = torch.cdist(flat, self.u.reshape(1, -1, 1).to(torch.float32)).argmin(2)
        return index.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma):
        c_noise = self.M - 1 - self._nearest_level(sigma).to(torch.float32)
        return 1, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def round_sigma(self, sigma):
        sigma = torch.as_tensor(sigma)
        index = self._nearest_level(sigma)
        return self.u.to(sigma.device)[index].to(sigma.dtype)


def iddpm_sigma_levels(M=1000, C_1=0.001, C_2=0.008, dtype=torch.float64) -> torch.Tensor:
    """The M + 1 noise levels u_0 > ... > u_M = 0 of iDDPM's cosine schedule, as EDM computes them.

    u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1) / abar(j), C_1) - 1), abar(j) = sin^2(pi j / (2 M (1 + C_2))).
    abar is evaluated in float32 from the integer j, and the recursion runs in ``dtype``: float32
    for the network's buffer (``iDDPMPrecond.u``), float64 for the sampler's iddpm discretization.
    The rounding matters: the sampler keeps the levels within [sigma_min, sigma_max], and
    sigma_min is the network's float32 u_{M-1}. Computed on the CPU.
    """
    def abar(j):
        angle = 0.5 * math.pi * torch.tensor(j, dtype=torch.int64, device="cpu") / M / (C_2 + 1)  # float32
        return angle.sin() ** 2

    u = torch.zeros(M + 1, dtype=dtype, device="cpu")
    for j in range(M, 0, -1):
        ratio = (abar(j - 1) / abar(j)).clamp(min=C_1)
        u[j - 1] = ((u[j] ** 2 + 1) / ratio - 1).sqrt()
    return u


class EDMPrecond(_Precond):
    """EDM's own preconditioning, built around the data standard deviation sigma_data."""

    default_model_type = "DhariwalUNet"

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, sigma_min=0,
                 sigma_max=float("inf"), sigma_data=0.5, model_type="DhariwalUNet", **model_kwargs):
        super().__init__(img_resolution, img_channels, label_dim, use_fp16, model_type, **model_kwargs)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        return c_skip, c_out, c_in, sigma.log() / 4


PRECONDITIONERS = {cls.__name__: cls for cls in (VPPrecond, VEPrecond, iDDPMPrecond, EDMPrecond)}


def build_edm_network(class_name: str, init_kwargs: dict) -> _Precond:
    """The denoiser EDM built as ``class_name(**init_kwargs)`` (the record in its pickles)."""
    if class_name not in PRECONDITIONERS:
        raise ValueError(
            f"{class_name!r} is not one of EDM's denoisers ({', '.join(PRECONDITIONERS)}); "
            "pass the network ('ema') of an EDM pickle"
        )
    try:
        return PRECONDITIONERS[class_name](**init_kwargs)
    except TypeError as exc:
        raise ValueError(f"{class_name} cannot be built with these arguments: {exc}") from None

"""Speed-up switches for sampling, each one behind a flag, all behind one call.

``optimize_for_sampling(model, ...)`` returns a callable with the network's interface,
``model(x, t, **kwargs)``, that the samplers take in place of the network. Every switch computes
the same function: the float32 ones agree with plain eager float32 within the reference tolerance
(``FLOAT32_ATOL``); reduced precision stays within ``AUTOCAST_REL_TOL`` (relative L2 error of the
output). benchmarks/bench_sampling.py measures what each switch buys and checks both tolerances.

- fused_attention: attention through scaled_dot_product_attention's fused kernels (flash /
  memory-efficient); off runs ADM's own attention arithmetic in the ADM networks (bit for bit
  ADM's outputs; unet.py) and SDPA's math backend, softmax(q k^T / sqrt(d)) v, in EDM's.
- channels_last: convolution weights and the input in NHWC order, the layout cuDNN's tensor-core
  kernels and oneDNN prefer. Converts the model in place.
- inference_mode: torch.inference_mode() around the network (no autograd bookkeeping at all,
  where no_grad still tracks versions and views). The result is returned as an ordinary tensor,
  so classifier guidance and in-place updates downstream keep working.
- autocast_dtype: torch.float16 or torch.bfloat16 autocast (matrix products and convolutions in
  half precision, GroupNorm and the output in float32). For GPUs; bfloat16 also runs on CPUs.
- compile: torch.compile(model, dynamic=False); the first call of each input shape compiles.
- cuda_graphs: the whole forward pass captured once per input shape as a CUDA graph and replayed,
  so one launch replaces hundreds of kernel launches. Needs a model on a CUDA device and fixed
  shapes (the sampling loop's are); the first call of each shape warms up and captures.

ADM's own half precision (``use_fp16``: ``model.convert_to_fp16()``) is a property of the model,
not a switch here; it composes with every switch except autocast.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from guided_diffusion.unet import fused_attention

# Float32 switches must agree with eager float32 this closely (max absolute difference), the
# tolerance the reference vectors document for a different but exact attention kernel.
FLOAT32_ATOL = 1e-4
# Reduced precision: ||out - ref|| / ||ref|| of the network output against eager float32.
# bfloat16 keeps 8 significant bits, float16 11; measured errors of the CIFAR-10 network with
# random weights are 1.3e-2 (bfloat16), and the bounds leave room for deeper networks.
AUTOCAST_REL_TOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}

_DTYPE_NAMES = {
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_autocast_dtype(value) -> torch.dtype | None:
    """None / 'none' / 'fp32' -> None; 'fp16', 'float16', torch.float16 -> float16; likewise bfloat16."""
    if value is None or value is torch.float32 or str(value).lower() in ("", "none", "fp32", "float32"):
        return None
    if isinstance(value, torch.dtype):
        if value in AUTOCAST_REL_TOL:
            return value
    elif str(value).lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[str(value).lower()]
    raise ValueError(f"autocast dtype {value!r} is not supported; use float16, bfloat16 or None")


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX-512 BF16 or AMX). Without it oneDNN
    emulates bfloat16 autocast, and a network runs far slower than in float32 (CIFAR-10, batch 1,
    on an AVX2-only EPYC: 21 s against 0.17 s; benchmarks/RESULTS.md). torch's probes are private
    and version-dependent: when it has none, the CPU is taken to have it (no false alarm)."""
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def slow_autocast_warning(dtype, device) -> str | None:
    """Why autocast to ``dtype`` on ``device`` would be slower than float32 (None when it would not):
    bfloat16 on a CPU without bfloat16 hardware."""
    if dtype == torch.bfloat16 and torch.device(device).type == "cpu" and not cpu_has_native_bfloat16():
        return ("this CPU has no bfloat16 hardware (AVX-512 BF16 or AMX), so --autocast_dtype bf16 is emulated "
                "and far slower than float32 here; --autocast_dtype none is faster")
    return None


@dataclass(frozen=True)
class SpeedSettings:
    """Which switches a SamplingModel runs with (see the module docstring)."""

    fused_attention: bool = True
    channels_last: bool = False
    inference_mode: bool = True
    autocast_dtype: torch.dtype | None = None
    compile: bool = False
    cuda_graphs: bool = False


def attention_backend(fused: bool):
    """A context in which attention may use scaled_dot_product_attention's fused kernels, or, off,
    ADM's arithmetic (ADM networks) and SDPA's math backend (EDM networks)."""
    if fused:
        return fused_attention()
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)
    return sdpa_kernel(SDPBackend.MATH)


class SamplingModel:
    """A network with speed-up switches, called like the network: ``model(x, t, **kwargs)``.

    ``parameters()`` is the network's, so the samplers find the device as before; the network
    itself is ``.model``. Outputs have the input's dtype and the standard (contiguous) layout.
    """

    def __init__(self, model: torch.nn.Module, settings: SpeedSettings):
        self.model = model
        self.settings = settings
        self._forward = torch.compile(model, dynamic=False) if settings.compile else model
        self._graphs = {}
        self._graph_pool = None

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def __call__(self, x, t, **kwargs):
        if self.settings.cuda_graphs:
            return self._replay(x, t, kwargs)
        # Under inference mode the network's output is an inference tensor: hand back a copy.
        return self._run(x, t, kwargs).to(memory_format=torch.contiguous_format, copy=self.settings.inference_mode)

    def _run(self, x, t, kwargs):
        s = self.settings
        grad_mode = torch.inference_mode() if s.inference_mode else torch.no_grad()
        # No cast cache: every weight is used once per call, and a CUDA graph must not keep
        # pointers into a cache that is freed when the autocast context closes.
        autocast = (
            torch.autocast(device_type=x.device.type, dtype=s.autocast_dtype, cache_enabled=False)
            if s.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        if s.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with grad_mode, autocast, attention_backend(s.fused_attention):
            out = self._forward(x, t, **kwargs)
        return out.to(x.dtype)

    def _replay(self, x, t, kwargs):
        key = _signature(x, t, kwargs)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(x, t, kwargs)
        graph, static_inputs, static_out = entry
        for static, value in zip(static_inputs, (x, t, *(kwargs[k] for k in sorted(kwargs)))):
            if isinstance(static, torch.Tensor):
                static.copy_(value)
        graph.replay()
        # The next replay overwrites static_out; the caller gets its own copy.
        return static_out.to(memory_format=torch.contiguous_format, copy=True)

    def _capture(self, x, t, kwargs):
        names = sorted(kwargs)
        static = [v.clone() if isinstance(v, torch.Tensor) else v for v in (x, t, *(kwargs[k] for k in names))]

        def run():
            return self._run(static[0], static[1], dict(zip(names, static[2:])))

        # Warm-up on a side stream (lazy initialisation, cuDNN autotuning, compilation), then capture.
        side = torch.cuda.Stream(device=x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            static_out = run()
        return graph, static, static_out


def _signature(x, t, kwargs):
    """What a captured graph is specific to: shapes, dtypes and devices (values of non-tensors)."""

    def describe(v):
        return (tuple(v.shape), v.dtype, v.device) if isinstance(v, torch.Tensor) else ("value", repr(v))

    return (describe(x), describe(t), tuple((k, describe(kwargs[k])) for k in sorted(kwargs)))


def _model_device(model: torch.nn.Module) -> torch.device:
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def optimize_for_sampling(
    model: torch.nn.Module,
    *,
    fused_attention: bool = True,
    channels_last: bool = False,
    inference_mode: bool = True,
    autocast_dtype=None,
    compile: bool = False,
    cuda_graphs: bool = False,
) -> SamplingModel:
    """Wrap an eval-mode network for sampling with the chosen switches (module docstring).

    All switches off (``fused_attention=False, inference_mode=False``) is plain eager float32
    under no_grad, the baseline the benchmark compares against.
    """
    if not isinstance(model, torch.nn.Module):
        raise ValueError(f"optimize_for_sampling takes a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError("the model is in training mode (dropout active); call model.eval() before sampling")
    dtype = parse_autocast_dtype(autocast_dtype)
    if dtype is not None and getattr(model, "dtype", torch.float32) != torch.float32:
        raise ValueError(
            f"autocast_dtype needs a float32 model, but this one computes in {model.dtype} (use_fp16); "
            "call model.convert_to_fp32() or leave autocast_dtype unset"
        )
    if cuda_graphs and _model_device(model).type != "cuda":
        raise ValueError(
            f"cuda_graphs needs a model on a CUDA device, but it is on {_model_device(model)}; "
            "move it with model.to('cuda') or set cuda_graphs=False"
        )
    if channels_last:
        model.to(memory_format=torch.channels_last)
    settings = SpeedSettings(
        fused_attention=bool(fused_attention),
        channels_last=bool(channels_last),
        inference_mode=bool(inference_mode),
        autocast_dtype=dtype,
        compile=bool(compile),
        cuda_graphs=bool(cuda_graphs),
    )
    return SamplingModel(model, settings)

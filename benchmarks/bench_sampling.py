"""Sampling speed of ADM's networks: forward and whole-sampling throughput, FLOPs, peak memory,
and what each switch of guided_diffusion/speed.py buys, all in one run.

Subcommands (``python benchmarks/bench_sampling.py SUBCOMMAND --help``):
  run          forward (and optionally sampling) throughput of configs at batch sizes, for a list
               of variants; every variant's output is checked against plain eager float32
  rss          peak RSS of scripts/image_sample.py with a tiny model at two --num_samples values
  gpu-check    the preset that benchmarks/gpu_check.sh runs on a lent GPU (a smoke run on CPU)
  nccl-check   all_reduce over the ranks of a torchrun launch

A variant is "eager" (plain eager float32: math attention, no_grad) or switches joined by "+":
  sdpa (fused attention), inference (inference mode), channels_last, compile (torch.compile),
  graphs (CUDA graphs), bf16 / fp16 (autocast), adm_fp16 (ADM's convert_to_fp16),
  tf32 (TF32 matrix units, CUDA), autotune (cudnn.benchmark, CUDA).
On CUDA, float32 means strict float32: TF32 is off unless a variant names it.

FLOPs are counted with torch.utils.flop_counter.FlopCounterMode on the meta device (2 per
multiply-add: convolutions, matrix products, attention); achieved FLOP/s is set against the
machine's float32 matrix-multiply rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
# Measure the checkout this file belongs to, whichever copy of the package is installed.
sys.path.insert(0, str(ROOT))

from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion import script_util as su  # noqa: E402
from adm_common.cli import cli_main  # noqa: E402
from adm_common.errors import UsageError  # noqa: E402
from adm_common.files import atomic_write_text  # noqa: E402
from guided_diffusion.image_noise import ImageNoise, image_labels  # noqa: E402
from guided_diffusion.run.speed import AUTOCAST_REL_TOL, FLOAT32_ATOL, attention_backend, optimize_for_sampling  # noqa: E402

SWITCHES = ("sdpa", "inference", "channels_last", "compile", "graphs", "bf16", "fp16", "adm_fp16", "tf32", "autotune")
CUDA_ONLY = {
    "graphs": "CUDA graphs need a GPU",
    "fp16": "this CPU has no float16 arithmetic units",
    "adm_fp16": "ADM's scripts run float16 convolutions on GPUs only",
    "tf32": "TF32 exists on NVIDIA GPUs only",
    "autotune": "cudnn.benchmark exists on NVIDIA GPUs only",
}
HALF_SWITCHES = ("bf16", "fp16", "adm_fp16")

# A small class-conditional model for smoke runs (every block type, attention included).
TINY_FLAGS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    num_head_channels=16, class_cond=True, num_classes=10, learn_sigma=True, use_scale_shift_norm=True,
    resblock_updown=True, use_new_attention_order=True, noise_schedule="cosine", diffusion_steps=1000,
)


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    name: str
    switches: frozenset

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = [] if name == "eager" else name.split("+")
        unknown = [p for p in parts if p not in SWITCHES]
        if unknown:
            raise ValueError(f"unknown switch {unknown[0]!r} in variant {name!r}; use eager or +-joined {', '.join(SWITCHES)}")
        if sum(p in HALF_SWITCHES for p in parts) > 1:
            raise ValueError(f"variant {name!r} names more than one of {', '.join(HALF_SWITCHES)}; choose one")
        return cls(name, frozenset(parts))

    def skip_reason(self, device: torch.device, allow_compile: bool = True) -> str | None:
        if device.type != "cuda":
            for switch, reason in CUDA_ONLY.items():
                if switch in self.switches:
                    return reason
        if "compile" in self.switches and not allow_compile:
            return "torch.compile left out of this run (it takes minutes here)"
        return None

    @property
    def precision(self) -> str:
        if "bf16" in self.switches:
            return "bfloat16"
        if self.switches & {"fp16", "adm_fp16"}:
            return "float16"
        return "tf32" if "tf32" in self.switches else "float32"


def parse_variants(text: str) -> list[Variant]:
    variants = [Variant.parse(v.strip()) for v in text.split(",") if v.strip()]
    if not variants or variants[0].name != "eager":
        raise ValueError("the variant list must start with eager (the baseline every ratio refers to)")
    return variants


@contextlib.contextmanager
def backend_flags(variant: Variant, device: torch.device):
    """TF32 and cuDNN autotuning as the variant asks (CUDA), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in variant.switches
    torch.backends.cudnn.benchmark = "autotune" in variant.switches
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def build_variant(base_model: torch.nn.Module, variant: Variant):
    """The float32 network with the variant's switches. Switches that convert the network in place
    get a copy, so the base network stays as it is; the others share its weights."""
    s = variant.switches
    model = copy.deepcopy(base_model) if s & {"channels_last", "adm_fp16"} else base_model
    if "adm_fp16" in s:
        model.convert_to_fp16()
    autocast = "bfloat16" if "bf16" in s else "float16" if "fp16" in s else None
    return optimize_for_sampling(
        model,
        fused_attention="sdpa" in s,
        channels_last="channels_last" in s,
        inference_mode="inference" in s,
        autocast_dtype=autocast,
        compile="compile" in s,
        cuda_graphs="graphs" in s,
    )


def compare_outputs(out: torch.Tensor, ref: torch.Tensor, precision: str) -> dict:
    """Agreement with eager float32: max |diff| for float32 switches, relative L2 error otherwise."""
    diff = out.double() - ref.double()
    max_abs = diff.abs().max().item()
    rel_l2 = (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()
    finite = bool(torch.isfinite(out).all())
    if precision == "float32":
        # 1e-4 is the reference tolerance for outputs of order 1; larger outputs scale it.
        tolerance = FLOAT32_ATOL * max(1.0, ref.abs().max().item())
        equal = finite and max_abs <= tolerance
        criterion = "max_abs"
    else:
        tolerance = AUTOCAST_REL_TOL[torch.bfloat16 if precision == "bfloat16" else torch.float16]
        equal = finite and rel_l2 <= tolerance
        criterion = "rel_l2"
    return dict(max_abs_diff=max_abs, rel_l2_error=rel_l2, criterion=criterion, tolerance=tolerance, equal=equal)


# ---------------------------------------------------------------------------------------------
# Workloads: a config's network with random weights, its inputs, its diffusion


@dataclass
class Workload:
    config: str
    flags: dict
    eps_scale: str | None

    @classmethod
    def load(cls, name: str) -> "Workload":
        defaults = su.model_and_diffusion_defaults()
        if name == "tiny":
            return cls(name, {**defaults, **TINY_FLAGS}, "1.01")
        config = su.load_config(name)
        flags = {**defaults, **{k: v for k, v in config["flags"].items() if k in defaults}}
        published = ((config.get("eps_scale") or {}).get("uniform") or {}).values()
        return cls(name, flags, next(iter(published), None))

    @property
    def image_size(self) -> int:
        return self.flags["image_size"]

    def network(self, device: torch.device, seed: int = 0) -> torch.nn.Module:
        """The network with random weights; ADM's zero-initialised layers get small random values
        so that every branch contributes to the output."""
        torch.manual_seed(seed)
        with torch.device(device):
            model, _ = su.create_model_and_diffusion(**self.flags)
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0.0, 0.02)
        return model.eval()

    def diffusion(self, steps: int):
        return su.diffusion_from_flags(self.flags, str(steps), self.eps_scale)

    def inputs(self, batch: int, device: torch.device, seed: int = 1):
        """Network inputs x, t and kwargs (labels y when class-conditional), drawn on the CPU."""
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 3, self.image_size, self.image_size, generator=g)
        t = torch.randint(0, self.flags["diffusion_steps"], (batch,), generator=g)
        kwargs = {}
        if self.flags["class_cond"]:
            kwargs["y"] = torch.randint(0, self.flags["num_classes"], (batch,), generator=g).to(device)
        return x.to(device), t.to(device), kwargs

    def flops_per_image(self) -> dict:
        """FLOPs of one forward pass per image, by operator (counted on the meta device)."""
        with torch.device("meta"):
            model, _ = su.create_model_and_diffusion(**self.flags)
        images = 2
        x, t, kwargs = self.inputs(images, torch.device("meta"))
        # The math attention backend: its two batched products are counted (the CPU's fused kernel is not).
        with FlopCounterMode(display=False) as counter, torch.no_grad(), attention_backend(False):
            model.eval()(x, t, **kwargs)
        by_op = {str(op).replace("aten.", ""): n / images for op, n in counter.get_flop_counts()["Global"].items()}
        return dict(total=counter.get_total_flops() / images, by_op=by_op,
                    parameters=sum(p.numel() for p in model.parameters()))


# ---------------------------------------------------------------------------------------------
# Measuring


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup=1, min_repeats=3, min_seconds=1.0, max_repeats=30) -> list[float]:
    """Wall-clock seconds of each call of fn() after `warmup` calls (the device synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times, started = [], time.perf_counter()
    while len(times) < min_repeats or (time.perf_counter() - started < min_seconds and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory over a `with` block: the CUDA allocator's peak on a GPU; on a CPU the process's
    peak RSS, reset at entry through /proc/self/clear_refs (else the peak since the process began)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.record = {}

    def __enter__(self):
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            self.kind = "CUDA memory allocated"
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.kind = "process RSS"
            except OSError:
                self.kind = "process peak RSS since start (could not reset)"
            self.before = (_status_kib("VmRSS") or 0) * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _status_kib("VmHWM")
            peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.record = dict(kind=self.kind, peak_mib=peak / 2**20, before_mib=self.before / 2**20)
        return False


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 5, tf32: bool = False) -> dict:
    """Best rate of an n x n x n matrix product: the machine's achievable peak for that dtype."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g, device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        times = time_calls(lambda: torch.mm(a, b), device, warmup=2, min_repeats=repeats, min_seconds=0.5)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    name = "tf32" if tf32 else str(dtype).split(".")[-1]
    return dict(dtype=name, n=n, tflops=2 * n**3 / min(times) / 1e12, tflops_median=2 * n**3 / statistics.median(times) / 1e12)


class CpuPeakProbe:
    """The float32 matrix-product rate of a shared CPU, sampled between a network's timed calls.

    Other processes move the achievable rate from minute to minute, so a network's best rate is
    set against the best rate of matrix products timed in the same window. Three kernels, since the
    libraries and shapes differ: torch.mm (MKL's sgemm), a 1 x 1 convolution on channels-last input
    (oneDNN; the matrix product [N*H*W x C_in] x [C_in x C_out], 4096 x 1024 x 1024 here), and a
    3 x 3 convolution of the shape the CIFAR-10 network spends most time in (256 channels at 16 x 16,
    batch 16), whose oneDNN kernel beats both on one thread. The matmul peak is the faster of the
    first two; the 3 x 3 convolution is reported beside it as the rate the network's own layers
    could reach.
    """

    MATMUL_KERNELS = ("mm", "conv1x1")

    def __init__(self, n: int = 2048):
        g = torch.Generator().manual_seed(0)
        self.a, self.b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
        self.x = torch.randn(1, 1024, 64, 64, generator=g).contiguous(memory_format=torch.channels_last)
        self.w = torch.randn(1024, 1024, 1, 1, generator=g)
        self.x3 = torch.randn(16, 256, 16, 16, generator=g).contiguous(memory_format=torch.channels_last)
        self.w3 = torch.randn(256, 256, 3, 3, generator=g)
        self.kernels = (
            ("mm", lambda: torch.mm(self.a, self.b), 2 * n**3),
            ("conv1x1", lambda: torch.nn.functional.conv2d(self.x, self.w), 2 * 4096 * 1024 * 1024),
            ("conv3x3", lambda: torch.nn.functional.conv2d(self.x3, self.w3, padding=1), 2 * 16 * 256 * 256 * 256 * 9),
        )
        self.best = {name: 0.0 for name, _, _ in self.kernels}
        for _, fn, _ in self.kernels:
            fn()

    def sample(self) -> None:
        for name, fn, flops in self.kernels:
            t0 = time.perf_counter()
            fn()
            self.best[name] = max(self.best[name], flops / (time.perf_counter() - t0) / 1e12)

    def record(self) -> dict:
        return dict(tflops=dict(self.best), peak_tflops=max(self.best[k] for k in self.MATMUL_KERNELS))


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: torch.device) -> dict:
    info = dict(
        cpu=cpu_model_name(), cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
        python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
        load_average=[round(v, 2) for v in os.getloadavg()], device=str(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(), gpu_count=torch.cuda.device_count())
    return info


def measure_peaks(device: torch.device) -> list[dict]:
    if device.type == "cuda":
        return [matmul_peak(device, torch.float32, 8192), matmul_peak(device, torch.float32, 8192, tf32=True),
                matmul_peak(device, torch.bfloat16, 8192), matmul_peak(device, torch.float16, 8192)]
    probe = CpuPeakProbe()
    for _ in range(5):
        probe.sample()
    conv1 = dict(dtype="float32 (1x1 conv, oneDNN)", n=4096, tflops=probe.best["conv1x1"], tflops_median=None)
    conv3 = dict(dtype="float32 (3x3 conv, oneDNN)", n=None, tflops=probe.best["conv3x3"], tflops_median=None)
    peaks = [matmul_peak(device, torch.float32, 2048), conv1, conv3]
    if cpu_has_bfloat16_units():  # elsewhere bfloat16 products are emulated: minutes per product, no peak
        peaks.append(matmul_peak(device, torch.bfloat16, 2048))
    return peaks


def cpu_has_bfloat16_units() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX), as /proc/cpuinfo says;
    True where it cannot be told."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))


def peak_for(peaks: list[dict], precision: str) -> float | None:
    """The best measured matrix-product rate for a precision (float32: the best of the float32 matmul kernels)."""
    rates = [p["tflops"] for p in peaks if p["dtype"].split()[0] == precision and "3x3 conv" not in p["dtype"]]
    if not rates and precision != "float32":
        return peak_for(peaks, "float32")
    return max(rates) if rates else None


def prepare_variant(base_model, variant, x, t, kwargs, device):
    """Build a variant and make its first call (compilation, graph capture, autotuning), then one
    more under PeakMemory. Returns (model, seconds of the first call, memory record)."""
    with backend_flags(variant, device):
        model = build_variant(base_model, variant)
        started = time.perf_counter()
        model(x, t, **kwargs)
        synchronize(device)
        first_call = time.perf_counter() - started
        with PeakMemory(device) as memory:
            model(x, t, **kwargs)
    return model, first_call, memory.record


def measure_forward_group(workload, base_model, variants, batch, device, flops_per_image, timing) -> list:
    """Time the variants in rounds, one call of each per round (the order rotating), so that a
    shared machine's changing load falls on all of them alike. On a CPU the float32 matrix
    products are timed after every call (CpuPeakProbe). Returns (entry, output) per variant."""
    x, t, kwargs = workload.inputs(batch, device)
    prepared = [(v, *prepare_variant(base_model, v, x, t, kwargs, device)) for v in variants]
    probe = CpuPeakProbe() if device.type == "cpu" else None
    times = {v.name: [] for v in variants}
    started, rounds = time.perf_counter(), 0
    while rounds < timing["min_repeats"] or (time.perf_counter() - started < timing["min_seconds"] and rounds < 30):
        for variant, model, _, _ in prepared[rounds % len(prepared):] + prepared[:rounds % len(prepared)]:
            with backend_flags(variant, device):
                t0 = time.perf_counter()
                model(x, t, **kwargs)
                synchronize(device)
                times[variant.name].append(time.perf_counter() - t0)
            if probe is not None:
                probe.sample()
        rounds += 1
    results = []
    for variant, model, first_call, memory in prepared:
        with backend_flags(variant, device):
            out = model(x, t, **kwargs).float()
        # Rates from the fastest call: on a shared machine the others measure the neighbours' load.
        best = min(times[variant.name])
        entry = dict(
            config=workload.config, batch=batch, variant=variant.name, precision=variant.precision,
            first_call_s=first_call, seconds=best, seconds_median=statistics.median(times[variant.name]),
            repeats=rounds, images_per_s=batch / best, tflops=flops_per_image * batch / best / 1e12, memory=memory,
        )
        if probe is not None:
            entry["window_peak"] = probe.record()
        results.append((entry, out))
    return results


class TimedNetwork:
    """Calls a network and adds up the time spent inside it. On a GPU it records CUDA events
    around each call, so the loop is not synchronised more than it already is."""

    def __init__(self, network, device: torch.device):
        self.network = network
        self.device = device
        self.seconds = 0.0
        self.events = []
        self.calls = 0

    def parameters(self, recurse: bool = True):
        return self.network.parameters(recurse)

    def __call__(self, x, t, **kwargs):
        self.calls += 1
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.network(x, t, **kwargs)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.network(x, t, **kwargs)
        self.seconds += time.perf_counter() - t0
        return out

    def network_seconds(self) -> float:
        synchronize(self.device)
        return self.seconds + sum(s.elapsed_time(e) for s, e in self.events) / 1000


def measure_sampling(workload, base_model, variant, batch, steps, device, reference=None, seed=0) -> dict:
    """One whole ancestral sampling run (p_sample_loop, per-image noise as the scripts draw it)."""
    entry = dict(config=workload.config, batch=batch, variant=variant.name, steps=steps, eps_scale=workload.eps_scale)
    diffusion = workload.diffusion(steps)
    shape = (batch, 3, workload.image_size, workload.image_size)
    indices = list(range(batch))
    kwargs = {}
    if workload.flags["class_cond"]:
        kwargs["y"] = image_labels(seed, indices, workload.flags["num_classes"], device=device)
    with backend_flags(variant, device):
        model = build_variant(base_model, variant)
        x, t, _ = workload.inputs(batch, device)
        model(x, t, **kwargs)  # compile / capture / autotune for these shapes before the clock starts
        timed = TimedNetwork(model, device)
        synchronize(device)
        with PeakMemory(device) as memory:
            started = time.perf_counter()
            samples = diffusion.p_sample_loop(
                timed, shape, model_kwargs=kwargs, device=device, generator=ImageNoise(seed, indices),
                clip_denoised=True, progress=False,
            )
            synchronize(device)
            wall = time.perf_counter() - started
    network = timed.network_seconds()
    entry.update(
        seconds=wall, network_seconds=network, network_calls=timed.calls, images_per_s=batch / wall,
        images_per_s_100_steps=batch / wall * steps / 100, loop_overhead=(wall - network) / network,
        memory=memory.record,
    )
    if reference is not None:
        # The noisiest step multiplies network rounding by up to sqrt(1 / alpha_bar - 1) in x0 (clipped
        # to [-1, 1]), so a few pixels move by ~1e-2 while the mean stays at rounding level.
        diff = (samples.double() - reference.double()).abs()
        entry.update(max_abs_diff_samples=diff.max().item(), mean_abs_diff_samples=diff.mean().item())
    return entry, samples


# Profiler op names -> what they are; the first matching substring wins.
CATEGORIES = (
    ("convolution", ("conv",)),
    ("attention", ("attention", "bmm", "softmax")),
    ("linear layers", ("addmm", "linear", "aten::mm")),
    ("GroupNorm", ("group_norm",)),
    ("SiLU", ("silu",)),
    ("copies, concat, resampling", ("copy", "contiguous", "clone", "cat", "upsample", "pool", "_to_", "fill")),
    ("elementwise", ("add", "mul", "div", "sub", "exp", "cos", "sin", "clamp")),
)
FLOP_CATEGORY = {"convolution": "convolution", "bmm": "attention", "mm": "linear layers", "addmm": "linear layers"}


def op_breakdown(workload, base_model, variant, batch, device, flops_by_op, calls: int = 2) -> dict:
    """Where one forward pass's time goes (profiler self times), next to its FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    x, t, kwargs = workload.inputs(batch, device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with backend_flags(variant, device):
        model = build_variant(base_model, variant)
        model(x, t, **kwargs)
        synchronize(device)
        with profile(activities=activities) as prof:
            for _ in range(calls):
                model(x, t, **kwargs)
            synchronize(device)
    seconds = {name: 0.0 for name, _ in CATEGORIES}
    seconds["other"] = 0.0
    for event in prof.key_averages():
        if device.type == "cuda":
            if not str(event.device_type).endswith("CPU"):
                continue  # a kernel's own row: its time is already in the operator that launched it
            us = getattr(event, "self_device_time_total", None)
            us = getattr(event, "self_cuda_time_total", 0) if us is None else us
        else:
            us = event.self_cpu_time_total
        key = event.key.lower()
        category = next((name for name, needles in CATEGORIES if any(n in key for n in needles)), "other")
        seconds[category] += us / 1e6 / calls
    flops = {name: 0.0 for name in seconds}
    for op, n in flops_by_op.items():
        flops[FLOP_CATEGORY.get(op, "other")] += n * batch
    total_s, total_f = sum(seconds.values()), sum(flops.values())
    rows = [
        dict(category=name, seconds=s, time_share=s / total_s if total_s else 0.0,
             flop_share=flops[name] / total_f if total_f else 0.0,
             tflops=flops[name] / s / 1e12 if s and flops[name] else None)
        for name, s in seconds.items() if s or flops[name]
    ]
    return dict(config=workload.config, batch=batch, variant=variant.name, profiled_seconds=total_s, rows=rows)


def sdpa_kernel_check(device: torch.device, batch=8, heads=3, tokens=1024, head_channels=64) -> list[dict]:
    """Each scaled_dot_product_attention backend against the math backend on an ImageNet-64
    attention shape (32 x 32 tokens, heads of 64 channels), in every dtype it takes."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return [dict(backend="all", skipped="torch.nn.attention needs torch >= 2.3")]
    import torch.nn.functional as F

    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, head_channels, generator=g, device=device) for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    backends = [name for name in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH") if hasattr(SDPBackend, name)]
    results = []
    for name in backends:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            row = dict(backend=name.lower(), dtype=str(dtype).split(".")[-1])
            try:
                with sdpa_kernel(getattr(SDPBackend, name)):
                    call = lambda: F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype))  # noqa: E731
                    out = call()
                    times = time_calls(call, device, warmup=1, min_repeats=5, min_seconds=0.2)
                row.update(compare_outputs(out.float(), ref.float(), "float32" if dtype == torch.float32 else row["dtype"]))
                row["ms"] = statistics.median(times) * 1e3
            except (RuntimeError, ValueError, NotImplementedError) as exc:
                row["skipped"] = str(exc).splitlines()[0][:160]
            results.append(row)
    return results


def find_host_syncs(workload, base_model, device: torch.device, batch: int = 2, steps: int = 2) -> list[dict]:
    """Source lines of a sampling loop that make the host wait for the GPU (CUDA's sync debug mode)."""
    diffusion = workload.diffusion(steps)
    model = optimize_for_sampling(copy.deepcopy(base_model), inference_mode=True)
    x, t, kwargs = workload.inputs(batch, device)
    model(x, t, **kwargs)
    synchronize(device)
    seen = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            diffusion.p_sample_loop(model, x.shape, model_kwargs=kwargs, device=device,
                                    generator=ImageNoise(0, range(batch)), progress=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" not in str(w.message).lower():
            continue
        where = f"{os.path.relpath(w.filename, ROOT)}:{w.lineno}"
        row = seen.setdefault(where, dict(location=where, count=0, message=str(w.message).splitlines()[0][:120]))
        row["count"] += 1
    for row in seen.values():
        row["per_step"] = row["count"] / steps
    return sorted(seen.values(), key=lambda r: -r["count"])


# ---------------------------------------------------------------------------------------------
# Running a plan and recording it


class Recorder:
    """Results so far, rewritten (JSON and Markdown, atomically) after every measurement, so a
    run stopped by a time limit still leaves what it measured."""

    def __init__(self, json_path: Path | None, markdown_path: Path | None, title: str):
        self.json_path, self.markdown_path = json_path, markdown_path
        self.data = dict(title=title, started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), machine={}, peaks=[], flops={},
                         forward=[], sampling=[], breakdown=[], sdpa_kernels=[], host_syncs=None, notes=[], errors=[])

    def save(self) -> None:
        self.data["saved"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        if self.json_path:
            atomic_write_text(self.json_path, json.dumps(self.data, indent=1, default=str))
        if self.markdown_path:
            atomic_write_text(self.markdown_path, render_markdown(self.data))

    def attempt(self, what: str, fn):
        """Run one measurement; a failure is recorded as one line and the run goes on."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a benchmark reports a failed part and continues
            message = f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            print(f"FAILED {message}", file=sys.stderr, flush=True)
            self.data["errors"].append(message)
            return None
        finally:
            self.save()


class Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.monotonic() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.monotonic()


def run_forward_table(rec, workload, base, batches, variants, device, timing, deadline, allow_compile,
                      compile_needs_s=120.0):
    """Every variant at every batch size, checked and rated against the eager row of the same batch.

    On a CPU (shared with other work) the variants of a batch are timed together in rounds; on a
    GPU one after another, so that only one variant's CUDA graphs and compiled code exist at a time.
    """
    if workload.config not in rec.data["flops"]:
        rec.data["flops"][workload.config] = workload.flops_per_image()
    flops = rec.data["flops"][workload.config]
    for batch in batches:
        rows = {}
        groups = [variants] if device.type == "cpu" else [[v] for v in variants]
        baseline_out, baseline_rate = None, None
        for group in groups:
            runnable = []
            for variant in group:
                reason = variant.skip_reason(device, allow_compile)
                if reason is None and "compile" in variant.switches and deadline.left() < compile_needs_s:
                    reason = f"not enough time left for torch.compile ({deadline.left():.0f} s)"
                if reason is None and deadline.left() < 5:
                    reason = "time budget spent"
                if reason:
                    rows[variant.name] = dict(config=workload.config, batch=batch, variant=variant.name, skipped=reason)
                else:
                    runnable.append(variant)
            if not runnable:
                continue
            names = "+".join(v.name for v in runnable) if len(runnable) == 1 else f"{len(runnable)} variants"
            print(f"forward {workload.config} batch {batch}: {names}", file=sys.stderr, flush=True)
            results = rec.attempt(
                f"forward {workload.config} b{batch} {names}",
                lambda: measure_forward_group(workload, base, runnable, batch, device, flops["total"], timing),
            )
            for variant in runnable:
                rows[variant.name] = dict(config=workload.config, batch=batch, variant=variant.name,
                                          skipped="failed (see errors)")
            for entry, out in results or []:
                if entry["variant"] == "eager":
                    baseline_out, baseline_rate = out, entry["images_per_s"]
                if baseline_out is not None and entry["variant"] != "eager":
                    entry.update(compare_outputs(out, baseline_out, entry["precision"]))
                if baseline_rate:
                    entry["speedup"] = entry["images_per_s"] / baseline_rate
                # Against the matrix products timed alongside (CPU), else the run's peaks (GPU).
                fp32_peak = entry.get("window_peak", {}).get("peak_tflops") or peak_for(rec.data["peaks"], "float32")
                own_peak = peak_for(rec.data["peaks"], entry["precision"])
                entry["fp32_peak_tflops"] = fp32_peak
                entry["fraction_of_fp32_peak"] = entry["tflops"] / fp32_peak if fp32_peak else None
                entry["fraction_of_own_peak"] = entry["tflops"] / own_peak if own_peak else None
                rows[entry["variant"]] = entry
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rec.data["forward"].extend(rows[v.name] for v in variants if v.name in rows)
        rec.save()


def run_sampling_table(rec, workload, base, batch, steps, variants, device, deadline, allow_compile):
    reference, baseline_rate = None, None
    for variant in variants:
        reason = variant.skip_reason(device, allow_compile) or ("time budget spent" if deadline.left() < 10 else None)
        if reason:
            rec.data["sampling"].append(dict(config=workload.config, batch=batch, variant=variant.name, steps=steps, skipped=reason))
            continue
        print(f"sampling {workload.config} batch {batch} {variant.name}", file=sys.stderr, flush=True)
        result = rec.attempt(
            f"sampling {workload.config} b{batch} {variant.name}",
            lambda: measure_sampling(workload, base, variant, batch, steps, device, reference),
        )
        if result is None:
            continue
        entry, samples = result
        if variant.name == "eager":
            reference, baseline_rate = samples, entry["images_per_s"]
        if baseline_rate:
            entry["speedup"] = entry["images_per_s"] / baseline_rate
        rec.data["sampling"].append(entry)
        rec.save()


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def _table(header, rows) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return lines + [""]


def target_lines(data: dict) -> list[str]:
    """The issue's targets, checked against what this run measured."""
    lines = []
    forward = [r for r in data.get("forward", []) if "skipped" not in r and r.get("equal", True)]
    if "gpu" not in data.get("machine", {}):
        rows = [r for r in forward if r["config"] == "cifar10_uncond_admes" and r["batch"] == 16
                and r["precision"] == "float32" and r.get("fraction_of_fp32_peak")]
        if rows:
            best = max(rows, key=lambda r: r["tflops"])
            rates = best.get("window_peak", {}).get("tflops", {})
            for kernel, what in (("mm", "torch.mm (MKL sgemm)"), ("conv1x1", "oneDNN's 1x1-convolution GEMM")):
                if rates.get(kernel):
                    frac = best["tflops"] / rates[kernel]
                    lines.append(f"CPU, CIFAR-10 forward at batch 16, >= 85% of the float32 matmul peak, against "
                                 f"{what} timed in the same rounds: {100 * frac:.0f}% ({best['variant']}): "
                                 f"{'met' if frac >= 0.85 else 'NOT met'}.")
            if rates.get("conv3x3"):
                lines.append(f"For comparison, not a matmul: oneDNN's best 3x3 convolution timed in the same rounds "
                             f"ran at {rates['conv3x3']:.3g} TFLOP/s; the forward reached "
                             f"{100 * best['tflops'] / rates['conv3x3']:.0f}% of it.")
    else:
        for kind, rows in (("forward", forward), ("sampling", data.get("sampling", []))):
            rows = [r for r in rows if r["config"] == "imagenet64_cond" and r.get("speedup") and "skipped" not in r]
            if rows:
                best = max(rows, key=lambda r: r["speedup"])
                lines.append(f"GPU, ImageNet-64 {kind} images/s, >= 3x float32 eager: {best['speedup']:.2f}x "
                             f"({best['variant']}, batch {best['batch']}): {'met' if best['speedup'] >= 3 else 'NOT met'}.")
    for r in data.get("sampling", []):
        if "skipped" not in r:
            lines.append(f"Sampling loop overhead < 2% of network time: {100 * r['loop_overhead']:.2f}% "
                         f"({r['config']}, batch {r['batch']}, {r['variant']}): "
                         f"{'met' if r['loop_overhead'] < 0.02 else 'NOT met'}.")
    return lines


def render_markdown(data: dict) -> str:
    m = data.get("machine", {})
    out = [f"# {data['title']}", "", f"Run {data.get('started')} (saved {data.get('saved')}).", ""]
    if m:
        where = m.get("gpu") and f"{m['gpu']} ({m.get('gpu_memory_gib')} GiB, CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')})"
        out += [f"Machine: {where or m.get('cpu')}; CPU {m.get('cpu')}, {m.get('cpu_count')} cores, "
                f"torch {m.get('torch')} ({m.get('torch_threads')} threads), Python {m.get('python')}; "
                f"load average {m.get('load_average')}.", ""]
    for note in data.get("notes", []):
        out += [f"- {note}"]
    if data.get("notes"):
        out += [""]
    targets = target_lines(data)
    if targets:
        out += ["## Targets", ""] + [f"- {line}" for line in targets] + [""]
    if data.get("peaks"):
        out += ["## Matrix-multiply peak (n x n x n, best of repeats)", ""]
        rows = [("start", p["dtype"], p["n"], p["tflops"], p["tflops_median"]) for p in data["peaks"]]
        rows += [("end", p["dtype"], p["n"], p["tflops"], p["tflops_median"]) for p in data.get("peaks_end") or []]
        out += _table(["when", "dtype", "n", "TFLOP/s (best)", "TFLOP/s (median)"], rows)
    if data.get("flops"):
        out += ["## Network FLOPs per image (FlopCounterMode, 2 per multiply-add)", ""]
        out += _table(["config", "parameters (M)", "GFLOP / image", "convolution %", "attention %"],
                      [(c, f["parameters"] / 1e6, f["total"] / 1e9, 100 * f["by_op"].get("convolution", 0) / f["total"],
                        100 * f["by_op"].get("bmm", 0) / f["total"]) for c, f in data["flops"].items()])
    if data.get("forward"):
        out += ["## Network forward", "",
                "Rates from the fastest call. fp32 peak: on a CPU the best float32 matrix product timed between "
                "the same calls (load moves it), on a GPU the run's float32 matmul peak. "
                "Speed-up: images/s over the eager float32 row of the same batch. "
                "Equal: max |diff| <= 1e-4 (float32) or relative L2 error within the reduced-precision "
                "tolerance.", ""]
        rows = []
        for r in data["forward"]:
            if "skipped" in r:
                rows.append((r["config"], r["batch"], r["variant"], "skipped: " + r["skipped"], *["-"] * 10))
                continue
            rows.append((r["config"], r["batch"], r["variant"], r["seconds"] * 1e3, r["seconds_median"] * 1e3,
                         r["images_per_s"], r["tflops"], r.get("fp32_peak_tflops"),
                         None if r.get("fraction_of_fp32_peak") is None else 100 * r["fraction_of_fp32_peak"],
                         r.get("speedup"), r["memory"]["peak_mib"], r.get("max_abs_diff"), r.get("rel_l2_error"),
                         r.get("equal")))
        out += _table(["config", "batch", "variant", "ms (best)", "ms (median)", "images/s", "TFLOP/s",
                       "fp32 peak TFLOP/s", "% fp32 peak",
                       "speed-up", "peak MiB", "max abs diff", "rel L2 err", "equal"], rows)
    if data.get("sampling"):
        out += ["## Whole sampling loop (p_sample_loop, ancestral, Epsilon Scaling on)", "",
                "Loop overhead: wall time outside the network over network time. images/s @100: the rate for "
                "ADM-ES's 100 steps. Differences: final samples against the eager row's (same per-image noise).", ""]
        rows = []
        for r in data["sampling"]:
            if "skipped" in r:
                rows.append((r["config"], r["batch"], r["variant"], r["steps"], "skipped: " + r["skipped"], *["-"] * 7))
                continue
            rows.append((r["config"], r["batch"], r["variant"], r["steps"], r["seconds"], r["images_per_s_100_steps"],
                         100 * r["loop_overhead"], r.get("speedup"), r["memory"]["peak_mib"],
                         r.get("max_abs_diff_samples"), r.get("mean_abs_diff_samples"), r["eps_scale"]))
        out += _table(["config", "batch", "variant", "steps", "seconds", "images/s @100", "loop overhead %",
                       "speed-up", "peak MiB", "max abs diff", "mean abs diff", "lambda"], rows)
    for b in data.get("breakdown", []):
        out += [f"## Where the time goes: {b['config']}, batch {b['batch']}, {b['variant']}", "",
                f"Profiler self time per forward ({b['profiled_seconds'] * 1e3:.1f} ms in operators).", ""]
        out += _table(["operators", "ms", "time %", "FLOP %", "TFLOP/s"],
                      [(r["category"], r["seconds"] * 1e3, 100 * r["time_share"], 100 * r["flop_share"], r["tflops"])
                       for r in b["rows"]])
    if data.get("sdpa_kernels"):
        out += ["## Scaled-dot-product attention kernels vs the float64 math result", ""]
        out += _table(["backend", "dtype", "ms", "max abs diff", "rel L2 err", "equal", "note"],
                      [(r["backend"], r.get("dtype"), r.get("ms"), r.get("max_abs_diff"), r.get("rel_l2_error"),
                        r.get("equal"), r.get("skipped", "")) for r in data["sdpa_kernels"]])
    if data.get("host_syncs") is not None:
        out += ["## Host synchronisation inside the sampling loop (torch.cuda.set_sync_debug_mode)", ""]
        if isinstance(data["host_syncs"], str):
            out += [data["host_syncs"], ""]
        else:
            out += _table(["where", "per step", "message"],
                          [(r["location"], r["per_step"], r["message"]) for r in data["host_syncs"]])
    if data.get("script_checks"):
        out += ["## scripts/image_sample.py with the speed switches", "",
                "A tiny random-weight 64 px model, 4 ancestral steps, 12 images; differences in uint8 levels "
                "against the plain run at batch 4.", ""]
        out += _table(["variant", "batch", "seconds", "ok", "bytes equal", "max diff", "mean diff", "error"],
                      [(r["variant"], r["batch"], r["seconds"], r["ok"], r.get("bytes_equal"), r.get("max_abs_uint8_diff"),
                        r.get("mean_abs_uint8_diff"), r.get("error", "")) for r in data["script_checks"]])
    for title, key in (("Peak RSS of scripts/image_sample.py", "rss"), ("Multi-GPU (nccl)", "nccl")):
        if data.get(key):
            out += [f"## {title}", "", "```", json.dumps(data[key], indent=1), "```", ""]
    if data.get("errors"):
        out += ["## Failures", ""] + [f"- {e}" for e in data["errors"]] + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# Peak RSS of the sample script


RSS_MODEL = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16",
                 num_head_channels=32, diffusion_steps=40, noise_schedule="cosine", learn_sigma=True)


def _script_model(folder: Path) -> list[str]:
    """Save the tiny 64 px model (random weights, every layer non-zero) in ``folder``; its flags."""
    torch.manual_seed(0)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **RSS_MODEL})
    with torch.no_grad():  # ADM zero-initialises its output layers
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "model.pt")
    return [f"--{k}={v}" for k, v in RSS_MODEL.items()] + [f"--model_path={folder / 'model.pt'}"]


def _script_command(flags) -> tuple[list[str], dict]:
    """scripts/image_sample.py with ``flags``, and an environment that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return [sys.executable, str(ROOT / "scripts" / "image_sample.py"), "--progress=False", *flags], env


def sample_script_rss(counts=(64, 1024), batch_size=64) -> dict:
    """Peak RSS of scripts/image_sample.py (tiny 64 px model, two steps) at each --num_samples."""
    with tempfile.TemporaryDirectory() as tmp:
        model_flags = _script_model(Path(tmp))
        runs = []
        for n in counts:
            cmd, env = _script_command([*model_flags, "--timestep_respacing=2", f"--num_samples={n}",
                                        f"--batch_size={batch_size}", f"--output_dir={Path(tmp) / f'out{n}'}"])
            started = time.perf_counter()
            with open(Path(tmp) / f"stderr{n}.txt", "w+b") as stderr:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
                # wait4 gives this child's own resource usage, its peak RSS included.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                stderr.seek(0)
                last = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            if proc.returncode != 0:
                raise RuntimeError(f"image_sample.py --num_samples={n} failed: {last}")
            runs.append(dict(num_samples=n, peak_rss_mib=usage.ru_maxrss / 1024, seconds=time.perf_counter() - started))
    size = RSS_MODEL["image_size"]
    held = (counts[-1] - counts[0]) * size * size * 3
    return dict(model=RSS_MODEL, batch_size=batch_size, runs=runs,
                rss_difference_mib=runs[-1]["peak_rss_mib"] - runs[0]["peak_rss_mib"],
                extra_samples_uint8_mib=held / 2**20, extra_samples_float32_mib=4 * held / 2**20)


def sample_script_checks(cuda: bool, num_samples: int = 12, steps: int = 4) -> list[dict]:
    """scripts/image_sample.py end to end with the speed switches, against its plain run.

    Each row: the flags, the batch size, seconds, and how its images differ from the plain run
    at batch 4 (uint8 levels; "bytes equal" for the whole NPZ). The plain run at batch 7 checks
    that no pixel depends on the batch size on this device.
    """
    import numpy as np

    runs = [("plain", [], 4), ("plain", [], 7), ("bf16", ["--autocast_dtype=bf16"], 4)]
    if cuda:
        runs += [("cuda_graphs+channels_last+fp16", ["--cuda_graphs=True", "--channels_last=True",
                                                    "--autocast_dtype=fp16"], 4),
                 ("cuda_graphs+use_fp16", ["--cuda_graphs=True", "--use_fp16=True"], 4)]
    else:
        runs.append(("channels_last", ["--channels_last=True"], 4))
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_flags = _script_model(Path(tmp))
        for k, (name, flags, batch) in enumerate(runs):
            out = Path(tmp) / f"run{k}"
            cmd, env = _script_command([*model_flags, *flags, f"--timestep_respacing={steps}",
                                        f"--num_samples={num_samples}", f"--batch_size={batch}", f"--output_dir={out}"])
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            row = dict(variant=name, batch=batch, seconds=round(time.perf_counter() - started, 1), ok=proc.returncode == 0)
            if proc.returncode != 0:
                row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
                rows.append(row)
                continue
            npz = next(out.glob("samples_*.npz"))
            images = np.load(npz)["arr_0"].astype(np.int16)
            if reference is None:
                reference = (npz.read_bytes(), images)
            diff = np.abs(images - reference[1])
            row.update(bytes_equal=npz.read_bytes() == reference[0], max_abs_uint8_diff=int(diff.max()),
                       mean_abs_uint8_diff=float(diff.mean()))
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Subcommands


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return torch.device(name)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _strip_flags(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """``argv`` without the given flags (as ``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in names:
            skip = True
        elif not item.startswith(tuple(f"{n}=" for n in names)):
            out.append(item)
    return out


def run_processes(args, argv: list[str]) -> None:
    """The same run in ``args.processes`` processes at once, each on its share of the cores: the
    layout ``mpirun -n N`` samples with on a CPU. Each process measures its own peak in its own
    rounds; the report gathers them and adds up the machine's images/s per variant."""
    threads = args.threads or max(1, dist_util.usable_cores() // args.processes)
    child = _strip_flags(argv, ("--processes", "--threads", "--json", "--markdown"))
    with tempfile.TemporaryDirectory() as tmp:
        procs = [subprocess.Popen([sys.executable, __file__, *child, "--processes=1", f"--threads={threads}",
                                   f"--json={Path(tmp) / f'process{k}.json'}"])
                 for k in range(args.processes)]
        codes = [proc.wait() for proc in procs]
        if any(codes):
            raise RuntimeError(f"a measuring process failed (exit codes {codes}); see its output above")
        runs = [json.loads((Path(tmp) / f"process{k}.json").read_text()) for k in range(args.processes)]
    total: dict[str, float] = {}
    for run in runs:
        for row in run["forward"]:
            if "skipped" not in row:
                key = f"{row['config']} batch {row['batch']} {row['variant']}"
                total[key] = total.get(key, 0.0) + row["images_per_s"]
    lines = [f"# {args.title}: {args.processes} processes at once, {threads} thread(s) each", "",
             "## Machine throughput (images/s, all processes together)", "",
             *_table(["forward", "images/s"], sorted(total.items())), "## Targets, per process", ""]
    for k, run in enumerate(runs):
        lines += [f"- process {k}: {line}" for line in target_lines(run)]
    lines.append("")
    summary = list(lines)
    for k, run in enumerate(runs):
        lines += [render_markdown(run).replace("\n#", "\n##").replace("# ", f"## Process {k}: ", 1), ""]
    combined = dict(title=args.title, processes=args.processes, threads=threads, total_images_per_s=total, runs=runs)
    if args.json:
        atomic_write_text(args.json, json.dumps(combined, indent=1, default=str))
    if args.markdown:
        atomic_write_text(args.markdown, "\n".join(lines))
    print("\n".join(summary))


def cmd_run(args) -> None:
    if args.processes < 1:
        raise UsageError(f"--processes must be at least 1, got {args.processes}")
    if args.processes > 1:
        if _device(args.device).type != "cpu":
            raise UsageError("--processes splits a CPU's cores; on a GPU measure one process (--processes 1)")
        run_processes(args, args.argv)
        return
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    variants = parse_variants(args.variants)
    sampling_variants = parse_variants(args.sampling_variants) if args.sampling_variants else []
    workloads = [Workload.load(c) for c in args.configs.split(",")]
    rec = Recorder(args.json, args.markdown, args.title)
    rec.data["machine"] = machine_info(device)
    deadline = Deadline(args.deadline_s)
    timing = dict(min_repeats=args.repeats, min_seconds=args.min_seconds)
    rec.data["peaks"] = rec.attempt("matmul peak", lambda: measure_peaks(device)) or []
    for workload in workloads:
        base = workload.network(device)
        run_forward_table(rec, workload, base, args.batch_sizes, variants, device, timing, deadline, args.compile)
        for batch in args.sampling_batch_sizes or (args.batch_sizes[-1:] if sampling_variants else []):
            run_sampling_table(rec, workload, base, batch, args.steps, sampling_variants, device, deadline, args.compile)
        for name in filter(None, args.breakdown.split(",")):
            batch = args.breakdown_batch or args.batch_sizes[-1]
            by_op = rec.data["flops"][workload.config]["by_op"]
            result = rec.attempt(f"breakdown {workload.config} {name}",
                                 lambda: op_breakdown(workload, base, Variant.parse(name), batch, device, by_op))
            if result:
                rec.data["breakdown"].append(result)
        base = None  # free it before the next config's network
    if device.type == "cpu" and rec.data["peaks"]:
        # The CPU is shared: measure the peak again at the end to show how much it moved.
        rec.data["peaks_end"] = rec.attempt("matmul peak (end)", lambda: measure_peaks(device))
    rec.data["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    rec.save()


def cmd_rss(args) -> None:
    rec = Recorder(args.json, args.markdown, "Peak RSS of scripts/image_sample.py")
    rec.data["machine"] = machine_info(torch.device("cpu"))
    rec.data["rss"] = sample_script_rss(tuple(args.num_samples), args.batch_size)
    rec.save()
    print(json.dumps(rec.data["rss"], indent=1))


# The gpu-check preset: what one short GPU session should establish (benchmarks/gpu_check.sh).
FAST = "sdpa+inference+channels_last+autotune+graphs"
GPU_FORWARD_VARIANTS = (
    f"eager,tf32,sdpa,inference,channels_last,autotune,graphs,bf16,fp16,adm_fp16,{FAST},{FAST}+bf16,{FAST}+fp16,"
    f"{FAST}+adm_fp16"
)
GPU_SAMPLING_VARIANTS = f"eager,{FAST},{FAST}+bf16,{FAST}+fp16"
# torch.compile costs minutes per shape: once in reduced precision at the large batch of the first
# config, once in float32 (the 1e-4 check) at the small batch of the second, as time allows.
GPU_COMPILE_VARIANTS = (f"eager,{FAST}+compile+fp16", f"eager,{FAST}+compile")


def cmd_gpu_check(args) -> None:
    cuda = torch.cuda.is_available() and not args.force_cpu
    device = torch.device("cuda" if cuda else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out_dir / "gpu_results.json", out_dir / "gpu_results.md", "GPU check: sampling speed-ups")
    deadline = Deadline(args.deadline_s)
    rec.data["machine"] = machine_info(device)
    if cuda:
        # (config, [large batch, small batch], sampling steps)
        plan = [("imagenet64_cond", [128, 16], 10), ("cifar10_uncond_admes", [512, 64], 10)]
        timing = dict(min_repeats=3, min_seconds=0.3)
    else:
        rec.data["notes"].append("CUDA is not available: the GPU-only parts are skipped; this is the CPU smoke run "
                                 "of the same code with a tiny model.")
        plan = [("tiny", [4, 2], 3), ("tiny", [4, 2], 3)]
        timing = dict(min_repeats=2, min_seconds=0.0)
    rec.data["notes"].append("Float32 rows are strict float32 (TF32 off). torch.compile, as time allows: "
                             f"{GPU_COMPILE_VARIANTS[0].split(',')[1]} at the first config's large batch, "
                             f"{GPU_COMPILE_VARIANTS[1].split(',')[1]} at the second config's small batch.")
    rec.data["peaks"] = rec.attempt("matmul peak", lambda: measure_peaks(device)) or []
    shape = dict(batch=8, heads=3, tokens=1024, head_channels=64) if cuda else dict(batch=2, heads=2, tokens=64, head_channels=16)
    rec.data["sdpa_kernels"] = rec.attempt("sdpa kernels", lambda: sdpa_kernel_check(device, **shape)) or []
    variants = parse_variants(GPU_FORWARD_VARIANTS)
    sampling_variants = parse_variants(GPU_SAMPLING_VARIANTS)
    (first, first_batches, first_steps), (second, second_batches, second_steps) = plan
    first_load, second_load = Workload.load(first), Workload.load(second)

    def forward(workload, base, batches, names=None):
        chosen = parse_variants(names) if names else variants
        run_forward_table(rec, workload, base, batches, chosen, device, timing, deadline, allow_compile=cuda)

    base = first_load.network(device)
    forward(first_load, base, first_batches[:1])
    run_sampling_table(rec, first_load, base, first_batches[0], first_steps, sampling_variants, device, deadline, cuda)
    if cuda:
        rec.data["host_syncs"] = rec.attempt("host syncs", lambda: find_host_syncs(first_load, base, device))
    else:
        rec.data["host_syncs"] = "skipped: needs CUDA (torch.cuda.set_sync_debug_mode)"
    forward(first_load, base, first_batches[1:])
    by_op = rec.data["flops"][first]["by_op"]
    # Profiled without CUDA graphs: a graph replay shows no operators.
    for name in ("eager", "sdpa+inference+channels_last+autotune+fp16" if cuda else "sdpa+inference+channels_last+bf16"):
        if deadline.left() > 20:
            result = rec.attempt(f"breakdown {first} {name}", lambda: op_breakdown(
                first_load, base, Variant.parse(name), first_batches[1], device, by_op))
            if result:
                rec.data["breakdown"].append(result)
    forward(first_load, base, first_batches[:1], GPU_COMPILE_VARIANTS[0])
    base = None  # free it before the next config's network
    if cuda:
        torch.cuda.empty_cache()

    base = second_load.network(device)
    forward(second_load, base, second_batches)
    run_sampling_table(rec, second_load, base, second_batches[0], second_steps, sampling_variants, device, deadline, cuda)
    if deadline.left() > 75:  # about 12 s per script run on a GPU (start-up, CUDA context)
        rec.data["script_checks"] = rec.attempt("sample script checks", lambda: sample_script_checks(cuda))
    forward(second_load, base, second_batches[1:], GPU_COMPILE_VARIANTS[1])

    nccl = out_dir / "nccl.json"
    if nccl.exists():
        rec.data["nccl"] = json.loads(nccl.read_text())
    rec.data["machine"]["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    rec.save()


def cmd_nccl_check(args) -> None:
    """all_reduce of each rank's number over nccl; rank 0 writes what every rank saw."""
    import torch.distributed as dist

    dist_util.setup_dist()
    rank, world = dist.get_rank(), dist.get_world_size()
    device = dist_util.dev()
    value = torch.full((1024,), float(rank + 1), device=device)
    started = time.perf_counter()
    dist.all_reduce(value)
    synchronize(device)
    gathered = [None] * world
    dist.all_gather_object(gathered, dict(rank=rank, device=str(device), backend=dist.get_backend(),
                                          sum=value[0].item(), seconds=time.perf_counter() - started))
    if rank == 0:
        expected = world * (world + 1) / 2
        result = dict(world_size=world, expected_sum=expected, ranks=gathered,
                      ok=all(r["sum"] == expected for r in gathered))
        atomic_write_text(Path(args.out) / "nccl.json", json.dumps(result, indent=1))
        print(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="forward and sampling throughput of configs and variants")
    run.add_argument("--configs", default="cifar10_uncond_admes,imagenet64_cond", help="config names, or tiny")
    run.add_argument("--batch_sizes", type=_int_list, default=[1, 16])
    run.add_argument("--device", default="auto", help="cpu, cuda or auto")
    run.add_argument("--threads", type=int, default=None,
                     help="CPU threads (torch.set_num_threads); 1 per process for one process per core")
    run.add_argument("--processes", type=int, default=1,
                     help="run in this many processes at once, each on cores/N threads (mpirun's CPU layout)")
    run.add_argument("--variants", default="eager,sdpa,inference,channels_last,bf16,sdpa+inference+channels_last",
                     help="comma-separated, starting with eager")
    run.add_argument("--sampling_variants", default="", help="variants for whole-sampling runs (none if empty)")
    run.add_argument("--sampling_batch_sizes", type=_int_list, default=None, help="default: the largest batch")
    run.add_argument("--steps", type=int, default=10, help="respaced sampling steps per sampling run")
    run.add_argument("--breakdown", default="", help="variants to profile by operator category")
    run.add_argument("--breakdown_batch", type=int, default=None)
    run.add_argument("--compile", type=su.str2bool, default=True, help="measure variants with compile")
    run.add_argument("--repeats", type=int, default=3, help="timed forward calls at least")
    run.add_argument("--min_seconds", type=float, default=1.0, help="keep timing until this much has passed")
    run.add_argument("--deadline_s", type=float, default=None, help="skip what would start after this many seconds")
    run.add_argument("--json", type=Path, default=None)
    run.add_argument("--markdown", type=Path, default=None)
    run.add_argument("--title", default="Sampling speed")
    run.set_defaults(fn=cmd_run)

    rss = sub.add_parser("rss", help="peak RSS of scripts/image_sample.py at two --num_samples")
    rss.add_argument("--num_samples", type=_int_list, default=[64, 1024])
    rss.add_argument("--batch_size", type=int, default=64)
    rss.add_argument("--json", type=Path, default=None)
    rss.add_argument("--markdown", type=Path, default=None)
    rss.set_defaults(fn=cmd_rss)

    gpu = sub.add_parser("gpu-check", help="the preset of benchmarks/gpu_check.sh")
    gpu.add_argument("--out", required=True, help="folder for gpu_results.md and gpu_results.json")
    gpu.add_argument("--deadline_s", type=float, default=290.0)
    gpu.add_argument("--force_cpu", action="store_true", help="run the CPU smoke path even where CUDA exists")
    gpu.set_defaults(fn=cmd_gpu_check)

    nccl = sub.add_parser("nccl-check", help="all_reduce across torchrun ranks")
    nccl.add_argument("--out", required=True)
    nccl.set_defaults(fn=cmd_nccl_check)

    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args.fn(args)
    except (ValueError, FileNotFoundError, RuntimeError, UsageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli_main(main)

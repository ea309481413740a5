"""The measuring: workloads (a config's network with random weights, its inputs, its diffusion), FLOP
counts, timed calls, peak memory, the machine's matrix-multiply peak, forward and whole-sampling
throughput, per-operator breakdowns, the attention kernels and host synchronisations."""

from __future__ import annotations

import copy
import os
import platform
import resource
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from guided_diffusion import script_util as su
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.configs import load_config
from guided_diffusion.run.speed import attention_backend, optimize_for_sampling
from benchmarks.variants import backend_flags, build_variant, compare_outputs

ROOT = Path(__file__).resolve().parents[1]


# A small class-conditional model for smoke runs (every block type, attention included).
TINY_FLAGS = dict(
    image_size=16, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="8",
    num_head_channels=16, class_cond=True, num_classes=10, learn_sigma=True, use_scale_shift_norm=True,
    resblock_updown=True, use_new_attention_order=True, noise_schedule="cosine", diffusion_steps=1000,
)


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
        config = load_config(name)
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

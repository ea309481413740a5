"""Sampling speed of ADM's networks: forward and whole-sampling throughput, FLOPs, peak memory,
and what each switch of guided_diffusion/run/speed.py buys, all in one run.

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
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# Measure the checkout this file belongs to, whichever copy of the package is installed.
sys.path.insert(0, str(ROOT))

from adm_common.cli import cli_main  # noqa: E402
from adm_common.errors import UsageError  # noqa: E402
from adm_common.files import atomic_write_text  # noqa: E402
from guided_diffusion import dist_util  # noqa: E402
from guided_diffusion import script_util as su  # noqa: E402
from benchmarks.measure import (  # noqa: E402
    Workload,
    find_host_syncs,
    machine_info,
    measure_peaks,
    op_breakdown,
    sdpa_kernel_check,
    synchronize,
)
from benchmarks.recording import Deadline, Recorder, run_forward_table, run_sampling_table  # noqa: E402
from benchmarks.report import markdown_table, render_markdown, target_lines  # noqa: E402
from benchmarks.script_runs import sample_script_checks, sample_script_rss  # noqa: E402
from benchmarks.variants import Variant, parse_variants  # noqa: E402


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
             *markdown_table(["forward", "images/s"], sorted(total.items())), "## Targets, per process", ""]
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

"""The Markdown report of a run, and the targets checked against what it measured."""

from __future__ import annotations

import json


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


def markdown_table(header, rows) -> list[str]:
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
        out += markdown_table(["when", "dtype", "n", "TFLOP/s (best)", "TFLOP/s (median)"], rows)
    if data.get("flops"):
        out += ["## Network FLOPs per image (FlopCounterMode, 2 per multiply-add)", ""]
        out += markdown_table(["config", "parameters (M)", "GFLOP / image", "convolution %", "attention %"],
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
        out += markdown_table(["config", "batch", "variant", "ms (best)", "ms (median)", "images/s", "TFLOP/s",
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
        out += markdown_table(["config", "batch", "variant", "steps", "seconds", "images/s @100", "loop overhead %",
                       "speed-up", "peak MiB", "max abs diff", "mean abs diff", "lambda"], rows)
    for b in data.get("breakdown", []):
        out += [f"## Where the time goes: {b['config']}, batch {b['batch']}, {b['variant']}", "",
                f"Profiler self time per forward ({b['profiled_seconds'] * 1e3:.1f} ms in operators).", ""]
        out += markdown_table(["operators", "ms", "time %", "FLOP %", "TFLOP/s"],
                      [(r["category"], r["seconds"] * 1e3, 100 * r["time_share"], 100 * r["flop_share"], r["tflops"])
                       for r in b["rows"]])
    if data.get("sdpa_kernels"):
        out += ["## Scaled-dot-product attention kernels vs the float64 math result", ""]
        out += markdown_table(["backend", "dtype", "ms", "max abs diff", "rel L2 err", "equal", "note"],
                      [(r["backend"], r.get("dtype"), r.get("ms"), r.get("max_abs_diff"), r.get("rel_l2_error"),
                        r.get("equal"), r.get("skipped", "")) for r in data["sdpa_kernels"]])
    if data.get("host_syncs") is not None:
        out += ["## Host synchronisation inside the sampling loop (torch.cuda.set_sync_debug_mode)", ""]
        if isinstance(data["host_syncs"], str):
            out += [data["host_syncs"], ""]
        else:
            out += markdown_table(["where", "per step", "message"],
                          [(r["location"], r["per_step"], r["message"]) for r in data["host_syncs"]])
    if data.get("script_checks"):
        out += ["## scripts/image_sample.py with the speed switches", "",
                "A tiny random-weight 64 px model, 4 ancestral steps, 12 images; differences in uint8 levels "
                "against the plain run at batch 4.", ""]
        out += markdown_table(["variant", "batch", "seconds", "ok", "bytes equal", "max diff", "mean diff", "error"],
                      [(r["variant"], r["batch"], r["seconds"], r["ok"], r.get("bytes_equal"), r.get("max_abs_uint8_diff"),
                        r.get("mean_abs_uint8_diff"), r.get("error", "")) for r in data["script_checks"]])
    for title, key in (("Peak RSS of scripts/image_sample.py", "rss"), ("Multi-GPU (nccl)", "nccl")):
        if data.get(key):
            out += [f"## {title}", "", "```", json.dumps(data[key], indent=1), "```", ""]
    if data.get("errors"):
        out += ["## Failures", ""] + [f"- {e}" for e in data["errors"]] + [""]
    return "\n".join(out)

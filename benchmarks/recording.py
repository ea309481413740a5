"""Running a plan of measurements and recording it as it goes (JSON and Markdown after each one)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from adm_common.files import atomic_write_text
from benchmarks.measure import measure_forward_group, measure_sampling, peak_for
from benchmarks.report import render_markdown
from benchmarks.variants import compare_outputs


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

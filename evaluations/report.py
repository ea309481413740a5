"""The evaluator's results: a table for people and a JSON file for machines.

One sample file gives ADM's record (``metrics``, ``reference``, ``sample``); several give each
file's record in ``samples`` and the spread over them in ``summary`` (evaluations/seed_sets.py).
"""

from __future__ import annotations

import json

from adm_common.files import atomic_write_text

METRIC_NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}
SUMMARY_COLUMNS = ("mean", "std", "min", "max")


def format_table(result: dict) -> str:
    samples = result.get("samples")
    lines = _metric_rows(result) if samples is None else _seed_set_rows(result)
    lines.append("")
    lines.append(f"{'batch':<11}{'images':>8}  {'size':<9}{'statistics':<12}sha256")
    sides = [("reference", result["reference"])]
    sides += [("sample", result["sample"])] if samples is None else [
        (f"sample {i}", info) for i, info in enumerate(samples, 1)
    ]
    for side, info in sides:
        size = "x".join(str(v) for v in info["image_size"])
        lines.append(f"{side:<11}{info['num_images']:>8}  {size:<9}{info['statistics']:<12}{info['sha256']}")
    graph = result["inception"]
    lines.append(f"inception graph sha256 {graph['sha256']} ({graph['backend']} backend)")
    dtype = result.get("distance_dtype", "float16")
    lines.append(f"precision/recall distances in {dtype}" + (" (ADM's)" if dtype == "float16" else " (not ADM's)"))
    bootstrap = (result if samples is None else samples[0]).get("fid_bootstrap")
    if bootstrap:
        low, high = bootstrap["percentiles"]
        lines.append(f"FID interval: the {low} and {high} percentiles of {bootstrap['resamples']} bootstrap "
                     f"resamples of the sample activations (seed {bootstrap['seed']})")
    return "\n".join(lines)


def _metric_rows(result: dict) -> list[str]:
    lines = [f"{'metric':<17}{'value':>12}"]
    lines += [f"{METRIC_NAMES[key]:<17}{value:>12.4f}" for key, value in result["metrics"].items()]
    if "fid_bootstrap" in result:
        interval = result["fid_bootstrap"]
        lines.append(f"{'FID interval':<17}{interval['low']:>12.4f}{interval['high']:>12.4f}")
    return lines


def _seed_set_rows(result: dict) -> list[str]:
    """A column per sample file, then the mean, std (n - 1), min and max over the files."""
    samples, summary = result["samples"], result["summary"]
    header = [f"sample {i}" for i in range(1, len(samples) + 1)] + list(SUMMARY_COLUMNS)
    lines = [f"{'metric':<17}" + "".join(f"{name:>12}" for name in header)]
    for key, spread in summary.items():
        values = [info["metrics"][key] for info in samples] + [spread[column] for column in SUMMARY_COLUMNS]
        lines.append(f"{METRIC_NAMES[key]:<17}" + "".join(f"{value:>12.4f}" for value in values))
    if "fid_bootstrap" in samples[0]:
        for end, percentile in zip(("low", "high"), samples[0]["fid_bootstrap"]["percentiles"]):
            name = f"FID {percentile}%"
            lines.append(f"{name:<17}" + "".join(f"{info['fid_bootstrap'][end]:>12.4f}" for info in samples))
    lines.append(f"std over the {len(samples)} sample files with n - 1")
    return lines


def write_json(result: dict, path) -> None:
    """Write the results all or nothing; a failure (a full disk) says that they were printed."""
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(path, text, "the JSON results", "the numbers printed above were not saved")

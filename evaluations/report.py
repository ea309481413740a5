"""The evaluator's results: a table for people and a JSON file for machines."""

from __future__ import annotations

import json

from evaluations.files import atomic_write_text

METRIC_NAMES = {
    "inception_score": "Inception Score",
    "fid": "FID",
    "sfid": "sFID",
    "precision": "Precision",
    "recall": "Recall",
}


def format_table(result: dict) -> str:
    lines = [f"{'metric':<17}{'value':>12}"]
    lines += [f"{METRIC_NAMES[key]:<17}{value:>12.4f}" for key, value in result["metrics"].items()]
    lines.append("")
    lines.append(f"{'batch':<11}{'images':>8}  {'size':<9}{'statistics':<12}sha256")
    for side in ("reference", "sample"):
        info = result[side]
        size = "x".join(str(v) for v in info["image_size"])
        lines.append(f"{side:<11}{info['num_images']:>8}  {size:<9}{info['statistics']:<12}{info['sha256']}")
    graph = result["inception"]
    lines.append(f"inception graph sha256 {graph['sha256']} ({graph['backend']} backend)")
    dtype = result.get("distance_dtype", "float16")
    lines.append(f"precision/recall distances in {dtype}" + (" (ADM's)" if dtype == "float16" else " (not ADM's)"))
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    """Write the results all or nothing; a failure (a full disk) says that they were printed."""
    text = json.dumps(result, indent=2) + "\n"
    atomic_write_text(path, text, "the JSON results", "the numbers printed above were not saved")

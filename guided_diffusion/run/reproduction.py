"""Why does my FID differ from the paper's? Compare a sample file's sidecar with a published cell.

A config's ``protocol`` block records how the paper made and scored each published cell (sampler,
steps, image count, labels, quantization, reference batch, evaluator, seed sets); lambda and the
FIDs are the config's own ``eps_scale`` and ``paper_fid`` at the cell. ``check`` compares every
one of those settings, plus the checkpoint's sha256 and the model and diffusion flags, with what
the sidecar (and the evaluator's JSON) says the run did, one row per setting.

A row is ``match`` or ``DIFFERS``; ``missing`` when the sidecar lacks the setting (that fails
too: nothing shows the run followed the paper); ``not recorded`` when the paper's value is not
known (reported, never a failure); ``not checked`` for the scoring rows without ``--eval``.
Exit status: 0 when no row differs or is missing, 1 otherwise, 2 for a user error.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from adm_common.errors import UsageError
from adm_common.files import atomic_write_text, read_json_object

MATCH, DIFFERS, MISSING, NOT_RECORDED, NOT_CHECKED = "match", "DIFFERS", "missing", "not recorded", "not checked"
FAILING = (DIFFERS, MISSING)
_ABSENT = object()  # a setting the sidecar does not hold

# Flags that cannot change a sample: dropout is off in eval mode, use_checkpoint only saves memory
# in training, use_kl and rescale_learned_sigmas only change the training loss; use_fp16 is the
# network's precision (rounding, not another model), and CPUs ignore it.
INERT_FLAGS = frozenset({"dropout", "use_checkpoint", "use_kl", "rescale_learned_sigmas", "use_fp16"})
# Set by the steps row (timestep_respacing) and the labels row (num_classes).
DIFFUSION_FLAGS = ("diffusion_steps", "noise_schedule", "learn_sigma", "predict_xstart", "rescale_timesteps")

EFFECTS = {
    "checkpoint": "another file is another model: the paper's FIDs belong to this checkpoint only",
    "model flags": "a checkpoint also loads under wrong head or attention-order flags (the tensor "
                   "shapes agree) and then computes another function",
    "diffusion flags": "another schedule, variance or timestep scaling samples another chain from the "
                       "same network; far-off values give noise-like images",
    "sampler": "another sampler gives another FID at the same number of steps",
    "classifier scale": "FID moves with the guidance scale (ADM's paper sweeps it)",
    "clip_denoised": "clipping x0 to [-1, 1] at every step changes the samples and FID",
    "images": "FID is biased upward with fewer images (the bias falls roughly as 1/N, Chong & Forsyth "
              "2020); EDM's fid.py refuses fewer than 50,000",
    "labels": "a conditional model's FID depends on the class distribution of its samples",
    "quantization": "ADM floors (x + 1) * 127.5, EDM rounds: about half of the pixels differ by one level",
    "image size": "another resolution is another benchmark",
    "seed sets": "one FID of 50,000 images varies with the seeds; the minimum over several sets is on "
                 "average below a single set's FID",
    "reference batch": "FID is measured against this batch; another batch (a VIRTUAL batch instead of "
                       "the training set, another subset) gives another number",
    "evaluator": "another FID implementation or Inception graph gives other numbers; this project's "
                 "tf and torch backends are held to ADM's printed numbers within 1e-3",
}


@dataclass
class Row:
    setting: str
    run: str
    paper: str
    status: str
    effect: str


@dataclass
class Cell:
    key: str
    variant: str  # "baseline" (lambda 1) or "es"
    spec: dict
    note: str = ""


def read_sidecar(path) -> tuple[dict, Path]:
    """The settings a sampling script recorded for ``path``: ``SAMPLES.json`` beside an NPZ, the JSON
    itself, or the ``edm_sample.json`` of EDM's PNG folder."""
    path = Path(path)
    if path.is_dir():
        sidecar = path / "edm_sample.json"
    elif path.suffix == ".json":
        sidecar = path
    else:
        sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise UsageError(f"{sidecar} does not exist: the sampling scripts write it beside the samples; "
                         "give the NPZ (or the folder) they wrote")
    record = read_json_object(sidecar, "sidecar")
    if "run_identity" not in record:
        raise UsageError(f"{sidecar} is not a sidecar of this project's sampling scripts (it has no run_identity)")
    if record.get("complete") is False:
        raise UsageError(f"{sidecar} belongs to an unfinished run; rerun the same sampling command to finish it")
    return record, sidecar


def load_protocol_config(name_or_path) -> dict:
    from guided_diffusion.run.configs import CONFIG_DIR, load_config

    config = load_config(name_or_path)
    if not isinstance(config.get("protocol"), dict):
        known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if "\nprotocol:" in p.read_text(encoding="utf-8"))
        raise UsageError(f"config {config.get('name', name_or_path)} records no published protocol; "
                         f"configs with one: {', '.join(known)}")
    return config


def is_edm(sidecar: dict) -> bool:
    return sidecar.get("sampler") == "karras"


def run_steps(sidecar: dict):
    """Sampling steps of the run: EDM's noise levels, or the respaced chain's length."""
    if is_edm(sidecar):
        return sidecar.get("num_steps", _ABSENT)
    if "timestep_respacing" not in sidecar or "diffusion_steps" not in sidecar:
        return _ABSENT
    from guided_diffusion.respace import space_timesteps

    spacing = sidecar["timestep_respacing"]
    return len(space_timesteps(sidecar["diffusion_steps"], spacing)) if spacing else sidecar["diffusion_steps"]


def run_eps_scale(sidecar: dict):
    from guided_diffusion.eps_scaling import parse_eps_scale

    return parse_eps_scale(sidecar["eps_scale"]) if "eps_scale" in sidecar else _ABSENT


def pick_cell(config: dict, sidecar: dict, requested: str | None = None) -> Cell:
    """The published cell the run aims at: its step count (EDM: solver and steps) and whether ES is on."""
    protocol = config["protocol"]
    cells = {str(k): v for k, v in protocol["cells"].items()}
    schedule, steps = run_eps_scale(sidecar), run_steps(sidecar)
    es = schedule is not _ABSENT and not schedule.is_identity
    if requested is not None:
        if requested not in cells:
            raise UsageError(f"--cell {requested}: {config['name']} has the cells {', '.join(cells)}")
        key, note = requested, ""
    else:
        if is_edm(sidecar):
            key = f"{sidecar.get('solver')}_{steps}"
        else:
            key = f"{steps}_linear" if es and schedule.table is None and schedule.k != 0 else str(steps)
        note = ""
        if key not in cells:
            fallback = str(protocol["default_cell"])
            note = (f"the paper has no cell {key}; compared with cell {fallback} (--cell KEY picks another: "
                    f"{', '.join(cells)})")
            key = fallback
    variants = [v for v in ("baseline", "es") if _paper_fid(config, key, cells[key], v) is not None]
    variant = "es" if es else "baseline"
    if variant not in variants:
        variant = variants[0]
    return Cell(key, variant, {**_common(protocol), **cells[key]}, note)


def _common(protocol: dict) -> dict:
    return {k: v for k, v in protocol.items() if k not in ("cells", "default_cell", "source")}


def _paper_fid(config: dict, key: str, cell: dict, variant: str):
    table = (config.get("paper_fid") or {}).get(variant) or {}
    if "solver" in cell:
        table = table.get(cell["solver"]) or {}
        key = cell["steps"]
    return table.get(key, table.get(int(key)) if str(key).isdigit() else None)


def paper_eps_scale(config: dict, cell: Cell):
    from guided_diffusion.eps_scaling import parse_eps_scale

    if cell.variant == "baseline":
        return parse_eps_scale(None)
    table = (config.get("eps_scale") or {})[cell.spec.get("eps_scale") or cell.spec["solver"]]
    steps = cell.spec["steps"]
    return parse_eps_scale(table.get(steps, table.get(str(steps))))


# --- the rows ------------------------------------------------------------------------------------

def _show(value) -> str:
    if value is _ABSENT:
        return "not in the sidecar"
    if value is None:
        return "none"
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return repr(value)
    return str(value)


def _compare(setting: str, run, paper, effect: str = "", run_text=None, paper_text=None) -> Row:
    """One row: ``paper`` None is not recorded; ``run`` _ABSENT is missing."""
    if run is _ABSENT:
        status = MISSING
    elif paper is None:
        status = NOT_RECORDED
    else:
        status = MATCH if run == paper else DIFFERS
    return Row(setting, run_text if run_text is not None else _show(run),
               paper_text if paper_text is not None else ("not recorded" if paper is None else _show(paper)),
               status, effect or EFFECTS.get(setting, "changes FID"))


def _flag_row(setting: str, sidecar: dict, expected: dict) -> Row:
    """Every flag of ``expected`` against the sidecar; the row lists the ones that differ or are absent."""
    absent = sorted(k for k in expected if k not in sidecar)
    wrong = sorted(k for k in expected if k in sidecar and not _same(sidecar[k], expected[k]))
    if absent:
        status, run = MISSING, "not in the sidecar: " + ", ".join(absent)
    elif wrong:
        status, run = DIFFERS, ", ".join(f"{k}={_show(sidecar[k])}" for k in wrong)
    else:
        status, run = MATCH, f"all {len(expected)} as the paper's"
    paper = ", ".join(f"{k}={_show(expected[k])}" for k in (wrong or absent)) or ", ".join(sorted(expected))
    return Row(setting, run, paper, status, EFFECTS[setting])


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def model_flags(config: dict, sidecar: dict) -> dict:
    """The config's network flags that change what a loaded checkpoint computes."""
    from guided_diffusion.script_util import diffusion_defaults

    flags = config["flags"]
    skip = set(INERT_FLAGS) | set(diffusion_defaults()) | {"num_classes", "image_size"}
    if flags.get("num_head_channels", -1) != -1:
        skip.add("num_heads")  # the head count is channels / num_head_channels
    return {k: v for k, v in flags.items() if k not in skip}


def _steps_row(config: dict, cell: Cell, sidecar: dict) -> Row:
    baseline = (config.get("paper_fid") or {}).get("baseline") or {}
    if "solver" in cell.spec:
        run = sidecar.get("num_steps", _ABSENT)
        nfe = sidecar.get("network_evaluations")
        table = baseline.get(cell.spec["solver"]) or {}
        effect = f"the paper's {cell.spec['solver']} baseline FID by steps: " + _by_steps(table)
        return _compare("steps", run, cell.spec["steps"], effect,
                        run_text=None if run is _ABSENT else f"{run} ({nfe} network evaluations)",
                        paper_text=f"{cell.spec['steps']} ({cell.spec.get('network_evaluations')} network evaluations)")
    run = sidecar.get("timestep_respacing", _ABSENT)
    effect = "the paper's baseline FID by steps: " + _by_steps({k: v for k, v in baseline.items() if str(k).isdigit()})
    steps = run_steps(sidecar)
    text = None if run is _ABSENT else f"{steps} (--timestep_respacing {run!r})"
    return _compare("steps", run, cell.spec["timestep_respacing"], effect, run_text=text,
                    paper_text=f"{cell.spec['steps']} (--timestep_respacing {cell.spec['timestep_respacing']!r})")


def _by_steps(table: dict) -> str:
    keys = sorted(table, key=lambda k: -int(k))
    return " / ".join(str(k) for k in keys) + ": " + " / ".join(f"{table[k]:g}" for k in keys) if keys else "none"


def _lambda_row(config: dict, cell: Cell, sidecar: dict) -> Row:
    run, paper = run_eps_scale(sidecar), paper_eps_scale(config, cell)
    fids = {v: _paper_fid(config, cell.key, cell.spec, v) for v in ("baseline", "es")}
    es_lambda = None if fids["es"] is None else paper_eps_scale(config, Cell(cell.key, "es", cell.spec))
    parts = [f"FID {fids['baseline']:g} with lambda 1"] if fids["baseline"] is not None else []
    if es_lambda is not None:
        parts.append(f"{fids['es']:g} with {es_lambda}")
    effect = f"the paper at cell {cell.key}: " + ", ".join(parts)
    source = sidecar.get("eps_scale_source")
    text = None if run is _ABSENT else f"{run}" + (f" [{source}]" if source else "")
    name = "the paper's ES lambda" if cell.variant == "es" else "baseline, no scaling"
    return _compare("lambda", run, paper, effect, run_text=text, paper_text=f"{paper} ({name})")


def _labels(sidecar: dict):
    """(labels kind, number of classes) the run drew: ADM and EDM draw each image's class uniformly."""
    if is_edm(sidecar):
        if sidecar.get("network"):
            classes = (sidecar.get("network_config") or {}).get("init_kwargs", {}).get("label_dim", _ABSENT)
        else:
            classes = sidecar.get("num_classes", _ABSENT) if sidecar.get("class_cond") else 0
    elif "class_cond" not in sidecar:
        return _ABSENT
    else:
        guided = "classifier_sha256" in sidecar
        classes = sidecar.get("num_classes", _ABSENT) if sidecar["class_cond"] or guided else 0
    if classes is _ABSENT:
        return _ABSENT
    if not classes:
        return ("none", 0)
    if sidecar.get("class_idx") is not None:
        return (f"class {sidecar['class_idx']} only", classes)
    return ("uniform", classes)


def _labels_text(labels) -> str:
    kind, classes = labels
    return "none (unconditional)" if kind == "none" else f"{kind} over {classes} classes"


def _run_quantization(sidecar: dict):
    # ADM's scripts always floor (run.output.quantize) and record no choice; EDM's records it.
    return sidecar.get("quantization", _ABSENT if is_edm(sidecar) else "adm")


def _run_sampler(sidecar: dict):
    if is_edm(sidecar):
        return f"edm {sidecar['solver']}" if "solver" in sidecar else _ABSENT
    if "use_ddim" not in sidecar:
        return _ABSENT
    sampler = "ddim" if sidecar["use_ddim"] else "ancestral"
    if sidecar.get("do_time_shift"):  # a Time-Shift run is another sampler than any ES cell's
        rule = sidecar.get("time_shift_rule", "paper")
        sampler += f" + time shift (window {sidecar.get('window')}, cutoff {sidecar.get('cutoff')}, {rule})"
    return sampler


def _seed_identity(sidecar: dict) -> str:
    return f"seeds {sidecar['seeds']}" if sidecar.get("seeds") else f"seed {sidecar.get('seed')}"


def sidecar_rows(config: dict, cell: Cell, sidecar: dict) -> list[Row]:
    """The rows that the sidecar alone decides."""
    spec = cell.spec
    rows = []
    checkpoint = sidecar.get("network_sha256", sidecar.get("model_sha256", _ABSENT))
    rows.append(_compare("checkpoint", checkpoint, spec.get("checkpoint_sha256"),
                         run_text=None if checkpoint is _ABSENT else f"sha256 {checkpoint}",
                         paper_text=f"sha256 {spec['checkpoint_sha256']}" if spec.get("checkpoint_sha256") else None))
    if "diffusion_flags" in spec:  # EDM: the network file carries its own flags; these are the sampler's
        rows.append(_flag_row("diffusion flags", sidecar, spec["diffusion_flags"]))
    else:
        rows.append(_flag_row("model flags", sidecar, model_flags(config, sidecar)))
        rows.append(_flag_row("diffusion flags", sidecar,
                              {k: config["flags"][k] for k in DIFFUSION_FLAGS if k in config["flags"]}))
    rows.append(_compare("sampler", _run_sampler(sidecar), spec["sampler"]))
    rows.append(_steps_row(config, cell, sidecar))
    rows.append(_lambda_row(config, cell, sidecar))
    if "clip_denoised" in spec:  # ADM's samplers
        scale = sidecar.get("classifier_scale", _ABSENT) if "classifier_sha256" in sidecar else None
        paper_scale = config.get("classifier_scale")
        rows.append(Row("classifier scale", "none (unguided)" if scale is None else _show(scale),
                        "none (unguided)" if paper_scale is None else _show(paper_scale),
                        MISSING if scale is _ABSENT else MATCH if _same_scale(scale, paper_scale) else DIFFERS,
                        EFFECTS["classifier scale"]))
        rows.append(_compare("clip_denoised", sidecar.get("clip_denoised", _ABSENT), spec["clip_denoised"]))
    rows.append(_compare("images", sidecar.get("num_samples", _ABSENT), spec["num_samples"]))
    labels = _labels(sidecar)
    paper_labels = ("none", 0) if spec["labels"] == "none" else (spec["labels"], spec["num_classes"])
    rows.append(_compare("labels", labels, paper_labels,
                         run_text=None if labels is _ABSENT else _labels_text(labels),
                         paper_text=_labels_text(paper_labels)))
    rows.append(_compare("quantization", _run_quantization(sidecar), spec["quantization"],
                         paper_text={"adm": "adm (floor)", "edm": "edm (round)"}.get(spec["quantization"])))
    shape = sidecar.get("image_shape", _ABSENT)
    size = config["flags"].get("image_size", config["flags"].get("large_size"))
    rows.append(_compare("image size", _ABSENT if shape is _ABSENT else tuple(shape[:2]), (size, size),
                         run_text=None if shape is _ABSENT else "x".join(map(str, shape[:2])),
                         paper_text=f"{size}x{size}"))
    return rows


def _same_scale(run, paper) -> bool:
    if run is None or paper is None:
        return run is None and paper is None
    return float(run) == float(paper)


def seed_row(cell: Cell, sidecars: list[dict]) -> Row:
    sets = [_seed_identity(s) for s in sidecars]
    wanted, how = cell.spec["seed_sets"], cell.spec["aggregate"]
    distinct = len(set(sets)) == len(sets)
    status = MATCH if distinct and len(sets) == wanted else DIFFERS
    run = f"{len(sets)} ({', '.join(sets)})" + ("" if distinct else "; the same seeds twice")
    paper = f"{wanted}" + (f", {how} FID" if wanted > 1 else f" set of {cell.spec['num_samples']} images")
    return Row("seed sets", run, paper, status, EFFECTS["seed sets"])


def evaluation_rows(cell: Cell, evaluation: dict | None) -> list[Row]:
    spec = cell.spec
    ref, tool = spec["reference_batch"], spec["evaluator"]
    ref_text = ref.get("file") or ref.get("description") or "not recorded"
    if ref.get("sha256"):
        ref_text += f" (sha256 {ref['sha256']})"
    tool_text = f"{tool['backend']} backend" + (f", graph sha256 {tool['inception_sha256']}"
                                               if tool.get("inception_sha256") else "")
    if tool.get("description"):
        tool_text += f" ({tool['description']})"
    if evaluation is None:
        return [Row("reference batch", "not given (--eval)", ref_text, NOT_CHECKED, EFFECTS["reference batch"]),
                Row("evaluator", "not given (--eval)", tool_text, NOT_CHECKED, EFFECTS["evaluator"])]
    batch = evaluation.get("reference") or {}
    run_ref = (Path(batch["path"]).name, batch.get("sha256")) if "path" in batch else _ABSENT
    paper_ref = None if not (ref.get("file") or ref.get("sha256")) else (ref.get("file"), ref.get("sha256"))
    run_ref_cmp = run_ref if run_ref is _ABSENT or paper_ref is None else (
        run_ref[0] if paper_ref[0] else None, run_ref[1] if paper_ref[1] else None)
    rows = [_compare("reference batch", run_ref_cmp, paper_ref,
                     run_text=None if run_ref is _ABSENT else f"{run_ref[0]} (sha256 {run_ref[1]})",
                     paper_text=ref_text)]
    graph = evaluation.get("inception") or {}
    run_tool = (graph["backend"], graph.get("sha256")) if "backend" in graph else _ABSENT
    paper_tool = (tool["backend"], tool.get("inception_sha256"))
    run_tool_cmp = run_tool if run_tool is _ABSENT else (run_tool[0], run_tool[1] if paper_tool[1] else None)
    versions = evaluation.get("versions")
    text = None if run_tool is _ABSENT else (f"{run_tool[0]} backend, graph sha256 {run_tool[1]}"
                                             + (f", {_versions_text(versions)}" if versions else ""))
    rows.append(_compare("evaluator", run_tool_cmp, paper_tool, run_text=text, paper_text=tool_text))
    return rows


def _versions_text(versions) -> str:
    if isinstance(versions, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
    return str(versions)


def _merge(rows_per_file: list[list[Row]]) -> list[Row]:
    """One row per setting over several seed sets' sidecars: equal, or DIFFERS with each file's value."""
    merged = []
    for rows in zip(*rows_per_file):
        first = rows[0]
        if all(r.run == first.run and r.status == first.status for r in rows[1:]):
            merged.append(first)
        else:
            worst = next((r.status for r in rows if r.status in FAILING), DIFFERS)
            merged.append(Row(first.setting, "files differ: " + " | ".join(r.run for r in rows), first.paper,
                              DIFFERS if worst == MATCH else worst, first.effect))
    return merged


def evaluated_samples(evaluation: dict) -> list[dict]:
    """The sample files an evaluator JSON scored: ``sample``, or ``samples`` for several seed sets."""
    samples = evaluation.get("samples", [evaluation["sample"]] if "sample" in evaluation else [])
    return [s for s in samples if isinstance(s, dict)]


def check(sample_paths, config_name: str | None = None, eval_path=None, cell_key: str | None = None) -> dict:
    """The comparison as a dict: config, cell, variant, note, rows, exit_status."""
    sidecars = [read_sidecar(p) for p in sample_paths]
    records = [record for record, _ in sidecars]
    if config_name is None:
        config_name = records[0].get("config")
        if not config_name:
            raise UsageError(f"{sidecars[0][1]} records no --config; pass --config NAME (the paper's checkpoint config)")
    config = load_protocol_config(config_name)
    cell = pick_cell(config, records[0], cell_key)
    evaluation = None
    if eval_path is not None:
        evaluation = read_json_object(Path(eval_path), "evaluator JSON")
        scored = {s.get("sha256") for s in evaluated_samples(evaluation)}
        ours = {r.get("npz_sha256") for r in records}
        if not scored:
            raise UsageError(f"{eval_path} names no sample file; give the JSON that evaluations/evaluator.py wrote")
        if not ours & scored:
            raise UsageError(f"{eval_path} scored other samples (sha256 {', '.join(sorted(map(str, scored)))}) than "
                             f"{', '.join(str(p) for _, p in sidecars)} record; give the evaluator JSON of these samples")
    rows = _merge([sidecar_rows(config, cell, r) for r in records])
    rows.append(seed_row(cell, records))
    rows += evaluation_rows(cell, evaluation)
    failed = any(r.status in FAILING for r in rows)
    return {
        "config": config["name"], "cell": cell.key, "variant": cell.variant, "note": cell.note,
        "paper_fid": _paper_fid(config, cell.key, cell.spec, cell.variant),
        "rows": [asdict(r) for r in rows], "exit_status": 1 if failed else 0,
    }


def format_report(report: dict) -> str:
    """The plain table: one row per setting; a value wider than its column pushes the rest of its line."""
    rows = report["rows"]
    head = ("setting", "this run", "the paper's protocol", "status", "known effect")
    table = [head] + [(r["setting"], r["run"], r["paper"], r["status"], r["effect"]) for r in rows]
    widths = [min(max(len(row[i]) for row in table), 44) for i in range(4)]
    lines = [f"{report['config']}, cell {report['cell']} ({report['variant']}; the paper's FID: {report['paper_fid']})"]
    if report["note"]:
        lines.append("note: " + report["note"])
    for row in table:
        lines.append("  ".join(text.ljust(w) for text, w in zip(row[:4], widths)) + "  " + row[4])
    failing = [r["setting"] for r in rows if r["status"] in FAILING]
    lines.append("every compared setting matches the paper's protocol" if not failing
                 else "differs from the paper's protocol: " + ", ".join(failing))
    return "\n".join(lines)


def main(argv=None) -> int:
    """scripts/check_reproduction.py (through adm_common.cli.cli_main): print the table, return 0 or 1."""
    parser = argparse.ArgumentParser(
        prog="check_reproduction.py",
        description="Compare the settings that made a sample file with the protocol of the paper's cell.")
    parser.add_argument("samples", nargs="+",
                        help="the sample NPZ (its .json sidecar is read), or EDM's PNG folder; several: one per seed set")
    parser.add_argument("--config", default=None, help="the checkpoint config (default: the one the sidecar records)")
    parser.add_argument("--eval", default=None, help="the evaluator's JSON for these samples (reference batch, backend)")
    parser.add_argument("--cell", default=None, help="the paper's cell to compare with (default: from the run's steps and lambda)")
    parser.add_argument("--json", default=None, help="also write the comparison to this JSON file")
    args = parser.parse_args(argv)
    report = check(args.samples, args.config, args.eval, args.cell)
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n", "the comparison")
    return report["exit_status"]

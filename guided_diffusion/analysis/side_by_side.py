"""Side by side: baseline, Epsilon Scaling (ES), Time-Shift (TS) and both (TS+ES) on one model.

Every arm samples the same seeds at the same step counts, so image i of every arm starts from the
same noise and a gain is paired by seed (seed_stats). Each arm is scored with one metric (the
digits Frechet distance on the shipped digits models; ADM's evaluator, or a Frechet distance
against data, on a checkpoint) and its exposure bias delta_t is measured on chains started from
real images (analysis.exposure_bias). The table gives mean ± std over seeds and a verdict only
where a difference is larger than the seed-to-seed spread; the figure the scores against the step
count and delta_t per sampling step.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from adm_common.errors import UsageError
from adm_common.files import atomic_write_figure, atomic_write_text, folder_lock_file, locked
from guided_diffusion.analysis.exposure_bias import measure_exposure_bias
from guided_diffusion.analysis.seed_stats import cell, mean_std, paired_gain, verdict
from guided_diffusion.eps_scaling import EpsScale, parse_eps_scale
from guided_diffusion.run.output import output_folder
from guided_diffusion.time_shift import TimeShift, parse_time_shift

ARMS = ("baseline", "ES", "TS", "TS+ES")
DIGITS_CONFIGS = ("digits_uncond", "digits_cond")
PILOT_SEED = 100  # the Time-Shift window is chosen on this seed, never on an evaluation seed


@dataclass(frozen=True)
class Arm:
    """One sampling setting: a lambda schedule and a Time-Shift (None: off)."""

    name: str
    eps_scale: EpsScale
    time_shift: TimeShift | None

    def describe(self) -> dict:
        return {"arm": self.name, "eps_scale": str(self.eps_scale),
                "time_shift": None if self.time_shift is None else str(self.time_shift)}


def make_arms(eps_scale: EpsScale, time_shift: TimeShift) -> list[Arm]:
    """The four arms, in ARMS order; a window-0 time shift is off (parse_time_shift)."""
    shift = parse_time_shift(time_shift)
    return [Arm("baseline", EpsScale(), None), Arm("ES", eps_scale, None), Arm("TS", EpsScale(), shift),
            Arm("TS+ES", eps_scale, shift)]


@dataclass
class Bench:
    """What the comparison samples, scores and measures on one model.

    ``sample(steps, arm, seed)``: uint8 images [n, H, W, C]; ``score(images)``: the metric;
    ``diffusion_at(steps)``: the model's diffusion respaced to ``steps``; ``data`` (and ``labels``
    for a class-conditional model): the real images the delta_t chains start from.
    """

    model: torch.nn.Module
    diffusion_at: Callable
    sample: Callable
    score: Callable
    data: torch.Tensor
    labels: torch.Tensor | None = None
    metric: str = "score"
    lower_is_better: bool = True
    use_ddim: bool = False
    chain_batch: int = 256

    def exposure(self, steps: int, arm: Arm, seed: int):
        """delta_t per sampling step (an exposure_bias.ChainRun) of ``arm`` at ``steps``."""
        return measure_exposure_bias(self.diffusion_at(steps), self.model, self.data, arm.eps_scale, label=arm.name,
                                     labels=self.labels, seed=seed, batch_size=self.chain_batch,
                                     use_ddim=self.use_ddim, time_shift=arm.time_shift, forward_norms=False)


# ---------------------------------------------------------------------------------------------
# Settings


def parse_counts(text: str, flag: str) -> list[int]:
    """Comma-separated whole numbers, at least one, none repeated."""
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"cannot read {flag} {text!r}; give comma-separated whole numbers such as 10,20") from None
    if not values:
        raise UsageError(f"{flag} needs at least one value, e.g. 10,20")
    if len(set(values)) != len(values):
        raise UsageError(f"{flag} {text!r} repeats a value; give each once")
    return values


def check_settings(*, steps, seeds, num_samples, batch_size, num_chains, num_images, diffusion_steps,
                   eps_scale: EpsScale, time_shift: TimeShift, use_ddim: bool, pilot_windows=()) -> None:
    """Refuse, in one line and before anything is written, what the comparison cannot run."""
    if num_samples < 2:
        raise UsageError(f"--num_samples must be at least 2 (a metric over samples needs two), got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    if not 2 <= num_chains <= num_images:
        raise UsageError(f"--num_chains must be between 2 and the {num_images} data images, got {num_chains}")
    if not seeds:
        raise UsageError("--seeds needs at least one seed, e.g. 0,1,2")
    if pilot_windows and PILOT_SEED in seeds:
        raise UsageError(f"seed {PILOT_SEED} chooses the window (--pilot_windows); drop it from --seeds")
    for count in steps:
        if not 1 <= count <= diffusion_steps:
            raise UsageError(f"--steps {count}: each step count must be between 1 and {diffusion_steps} "
                             "(the model's diffusion steps)")
        eps_scale.validate(count)
    if eps_scale.is_identity:
        raise UsageError("--eps_scale 1 is the baseline: the ES arms would repeat it; give the lambda to compare")
    for window in (time_shift.window, *pilot_windows):
        if window < 1:
            raise UsageError(f"time shift window {window} turns Time-Shift off; give a window of at least 1")
        for count in steps:
            TimeShift(window, time_shift.cutoff, time_shift.rule).validate(diffusion_steps, count, use_ddim)


# ---------------------------------------------------------------------------------------------
# The comparison


def pilot_window(bench: Bench, windows: Sequence[int], cutoff: int, steps: Sequence[int], rule: str = "paper",
                 progress: bool = False) -> dict:
    """The TS window (lambda 1) with the best mean score over ``steps`` on PILOT_SEED: a record."""
    from tqdm.auto import tqdm

    scores = {}
    for window in tqdm(windows, desc="pilot: TS windows", disable=not progress, leave=False):
        arm = Arm("TS", EpsScale(), TimeShift(window, cutoff, rule))
        scores[window] = [float(bench.score(bench.sample(n, arm, PILOT_SEED))) for n in steps]
    pick = (min if bench.lower_is_better else max)(windows, key=lambda w: float(np.mean(scores[w])))
    return {"how": f"pilot on seed {PILOT_SEED} (not an evaluation seed): TS with lambda 1 at steps "
                   f"{', '.join(map(str, steps))}, cutoff {cutoff}; the window with the best mean {bench.metric}",
            "seed": PILOT_SEED, "cutoff": cutoff, "scores": {str(w): s for w, s in scores.items()}, "window": pick}


def compare(bench: Bench, arms: Sequence[Arm], steps: Sequence[int], seeds: Sequence[int],
            progress: bool = False) -> list[dict]:
    """Score every arm at every step count on every seed (the same seeds for all), and measure its
    delta_t on the first seed; one row per (steps, arm), the baseline first."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(steps) * len(arms) * (len(seeds) + 1), desc="side by side", disable=not progress)
    rows = []
    for count in steps:
        for arm in arms:
            scores = []
            for seed in seeds:
                bar.set_postfix_str(f"{count} steps, {arm.name}, seed {seed}")
                scores.append(float(bench.score(bench.sample(count, arm, seed))))
                bar.update()
            chains = bench.exposure(count, arm, seeds[0])
            bar.update()
            rows.append({"steps": count, **arm.describe(), "scores": scores, "seeds": list(seeds),
                         "mean_delta": chains.summary()["mean_delta"],
                         "delta_t": [{"t": r["t"], "timestep": r["timestep"], "delta": r["delta"]} for r in chains.rows]})
    bar.close()
    for row in rows:
        base = next(r for r in rows if r["steps"] == row["steps"] and r["arm"] == "baseline")
        row["mean"], row["std"] = mean_std(row["scores"])
        if row["arm"] != "baseline":
            row["gain"] = paired_gain(base["scores"], row["scores"], bench.lower_is_better)
            row["verdict"] = verdict(base["scores"], row["scores"], bench.lower_is_better, name=row["arm"])
    return rows


def results_markdown(result: dict) -> str:
    better = "lower" if result["lower_is_better"] else "higher"
    shift = result["time_shift_choice"]
    lines = [
        f"{result['model']}, {'DDIM' if result['use_ddim'] else 'ancestral'} sampling: {result['metric']} ({better} "
        f"is better) of {result['num_samples']} samples, mean ± std over seeds {', '.join(map(str, result['seeds']))} "
        f"(every arm on the same seeds). ES: lambda = {result['eps_scale']} ({result['eps_scale_source']}); "
        f"TS: {result['time_shift']} ({shift['how']}). A verdict needs a gain larger than the seed-to-seed spread. "
        f"Mean δ_t: exposure bias averaged over the sampling steps, {result['delta_t']['num_chains']} chains from "
        f"real images, seed {result['delta_t']['seed']}.",
        "",
        f"| steps | arm | {result['metric']} | gain over baseline, paired by seed | verdict | mean δ_t |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['steps']} | {row['arm']} | {cell(row['scores'])} | {row.get('gain', '—')} | "
                     f"{row.get('verdict', '—')} | {row['mean_delta']:.5f} |")
    return "\n".join(lines) + "\n"


def write_figure(result: dict, path) -> None:
    """Left: the score against the step count per arm (error bars: std over seeds); right: delta_t
    per sampling step at the largest step count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, largest = result["rows"], max(result["steps"])
    fig, (ax_score, ax_delta) = plt.subplots(1, 2, figsize=(12, 4.6))
    for i, name in enumerate(ARMS):
        mine = [r for r in rows if r["arm"] == name]
        offset = (i - 1.5) * 0.15  # keep the error bars apart
        ax_score.errorbar([r["steps"] + offset for r in mine], [r["mean"] for r in mine], [r["std"] for r in mine],
                          marker="o", capsize=3, label=name)
        chain = next(r for r in mine if r["steps"] == largest)["delta_t"]
        ax_delta.plot([c["t"] for c in chain], [c["delta"] for c in chain], marker="o", ms=3, label=name)
    ax_score.set_xlabel("sampling steps")
    ax_score.set_ylabel(f"{result['metric']} (mean ± std over {len(result['seeds'])} seeds)")
    ax_score.set_xticks(result["steps"])
    ax_score.set_title(result["model"])
    ax_delta.set_xlabel("chain index t (first step left)")
    ax_delta.invert_xaxis()
    ax_delta.set_ylabel(r"$\delta_t$")
    ax_delta.set_yscale("log")
    ax_delta.set_title(f"exposure bias per step, {largest} steps")
    for ax in (ax_score, ax_delta):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)


def run_side_by_side(make_bench: Callable[[], Bench], output_dir, *, model: str, steps, seeds, eps_scale: EpsScale,
                     eps_scale_source: str, time_shift: TimeShift, pilot_windows=(), num_samples: int,
                     settings: dict | None = None, progress: bool = False, log=print) -> dict:
    """Lock the output folder, (pilot the window,) compare, write results.json, results.md, results.png.

    The settings must have passed ``check_settings``; ``make_bench`` is called once the folder is held.
    """
    out = output_folder(str(output_dir), "results/fixes")
    with locked(folder_lock_file(out), f"output folder {out}", "wait for it to finish or choose another --output_dir"):
        started = time.time()
        bench = make_bench()
        choice = {"how": "--window and --cutoff as given", "window": time_shift.window, "cutoff": time_shift.cutoff}
        if pilot_windows:
            choice = pilot_window(bench, pilot_windows, time_shift.cutoff, steps, time_shift.rule, progress)
            time_shift = TimeShift(choice["window"], time_shift.cutoff, time_shift.rule)
            log(f"time shift chosen by the pilot: {time_shift}")
        rows = compare(bench, make_arms(eps_scale, time_shift), steps, seeds, progress)
        result = {
            "model": model, "metric": bench.metric, "lower_is_better": bench.lower_is_better,
            "use_ddim": bench.use_ddim, "steps": list(steps), "seeds": list(seeds), "num_samples": num_samples,
            "eps_scale": str(eps_scale), "eps_scale_source": eps_scale_source, "time_shift": str(time_shift),
            "time_shift_choice": choice, "delta_t": {"num_chains": len(bench.data), "seed": seeds[0]},
            "rows": rows, "settings": settings or {}, "seconds": time.time() - started,
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        }
        atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str) + "\n")
        atomic_write_text(out / "results.md", results_markdown(result))
        write_figure(result, out / "results.png")
        log(f"wrote {out / 'results.md'}, results.json and results.png in {result['seconds']:.0f} s")
        return result


# ---------------------------------------------------------------------------------------------
# Benches: the shipped digits models, or a checkpoint


def digits_bench(model_name: str, num_samples: int, batch_size: int, num_chains: int) -> Bench:
    """A shipped digits model scored by the digits Frechet distance (digits.demo.DigitsBench); delta_t
    on the first ``num_chains`` of the 1797 real digits."""
    from guided_diffusion.digits.demo import DigitsBench, respaced
    from guided_diffusion.run.output import dequantize

    digits = DigitsBench(num_samples, batch_size)

    def sample(steps, arm, seed):
        return digits.sample(model_name, steps, arm.eps_scale, seed, time_shift=arm.time_shift)[0]

    labels = digits.labels[:num_chains] if model_name == "digits_cond" else None
    return Bench(digits.models[model_name], lambda steps: respaced(model_name, steps), sample, digits.fd,
                 dequantize(digits.reference[:num_chains]), labels, metric="digits FD")


def checkpoint_bench(args) -> Bench:
    """--model_path with the model flags, scored by --metric (analysis.commands.search_score: ADM's
    evaluator against --ref_batch, or a Frechet distance against --data_dir); delta_t on
    --num_chains images of --data_dir."""
    from guided_diffusion.analysis.commands import search_score
    from guided_diffusion.analysis.exposure_bias import load_images
    from guided_diffusion.analysis.lambda_search import EVALUATOR_METRICS, sample_images
    from guided_diffusion.run.pipeline import load_adm_model
    from guided_diffusion.script_util import diffusion_from_flags, model_and_diffusion_defaults

    model, _, _ = load_adm_model(args)
    data, labels = load_images(args.data_dir, args.image_size, args.num_chains, seed=0, with_labels=args.class_cond)
    score, _ = search_score(args, data)
    flags = {k: getattr(args, k) for k in model_and_diffusion_defaults()}
    num_classes = args.num_classes if args.class_cond else None

    def sample(steps, arm, seed):
        return sample_images(model, diffusion_from_flags(flags, str(steps)), arm.eps_scale, seed,
                             num_samples=args.num_samples, batch_size=args.batch_size,
                             shape=(3, args.image_size, args.image_size), num_classes=num_classes,
                             use_ddim=args.use_ddim, clip_denoised=args.clip_denoised, time_shift=arm.time_shift,
                             network_batch=min(args.num_samples, 400))

    return Bench(model, lambda steps: diffusion_from_flags(flags, str(steps)), sample, score, data, labels,
                 metric=args.metric, lower_is_better=EVALUATOR_METRICS.get(args.metric, True), use_ddim=args.use_ddim,
                 chain_batch=args.batch_size)


# ---------------------------------------------------------------------------------------------
# scripts/compare_fixes.py

DIGITS_RESULTS = Path(__file__).resolve().parents[2] / "results" / "digits" / "results.json"


def searched_digits_lambda() -> tuple[EpsScale, str] | None:
    """The digits demo's searched lambda (results/digits/results.json), None when that file is absent."""
    try:
        chosen = json.loads(DIGITS_RESULTS.read_text())["chosen_eps_scale"]
    except (OSError, ValueError, KeyError):
        return None
    return parse_eps_scale(chosen), f"the digits demo's search, {DIGITS_RESULTS.parent.name}/{DIGITS_RESULTS.name}"


def compare_from_flags(args, progress: bool = False) -> dict:
    """The side by side that scripts/compare_fixes.py's flags ask for (see its --help)."""
    digits = args.config in DIGITS_CONFIGS
    if digits and args.use_ddim:
        raise UsageError("the digits bench samples with ADM's ancestral sampler; drop --use_ddim True")
    if not digits and not args.model_path:
        raise UsageError(f"--config {args.config or '(none)'} is not a shipped digits model; pass --model_path, "
                         "--metric with --ref_batch (or --data_dir), and --data_dir for the delta_t chains")
    if args.eps_scale is not None:
        eps_scale, source = parse_eps_scale(args.eps_scale), "--eps_scale"
    else:
        found = searched_digits_lambda() if digits else None
        if found is None:
            raise UsageError("no ES lambda to compare: pass --eps_scale (e.g. the value scripts/search_eps_scale.py found)")
        eps_scale, source = found
    steps, seeds = parse_counts(args.steps, "--steps"), parse_counts(args.seeds, "--seeds")
    pilot = parse_counts(args.pilot_windows, "--pilot_windows") if str(args.pilot_windows).strip() else []
    time_shift = TimeShift(args.window, args.cutoff, args.time_shift_rule)
    # the digits: 1797 images; a checkpoint's --data_dir is counted when it is read
    check_settings(steps=steps, seeds=seeds, num_samples=args.num_samples, batch_size=args.batch_size,
                   num_chains=args.num_chains, num_images=1797 if digits else args.num_chains,
                   diffusion_steps=args.diffusion_steps, eps_scale=eps_scale, time_shift=time_shift,
                   use_ddim=args.use_ddim, pilot_windows=pilot)
    if not digits:
        from guided_diffusion.analysis.commands import check_search_args

        if not args.data_dir:
            raise UsageError("delta_t is measured on chains from real images; pass --data_dir (a folder, an .npz or digits)")
        # the search's own checks of the metric, its files and the model flags (it has no search here)
        check_search_args(argparse.Namespace(**vars(args), num_images=args.num_chains, grid=1, rounds=1,
                                             family="uniform"))
    torch.set_num_threads(max(1, args.threads))
    if digits:
        def make_bench():
            return digits_bench(args.config, args.num_samples, args.batch_size, args.num_chains)
    else:
        def make_bench():
            return checkpoint_bench(args)
    settings = {k: v for k, v in vars(args).items() if k != "model_path"}
    return run_side_by_side(make_bench, args.output_dir, model=args.config or Path(args.model_path).name, steps=steps,
                            seeds=seeds, eps_scale=eps_scale, eps_scale_source=source, time_shift=time_shift,
                            pilot_windows=pilot, num_samples=args.num_samples, settings=settings, progress=progress)

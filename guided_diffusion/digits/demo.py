"""The main job: Epsilon Scaling on the shipped digits models, measured end to end on a CPU.

1. Choose lambda without looking at the evaluation seeds: a coarse-to-fine search of the uniform
   lambda at 20 steps (digits Frechet distance, seed 100), and the norm-matching calibration
   for comparison.
2. Score baseline and ES at 10, 20 and 50 steps over several seeds (mean +- std), for the
   unconditional and the class-conditional model, and classifier-guided sampling.
3. Write results.md / results.json, a grid of samples (baseline beside ES, same noise) and the
   exposure-bias plots (delta_t and epsilon norms).

Every image is a function of (seed, index) alone, so a rerun reproduces every number; lambda
evaluations are cached in the output folder, so an interrupted run resumes its search (the scoring
that follows is recomputed, to the same numbers). Settings are checked before anything is written;
one run at a time per output folder; every file is written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from guided_diffusion.analysis import exposure_bias as eb
from guided_diffusion.analysis.seed_stats import cell, paired_gain, verdict
from guided_diffusion.dist_util import dev
from guided_diffusion.run.checkpoints import load_model_weights
from guided_diffusion.digits.features import digit_features, load_digit_features
from guided_diffusion.digits.data import digits_arrays
from guided_diffusion.eps_scaling import EpsScale
from adm_common.errors import UsageError
from adm_common.files import atomic_write_figure, atomic_write_text, folder_lock_file, locked
from guided_diffusion.analysis.lambda_search import EvaluationCache, LambdaSearch, calibrate_eps_scale, frechet_score
from guided_diffusion.run.output import dequantize, output_folder, quantize
from guided_diffusion.run.pipeline import batch_sampler
from guided_diffusion.run.configs import CONFIG_DIR, load_config
from guided_diffusion.script_util import (
    classifier_defaults,
    create_classifier,
    create_model_and_diffusion,
    diffusion_from_flags,
    model_and_diffusion_defaults,
)

SEARCH_SEED = 100  # lambda is chosen on this seed; the table is scored on others


def load_shipped(name: str):
    """A shipped network from its config: (network, diffusion or None)."""
    config = load_config(name)
    weights = CONFIG_DIR.parent / config["checkpoint_path"]
    if config["kind"] == "classifier":
        flags = {**classifier_defaults(), **config["flags"]}
        net = create_classifier(**{k: flags[k] for k in classifier_defaults()})
        diffusion = None
    else:
        flags = {**model_and_diffusion_defaults(), **config["flags"]}
        net, diffusion = create_model_and_diffusion(**{k: flags[k] for k in model_and_diffusion_defaults()})
    load_model_weights(net, weights, image_size=flags["image_size"])
    return net.eval(), diffusion


def respaced(name: str, steps: int):
    """The diffusion of a shipped model, respaced to ``steps`` (no network is built)."""
    return diffusion_from_flags(load_config(name)["flags"], str(steps))


class DigitsBench:
    """Samples and scores the shipped models: digits Frechet distance and guided-label accuracy."""

    def __init__(self, num_samples: int, batch_size: int):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.network_batch = min(num_samples, 400)  # fixed per run: no pixel depends on batch_size
        self.features_net = load_digit_features()
        images, self.labels = digits_arrays(8)
        self.reference = quantize(images)
        self.fd = frechet_score(lambda x: digit_features(self.features_net, x), self.reference)
        # on the device batch_sampler draws its tensors on (dist_util.dev())
        self.models = {name: load_shipped(name)[0].to(dev()) for name in ("digits_uncond", "digits_cond")}
        self.classifier = load_shipped("digits_classifier")[0].to(dev())

    def sample(self, model_name: str, steps: int, schedule: EpsScale, seed: int, guidance: float = 0.0,
               time_shift=None):
        """uint8 samples [n, 8, 8, 3] and their labels (None when unconditional and unguided);
        ``time_shift``: a time_shift.TimeShift (None: off)."""
        diffusion = respaced(model_name, steps)
        class_cond = model_name == "digits_cond"
        args = argparse.Namespace(seed=seed, use_ddim=False, clip_denoised=True, network_batch_size=self.network_batch)
        # Under guidance the labels steer the classifier only; the model never sees them (as in ADM).
        sample_batch = batch_sampler(self.models[model_name], diffusion, args, schedule, (3, 8, 8),
                                     num_classes=10 if (class_cond or guidance) else None,
                                     classifier=self.classifier if guidance else None, classifier_scale=guidance,
                                     model_takes_labels=not guidance, time_shift=time_shift)
        images, labels = [], []
        for start in range(0, self.num_samples, self.batch_size):
            # with a time shift a third element follows: the timesteps chosen, not needed here
            out, y = sample_batch(list(range(start, min(start + self.batch_size, self.num_samples))))[:2]
            images.append(quantize(out))
            labels.append(None if y is None else y.cpu().numpy())
        return np.concatenate(images), (None if labels[0] is None else np.concatenate(labels))

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of samples that the digit classifier reads as the label they were drawn for."""
        from guided_diffusion.digits.features import to_network_input

        with torch.no_grad():
            predicted = self.features_net(to_network_input(images)).argmax(1).numpy()
        return float((predicted == labels).mean())


def write_grid(baseline: np.ndarray, scaled: np.ndarray, path: Path, title: str, es_label: str,
               columns: int = 8) -> None:
    """Baseline and ES samples side by side (image i of both panels starts from the same noise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = max(1, min(columns, len(baseline), len(scaled)))  # a run of fewer samples than columns too

    def mosaic(images):
        n = len(images) // columns * columns
        framed = np.pad(images[:n], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=128)  # grey gaps
        rows = [np.concatenate(list(framed[r:r + columns]), axis=1) for r in range(0, n, columns)]
        return np.concatenate(rows, axis=0)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4.8))
    for ax, images, label in ((axes[0], baseline, "baseline (λ = 1)"), (axes[1], scaled, es_label)):
        ax.imshow(mosaic(images), interpolation="nearest")
        ax.set_title(label)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=100)


def check_demo_settings(num_samples, batch_size, seeds, steps, search_steps, guidance_scale, cond_steps) -> None:
    """Refuse, in one line and before anything is computed or written, settings the demo cannot run."""
    if num_samples < 2:
        raise UsageError(f"--num_samples must be at least 2 (a Frechet distance needs two), got {num_samples}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    if not seeds:
        raise UsageError("--seeds needs at least one seed, e.g. 0,1,2")
    total = min(int(load_config(name)["flags"]["diffusion_steps"]) for name in ("digits_uncond", "digits_cond"))
    for flag, counts in (("--steps", steps), ("--cond_steps", cond_steps), ("--search_steps", (search_steps,))):
        if not counts:
            raise UsageError(f"{flag} needs at least one step count, e.g. 10,20")
        for count in counts:
            if not 1 <= count <= total:
                raise UsageError(f"{flag} {count}: each step count must be between 1 and {total} "
                                 "(the shipped models' diffusion steps)")
    if not guidance_scale >= 0:
        raise UsageError(f"--guidance_scale must be >= 0, got {guidance_scale}")


def run_demo(output_dir="results/digits", num_samples=400, batch_size=400, seeds=(0, 1, 2),
             steps=(10, 20, 50), search_steps=20, guidance_scale=2.0, progress=True, log=print,
             cond_steps=(10, 20)) -> dict:
    """``steps`` are scored for the unconditional model, ``cond_steps`` for the class-conditional one
    (fewer, to keep the whole run within 10 minutes on 2 cores)."""
    check_demo_settings(num_samples, batch_size, seeds, steps, search_steps, guidance_scale, cond_steps)
    out = output_folder(str(output_dir), "results/digits")
    with locked(folder_lock_file(out), f"output folder {out}", "wait for it to finish or choose another --output_dir"):
        return _run_demo(out, num_samples, batch_size, seeds, steps, search_steps, guidance_scale, progress, log,
                         cond_steps)


def _run_demo(out, num_samples, batch_size, seeds, steps, search_steps, guidance_scale, progress, log, cond_steps):
    started = time.time()
    bench = DigitsBench(num_samples, batch_size)
    try:
        cache = EvaluationCache(out / "lambda_cache.json", {"model": "digits_uncond", "steps": search_steps,
                                                             "num_samples": num_samples, "metric": "digit_fd"})
    except ValueError as exc:  # the cache's own advice names a flag the demo does not have
        raise UsageError(f"{str(exc).split(';')[0]}; choose another --output_dir, or delete that file to "
                         "search afresh") from None

    def metric(schedule, seed):
        return bench.fd(bench.sample("digits_uncond", search_steps, schedule, seed)[0])

    log(f"searching the uniform lambda at {search_steps} steps (seed {SEARCH_SEED})...")
    search = LambdaSearch(metric, seeds=(SEARCH_SEED,), cache=cache, num_steps=search_steps, progress=progress)
    best = search.search_uniform(b_range=(0.94, 1.04), grid=5, rounds=2).best
    chosen = best.schedule
    log(f"searched lambda: {chosen} (digits FD {best.mean:.3f})")

    data = dequantize(bench.reference[:256])
    calibration = calibrate_eps_scale(respaced("digits_uncond", search_steps), bench.models["digits_uncond"], data,
                                      seed=SEARCH_SEED, batch_size=256)
    calibrated_fd = search.evaluate(calibration.uniform)
    log(f"calibrated lambda (norm matching): {calibration.uniform} (digits FD {calibrated_fd.mean:.3f})")

    rows = []
    for model_name, model_steps in (("digits_uncond", steps), ("digits_cond", cond_steps)):
        for n_steps in model_steps:
            base = [bench.fd(bench.sample(model_name, n_steps, EpsScale(), s)[0]) for s in seeds]
            es = [bench.fd(bench.sample(model_name, n_steps, chosen, s)[0]) for s in seeds]
            rows.append({"model": model_name, "steps": n_steps, "metric": "digits FD", "baseline": base, "es": es,
                         "verdict": verdict(base, es)})
            log(f"{model_name} {n_steps} steps: baseline {cell(base)}, ES {cell(es)} ({rows[-1]['verdict']})")

    guided = {}
    for label, schedule in (("baseline", EpsScale()), ("es", chosen)):
        fds, accs = [], []
        for s in seeds:
            images, labels = bench.sample("digits_uncond", search_steps, schedule, s, guidance=guidance_scale)
            fds.append(bench.fd(images))
            accs.append(bench.accuracy(images, labels))
        guided[label] = {"fd": fds, "accuracy": accs}
    unguided_acc = []
    for s in seeds:
        images, labels = bench.sample("digits_cond", search_steps, EpsScale(), s)
        unguided_acc.append(bench.accuracy(images, labels))
    rows.append({"model": f"digits_uncond + classifier (scale {guidance_scale})", "steps": search_steps,
                 "metric": "digits FD", "baseline": guided["baseline"]["fd"], "es": guided["es"]["fd"],
                 "verdict": verdict(guided["baseline"]["fd"], guided["es"]["fd"])})
    rows.append({"model": f"digits_uncond + classifier (scale {guidance_scale})", "steps": search_steps,
                 "metric": "label accuracy", "baseline": guided["baseline"]["accuracy"], "es": guided["es"]["accuracy"],
                 "verdict": verdict(guided["baseline"]["accuracy"], guided["es"]["accuracy"], lower_is_better=False)})
    log(f"guided: accuracy baseline {cell(guided['baseline']['accuracy'])}, ES {cell(guided['es']['accuracy'])}")

    first = min(steps)
    write_grid(bench.sample("digits_uncond", first, EpsScale(), seeds[0])[0][:32],
               bench.sample("digits_uncond", first, chosen, seeds[0])[0][:32], out / "samples_grid.png",
               f"digits_uncond, {first} steps, same noise per position", f"ES (λ = {chosen})")

    diffusion = respaced("digits_uncond", search_steps)
    runs = [eb.measure_exposure_bias(diffusion, bench.models["digits_uncond"], data, eps_scale=s, seed=SEARCH_SEED,
                                     batch_size=256, label=name)
            for name, s in (("baseline", EpsScale()), (f"ES {chosen}", chosen))]
    runs.append(calibration.run)
    eb.write_csv(runs, out / "exposure_bias.csv")
    eb.write_plot(runs, out / "exposure_bias.png",
                  title=f"digits_uncond, {search_steps} steps, {len(data)} chains from real digits")

    result = {
        "chosen_eps_scale": str(chosen), "search": {"best": best.to_dict(), "seed": SEARCH_SEED,
                                                    "evaluations": len(cache)},
        "calibration": {**calibration.to_dict(), "fd": calibrated_fd.mean},
        "rows": rows, "unguided_cond_accuracy": unguided_acc, "seeds": list(seeds), "num_samples": num_samples,
        "exposure_bias": eb.runs_to_dict(runs), "seconds": time.time() - started,
        "torch_version": torch.__version__, "threads": torch.get_num_threads(),
    }
    atomic_write_text(out / "results.json", json.dumps(result, indent=1, default=str))
    atomic_write_text(out / "results.md", results_markdown(result, search_steps))
    log(f"wrote {out / 'results.md'} in {result['seconds']:.0f} s")
    return result


def results_markdown(result: dict, search_steps: int) -> str:
    n, seeds = result["num_samples"], result["seeds"]
    lines = [
        f"Digits Frechet distance (lower is better) of {n} samples against the 1797 real digits, on the features "
        f"of guided_diffusion/digits/features.py; mean ± std over seeds {', '.join(map(str, seeds))}. "
        f"lambda = {result['chosen_eps_scale']} was chosen by a search at {search_steps} steps on seed {SEARCH_SEED} "
        f"(not an evaluation seed). A gain counts only when larger than the seed-to-seed spread.",
        "",
        "| model | steps | metric | baseline (λ = 1) | ES | gain, paired by seed | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lower = row["metric"] != "label accuracy"
        lines.append(f"| {row['model']} | {row['steps']} | {row['metric']} | {cell(row['baseline'])} | "
                     f"{cell(row['es'])} | {paired_gain(row['baseline'], row['es'], lower)} | {row['verdict']} |")
    cal = result["calibration"]
    lines += [
        "",
        f"Norm-matching calibration (no metric network) gave a uniform lambda of {cal['uniform']} "
        f"(linear fit {cal['linear']}); its digits FD at {search_steps} steps on seed {SEARCH_SEED} is "
        f"{cal['fd']:.3f}, against {result['search']['best']['mean']:.3f} for the searched lambda.",
        f"The class-conditional model's samples are read as their label {cell(result['unguided_cond_accuracy'])} "
        f"of the time at {search_steps} steps (baseline).",
    ]
    return "\n".join(lines) + "\n"

"""Shell commands that reproduce one cell of the ES paper's ADM table from a checkpoint config.

A cell is (config, number of sampling steps, variant): ``base`` (lambda = 1), ``es`` (the paper's
uniform lambda) or ``es-linear`` (the paper's linear schedule). The commands download the
checkpoint(s) and reference batch when missing, sample 50,000 images over N GPUs with mpirun, and
score them with the evaluator. With ``seed_sets`` above 1 they sample one set of images per seed
(``--seed 0``, ``1``, ...; each in its own ``seedI`` folder) and score every set in one evaluator call.

Each command is one line of shell with every path quoted (a space or a ``'`` in a folder name
works). A download that fails (offline, no curl, HTTP error) ends in one ``error:`` line naming
the URL and the file it was meant to become, exit status 2, and leaves neither that file nor a
partial one behind.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from adm_common.errors import UsageError
from guided_diffusion.run.configs import load_config
from guided_diffusion.run.eps_choice import sampling_eps_scale

VARIANTS = ("base", "es", "es-linear")


def _error(template: str, *words: str) -> str:
    """Shell that prints one ``error:`` line to stderr and exits 2. ``words`` are shell words, quoted
    by the caller; they are printf's arguments, never its format, so a ``%`` in a path is harmless."""
    line = shlex.quote("error: " + template + "\\n")  # printf's \n: every command stays one line
    return "{ printf " + " ".join([line, *words]) + " >&2; exit 2; }"


def _download(url: str | None, dest: Path, what: str) -> str:
    """One line of shell: nothing when ``dest`` exists, else fetch ``url`` into ``dest`` or fail in one line."""
    target = shlex.quote(str(dest))
    if not url:
        return f"[ -f {target} ] || " + _error(
            "%s is not at %s and has no public download URL; put the file there, then rerun",
            shlex.quote(what), target)
    part, link = shlex.quote(str(dest) + ".part"), shlex.quote(url)
    by_hand = "; download it there yourself, then rerun"
    no_curl = _error("cannot download %s to %s: curl is not installed" + by_hand, link, target)
    reason = "\"$(printf '%s\\n' \"$why\" | tail -n 1)\""  # curl's last message (one per try)
    failed = _error("could not download %s to %s (%s)" + by_hand, link, target, reason)
    # The file appears only when complete (.part, then mv); a failure removes the partial file.
    return (f"[ -f {target} ] || {{ command -v curl >/dev/null 2>&1 || {no_curl}; "
            f"why=$(curl -fsSL --retry 3 --connect-timeout 30 -o {part} {link} 2>&1) "
            f"&& mv -f {part} {target} || {{ rm -f {part}; {failed}; }}; }}")


def cell_commands(config_name: str, steps: int, variant: str, num_gpus: int = 1, work_dir: str = "runs",
                  num_samples: int = 50000, batch_size: int | None = None, seed_sets: int = 1) -> list[str]:
    if variant not in VARIANTS:
        raise UsageError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if steps < 1 or num_gpus < 1:
        raise UsageError("steps and the number of GPUs must be at least 1")
    if seed_sets < 1:
        raise UsageError(f"--seed_sets must be at least 1, got {seed_sets}")
    config = load_config(config_name)
    if config.get("kind", "diffusion") != "diffusion":
        raise UsageError(f"{config_name} is a {config.get('kind')} config; a table cell needs a diffusion model")
    name = config["name"]
    if "\n" in str(work_dir) or "\r" in str(work_dir):
        raise UsageError(f"the work folder {work_dir!r} has a line break in its name; choose another")
    work = Path(work_dir)
    models, refs = work / "models", work / "reference"
    commands = [f"mkdir -p {shlex.quote(str(models))} {shlex.quote(str(refs))} 2>/dev/null || "
                + _error("cannot create %s; choose a writable work folder (WORK_DIR)", shlex.quote(str(work)))]
    model_file = models / (config.get("checkpoint_file") or f"{name}.pt")
    commands.append(_download(config.get("checkpoint_url"), model_file, f"{name} checkpoint"))

    flag = {"base": "1.0", "es": "paper", "es-linear": "paper:linear"}[variant]
    eps = str(sampling_eps_scale(flag, config, steps)[0])

    out_dir = work / name / f"{steps}steps-{variant}"
    flags = [
        "--config", name, "--model_path", str(model_file), "--timestep_respacing", str(steps),
        "--num_samples", str(num_samples), "--eps_scale", str(eps),
    ]
    more_flags = []  # after --output_dir
    if batch_size:
        more_flags += ["--batch_size", str(batch_size)]
    script = "scripts/image_sample.py"
    if config.get("classifier") and config.get("classifier_scale"):
        classifier = load_config(config["classifier"])
        classifier_file = models / (classifier.get("checkpoint_file") or f"{classifier['name']}.pt")
        commands.append(_download(classifier.get("checkpoint_url"), classifier_file, "classifier checkpoint"))
        script = "scripts/classifier_sample.py"
        more_flags += ["--classifier_path", str(classifier_file), "--classifier_scale", str(config["classifier_scale"])]
        more_flags += [f"--{k}={v}" for k, v in classifier["flags"].items() if k.startswith("classifier_")]
    launcher = f"mpirun -n {num_gpus} " if num_gpus > 1 else ""
    # one seed set: the cell's folder, as before; several: a folder per seed, each its own --seed
    set_dirs = [out_dir] if seed_sets == 1 else [out_dir / f"seed{seed}" for seed in range(seed_sets)]
    for seed, set_dir in enumerate(set_dirs):
        set_flags = flags + ["--output_dir", str(set_dir)] + more_flags + (["--seed", str(seed)] if seed_sets > 1 else [])
        commands.append(launcher + "python " + script + " " + " ".join(shlex.quote(f) for f in set_flags))

    size = config["flags"].get("image_size", config["flags"].get("large_size"))
    samples = [set_dir / f"samples_{num_samples}x{size}x{size}x3.npz" for set_dir in set_dirs]
    ref_url = config.get("reference_batch_url")
    ref_file = refs / (Path(ref_url).name if ref_url else f"{name}_reference.npz")
    commands.append(_download(ref_url, ref_file, "reference batch (build one with scripts/make_reference_batch.py)"))
    commands.append(
        f"python evaluations/evaluator.py {shlex.quote(str(ref_file))} "
        + "".join(f"{shlex.quote(str(path))} " for path in samples)
        + f"--json {shlex.quote(str(out_dir / 'metrics.json'))}"
    )
    return commands


def main(argv=None) -> None:
    """scripts/paper_commands.py: print one cell's commands, one line of shell each (run it through
    adm_common.cli.cli_main, which makes argparse's mistakes one line)."""
    parser = argparse.ArgumentParser(prog="paper_commands.py",
                            description="Print the shell commands for one cell of the ES paper's ADM table.")
    parser.add_argument("config")
    parser.add_argument("steps", type=int)
    parser.add_argument("variant", choices=VARIANTS)
    parser.add_argument("--num_gpus", type=int, default=1)
    parser.add_argument("--work_dir", default="runs")
    parser.add_argument("--num_samples", type=int, default=50000)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--seed_sets", type=int, default=1,
                        help="sets of images, seeds 0..N-1, scored together by one evaluator call")
    args = parser.parse_args(argv)
    for command in cell_commands(args.config, args.steps, args.variant, args.num_gpus, args.work_dir,
                                 args.num_samples, args.batch_size, args.seed_sets):
        print(command)

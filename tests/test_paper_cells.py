"""The table-cell launcher prints the commands that reproduce a cell of the ES paper's ADM table."""

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from adm_common.errors import UsageError
from guided_diffusion.run.paper_cells import cell_commands
from guided_diffusion.run.paper_cells import main as paper_main
from adm_common.cli import cli_main
from guided_diffusion.run.configs import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_es_cell_uses_the_papers_lambda_on_n_gpus():
    commands = cell_commands("imagenet64_cond", 50, "es", num_gpus=8)
    sample = next(c for c in commands if "image_sample.py" in c)
    assert sample.startswith("mpirun -n 8 python scripts/image_sample.py")
    assert "--eps_scale 1.006" in sample and "--timestep_respacing 50" in sample
    assert "--num_samples 50000" in sample
    assert any("VIRTUAL_imagenet64_labeled.npz" in c and "curl" in c for c in commands)
    assert "evaluations/evaluator.py" in commands[-1]


def test_guided_cell_brings_the_classifier_and_scale():
    commands = cell_commands("imagenet128_cond", 20, "es-linear")
    sample = next(c for c in commands if "classifier_sample.py" in c)
    assert "--classifier_scale 0.5" in sample and "--eps_scale linear:k=0.00022,b=1.00291" in sample
    assert not sample.startswith("mpirun")


def test_baseline_cell_disables_scaling():
    sample = next(c for c in cell_commands("cifar10_uncond_admes", 20, "base") if "image_sample.py" in c)
    assert "--eps_scale 1.0" in sample


def test_unpublished_cells_and_wrong_kinds_are_refused():
    with pytest.raises(UsageError, match="no published uniform lambda for 37 steps"):
        cell_commands("imagenet64_cond", 37, "es")
    with pytest.raises(UsageError, match="classifier config"):
        cell_commands("imagenet64_classifier", 20, "base")
    with pytest.raises(UsageError, match="variant"):
        cell_commands("imagenet64_cond", 20, "best")


def test_shell_launcher_dry_run_prints_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "paper_cell.sh"), "ffhq128_admes", "20", "es", "4",
                           "--dry-run"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, WORK_DIR=str(tmp_path / "w"), PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "mpirun -n 4 python scripts/image_sample.py --config ffhq128_admes" in proc.stdout
    assert "--eps_scale 1.008" in proc.stdout
    assert not (tmp_path / "w").exists()


# A folder name that breaks unquoted shell: a space, a quote, and a printf directive.
ODD = "it's 100%s odd"
NO_NETWORK = {k: "http://127.0.0.1:9" for k in ("http_proxy", "https_proxy", "HTTPS_PROXY", "ALL_PROXY", "all_proxy")}


def _launch(tmp_path, *args, work_dir, extra_env=None):
    """paper_cell.sh from a checkout whose folder name is odd (a link to this one's scripts),
    run from another odd folder, with a relative WORK_DIR (taken from the folder it runs from)."""
    checkout = tmp_path / f"checkout {ODD}"
    if not checkout.exists():
        checkout.mkdir()
        (checkout / "scripts").symlink_to(ROOT / "scripts")
    cwd = tmp_path / f"caller {ODD}"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "curl_home")}
    env.update(WORK_DIR=work_dir, PYTHONPATH=str(ROOT), CURL_HOME=str(tmp_path), **(extra_env or {}))
    proc = subprocess.run(["bash", str(checkout / "scripts" / "paper_cell.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc, cwd / work_dir


def _tokens_after(tokens, flag):
    return tokens[tokens.index(flag) + 1]


def test_dry_run_commands_are_valid_shell_with_every_path_quoted(tmp_path):
    proc, work = _launch(tmp_path, "imagenet64_cond", "20", "es", "8", "--dry-run", work_dir=f"work {ODD}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5
    for line in lines:
        syntax = subprocess.run(["bash", "-n", "-c", line], capture_output=True, text=True)
        assert syntax.returncode == 0, (line, syntax.stderr)
    mkdir, model, sample, ref, score = (shlex.split(line) for line in lines)
    assert mkdir[:4] == ["mkdir", "-p", str(work / "models"), str(work / "reference")]
    assert model[:3] == ["[", "-f", str(work / "models" / "64x64_diffusion.pt")]
    assert str(work / "models" / "64x64_diffusion.pt.part") in model
    assert sample[:5] == ["mpirun", "-n", "8", "python", "scripts/image_sample.py"]
    assert _tokens_after(sample, "--model_path") == str(work / "models" / "64x64_diffusion.pt")
    assert _tokens_after(sample, "--output_dir") == str(work / "imagenet64_cond" / "20steps-es")
    assert ref[:3] == ["[", "-f", str(work / "reference" / "VIRTUAL_imagenet64_labeled.npz")]
    assert score[2:4] == [str(work / "reference" / "VIRTUAL_imagenet64_labeled.npz"),
                          str(work / "imagenet64_cond" / "20steps-es" / "samples_50000x64x64x3.npz")]
    assert _tokens_after(score, "--json") == str(work / "imagenet64_cond" / "20steps-es" / "metrics.json")
    assert not work.exists() and not (tmp_path / f"checkout {ODD}" / f"work {ODD}").exists()


def test_guided_cell_quotes_the_classifier_path():
    work = Path("/data") / ODD
    sample = next(c for c in cell_commands("imagenet128_cond", 20, "es", work_dir=str(work))
                  if "classifier_sample.py" in c)
    tokens = shlex.split(sample)
    assert _tokens_after(tokens, "--classifier_path") == str(work / "models" / "128x128_classifier.pt")
    assert _tokens_after(tokens, "--model_path") == str(work / "models" / "128x128_diffusion.pt")


def test_offline_download_fails_in_one_error_line_and_leaves_no_partial_file(tmp_path):
    work_name = f"work {ODD}"
    models = tmp_path / f"caller {ODD}" / work_name / "models"
    models.mkdir(parents=True)
    target = models / "64x64_diffusion.pt"
    (models / "64x64_diffusion.pt.part").write_bytes(b"half of an earlier download")
    proc, work = _launch(tmp_path, "imagenet64_cond", "20", "es", work_dir=work_name, extra_env=NO_NETWORK)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    url = load_config("imagenet64_cond")["checkpoint_url"]
    assert lines[0].startswith("error: ") and f"download {url} to {target}" in lines[0]
    assert sorted(p.name for p in work.rglob("*")) == ["models", "reference"]  # no file, no .part
    assert "+ python scripts/image_sample.py" not in proc.stdout  # it stopped at the download


def test_a_checkpoint_without_url_is_one_error_line_naming_where_to_put_it(tmp_path):
    proc, work = _launch(tmp_path, "ffhq128_admes", "20", "es", work_dir=f"work {ODD}", extra_env=NO_NETWORK)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"error: ffhq128_admes checkpoint is not at {work / 'models' / 'ffhq128_admes.pt'} and has no public "
        "download URL; put the file there, then rerun"]
    assert sorted(p.name for p in work.rglob("*")) == ["models", "reference"]


def test_launcher_mistakes_are_one_error_line(tmp_path, capsys):
    proc, _ = _launch(tmp_path, "imagenet64_cond", "20", work_dir="w")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: expected CONFIG STEPS VARIANT [NUM_GPUS], got 2 arguments")
    proc, _ = _launch(tmp_path, "imagenet64_cond", "20", "best", work_dir="w")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: argument variant: invalid choice: 'best'")
    assert not (tmp_path / f"caller {ODD}" / "w").exists()
    with pytest.raises(SystemExit) as stop:  # argparse's mistakes, one line through cli_main
        cli_main(lambda: paper_main(["imagenet64_cond", "20", "es", "--num_gpus", "x"]))
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: argument --num_gpus: invalid int value: 'x' (see paper_commands.py --help)"]
    with pytest.raises(UsageError, match="line break"):
        cell_commands("imagenet64_cond", 20, "es", work_dir="runs\nrm -rf x")


def test_seed_sets_sample_one_folder_per_seed_and_score_them_in_one_call(tmp_path):
    proc, work = _launch(tmp_path, "cifar10_uncond_admes", "50", "es", "2", "--seed_sets", "3", "--dry-run",
                         work_dir=f"work {ODD}")
    assert proc.returncode == 0, proc.stderr
    lines = [shlex.split(line) for line in proc.stdout.splitlines()]
    samples = [tokens for tokens in lines if "scripts/image_sample.py" in tokens]
    cell = work / "cifar10_uncond_admes" / "50steps-es"
    assert [(_tokens_after(s, "--seed"), _tokens_after(s, "--output_dir")) for s in samples] == [
        (str(seed), str(cell / f"seed{seed}")) for seed in range(3)]
    assert all(_tokens_after(s, "--eps_scale") == "1.017" for s in samples)  # the paper's 50-step lambda
    score = lines[-1]
    assert score[:2] == ["python", "evaluations/evaluator.py"]
    assert score[3:6] == [str(cell / f"seed{seed}" / "samples_50000x32x32x3.npz") for seed in range(3)]
    assert _tokens_after(score, "--json") == str(cell / "metrics.json")
    proc, _ = _launch(tmp_path, "cifar10_uncond_admes", "50", "es", "--seed_sets=0", work_dir="w")
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: --seed_sets must be at least 1, got 0"]
    proc, _ = _launch(tmp_path, "cifar10_uncond_admes", "50", "es", "--seed_sets", work_dir="w")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("error: --seed_sets needs a number")

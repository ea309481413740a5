"""The table-cell launcher prints the commands that reproduce a cell of the ES paper's ADM table."""

import os
import subprocess
from pathlib import Path

import pytest

from guided_diffusion.errors import UsageError
from guided_diffusion.paper_cells import cell_commands

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

"""Shared test fixtures: the reference vectors in ../shared/reference, when they are present."""

import os
from pathlib import Path

import pytest
import torch

# Tiny networks gain nothing from a second thread, and OpenMP threads that wait for a busy core
# make them many times slower; subprocesses started by tests inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

REFERENCE_DIR = Path(__file__).resolve().parents[2] / "shared" / "reference"


def load_reference(name: str):
    """Load one reference file, or skip the test with the reason when it is absent."""
    path = REFERENCE_DIR / name
    if not path.exists():
        pytest.skip(f"reference vectors not found at {path} (they live in ../shared/reference)")
    if path.suffix == ".json":
        import json

        return json.loads(path.read_text())
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="session")
def adm_golden():
    return load_reference("adm_golden.pt")


@pytest.fixture(scope="session")
def admes_golden():
    return load_reference("admes_golden.pt")


@pytest.fixture(scope="session")
def checkpoint_layouts():
    return load_reference("checkpoint_layouts.json")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The state_dict of gaussian_chains.tiny_unet_and_diffusion's network, saved to a file."""
    from gaussian_chains import tiny_unet_and_diffusion

    model, _ = tiny_unet_and_diffusion()
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def script_process_group():
    """The scripts set up torch.distributed (a world of one); undo it so other tests start clean."""
    import torch.distributed as dist

    was_initialized = dist.is_initialized()
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    yield
    if not was_initialized and dist.is_initialized():
        dist.destroy_process_group()
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

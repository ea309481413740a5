"""Retrain the shipped digits models: the two diffusion models, the classifier, the feature net.

Each network is trained by the project's own training scripts with the flags in its config
(guided_diffusion/configs/digits_*.yaml: ``flags`` + ``train_flags``), and its final weights (EMA for diffusion
models) are exported as float16 safetensors into guided_diffusion/assets/.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import torch

from .checkpoints import load_state_dict
from .digit_features import FEATURES_FILE, train_digit_features
from .file_util import atomic_write_safetensors
from .script_util import CONFIG_DIR, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("digits_uncond", "digits_cond", "digits_classifier")


def _flag_list(flags: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in flags.items()]


def _newest(folder: Path, pattern: str) -> Path:
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(pattern, p.name))]
    if not found:
        raise FileNotFoundError(f"training wrote no checkpoint matching {pattern} in {folder}")
    return max(found)[1]


def export_half(state_dict: dict, dest: Path) -> None:
    """Write weights as float16 safetensors (the shipped models must stay small), atomically."""
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    atomic_write_safetensors(half, dest)


def train_network(name: str, work_dir: Path, seed: int = 0, max_steps: int | None = None) -> Path:
    """Train one shipped network with its config's flags; return the exported weights' path."""
    config = load_config(name)
    log_dir = work_dir / name
    train = dict(config["train_flags"])
    classifier = config["kind"] == "classifier"
    if max_steps is not None:
        train["iterations" if classifier else "max_steps"] = max_steps
    script = "classifier_train.py" if classifier else "image_train.py"
    flags = _flag_list({**config["flags"], **train, "log_dir": log_dir, "seed": seed, "save_interval": 10**9})
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / script), *flags], check=True, cwd=REPO_ROOT)
    if classifier:
        checkpoint = _newest(log_dir, r"model(\d+)\.pt")
    else:
        checkpoint = _newest(log_dir, rf"ema_{re.escape(str(train['ema_rate']))}_(\d+)\.pt")
    dest = CONFIG_DIR.parent / config["checkpoint_path"]
    dest.parent.mkdir(parents=True, exist_ok=True)
    export_half(load_state_dict(checkpoint), dest)
    return dest


def train_features(seed: int = 0) -> float:
    """Retrain the digit feature network; returns its held-out accuracy."""
    net, accuracy = train_digit_features(seed=seed)
    FEATURES_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}, FEATURES_FILE)
    return accuracy


def shipped_sizes() -> dict:
    """Bytes of every shipped weight file (they must total 10 MB at most)."""
    files = [CONFIG_DIR.parent / load_config(n)["checkpoint_path"] for n in SHIPPED] + [FEATURES_FILE]
    return {p.name: p.stat().st_size for p in files if p.exists()}


def parameter_count(path) -> int:
    return sum(t.numel() for t in load_state_dict(path).values() if isinstance(t, torch.Tensor))

"""Retrain the shipped digits models: the two diffusion models, the classifier, the feature net.

Each network is trained by the project's own training scripts with the flags in its config
(guided_diffusion/configs/digits_*.yaml: ``flags`` + ``train_flags``), and its final weights (EMA for diffusion
models) are exported as float16 safetensors into guided_diffusion/assets/.

A training run saves a checkpoint set every ``SAVE_INTERVAL`` steps into WORK_DIR/NAME; rerunning after
an interruption continues each run from its newest complete set (the training scripts resume a
--log_dir by themselves), and a finished run is only exported again. A training script's error
comes back as one line naming the network.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import torch

from guided_diffusion.run.checkpoints import load_state_dict
from guided_diffusion.digits.features import FEATURES_FILE, train_digit_features
from adm_common.files import atomic_write_safetensors
from adm_common.errors import UsageError
from adm_common.cli import Terminated
from guided_diffusion.run.configs import CONFIG_DIR, load_config
from guided_diffusion.train_util import ema_checkpoint_name, model_checkpoint_name

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("digits_uncond", "digits_cond", "digits_classifier")
SAVE_INTERVAL = 500  # steps between checkpoint sets (an interrupted retraining loses at most these)


def _flag_list(flags: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in flags.items()]


def _run_training(name: str, command: list[str]) -> None:
    """Run a training script; its stderr is passed on, and its one ``error:`` line becomes ours."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True, errors="replace")
    error = None
    try:
        for line in proc.stderr:
            if line.startswith("error: "):
                error = line[len("error: "):].strip()
            else:
                sys.stderr.write(line)
        status = proc.wait()
    except BaseException as exc:
        # Ctrl-C reaches the child too; SIGTERM is passed on. Either way the child ends as a stopped
        # run does (its checkpoint sets complete or absent) before this process ends.
        if isinstance(exc, Terminated) and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except BaseException:
            proc.kill()
        raise
    if status == 0:
        return
    script = Path(command[1]).name
    if error is not None:
        raise UsageError(f"training {name} ({script}) failed: {error}")
    if status in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM, -signal.SIGKILL):
        raise UsageError(f"training {name} ({script}) was stopped (exit status {status}); rerun the same "
                         "command to resume it")
    raise UsageError(f"training {name} ({script}) failed with exit status {status} (its output is above)")


def export_half(state_dict: dict, dest: Path) -> None:
    """Write weights as float16 safetensors (the shipped models must stay small), atomically."""
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in state_dict.items()}
    atomic_write_safetensors(half, dest)


def train_network(name: str, work_dir: Path, seed: int = 0, max_steps: int | None = None) -> Path:
    """Train one shipped network with its config's flags; return the exported weights' path."""
    if max_steps is not None and max_steps < 1:
        raise UsageError(f"--max_steps must be at least 1 (the steps each network trains), got {max_steps}")
    config = load_config(name)
    log_dir = Path(work_dir) / name
    if Path(work_dir).exists() and not Path(work_dir).is_dir():
        raise UsageError(f"--work_dir {work_dir} is a file, not a folder; choose another --work_dir")
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {log_dir} ({exc.strerror or exc}); choose a writable --work_dir") from None
    train = dict(config["train_flags"])
    classifier = config["kind"] == "classifier"
    limit = "iterations" if classifier else "max_steps"
    if max_steps is not None:
        train[limit] = max_steps
    script = "classifier_train.py" if classifier else "image_train.py"
    flags = _flag_list({**config["flags"], **train, "log_dir": log_dir, "seed": seed, "save_interval": SAVE_INTERVAL})
    _run_training(name, [sys.executable, str(REPO_ROOT / "scripts" / script), *flags])
    end = int(train[limit])
    if classifier:
        checkpoint = log_dir / model_checkpoint_name(end)
    else:
        checkpoint = log_dir / ema_checkpoint_name(float(train["ema_rate"]), end)
    if not checkpoint.is_file():
        raise UsageError(f"training {name} wrote no {checkpoint.name} in {log_dir}")
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

"""Training loops for ADM diffusion models (TrainLoop) and noise-aware classifiers (ClassifierTrainLoop).

TrainLoop keeps ADM's arguments, attributes and override points (``run_step``, ``forward_backward``,
``_update_ema``, ``_anneal_lr``, ``log_step``, ``save``, ``_load_and_sync_parameters``,
``_load_optimizer_state``, ``_load_ema_parameters``; ``self.step`` counts the steps of this run and
``self.resume_step`` those before it, as in ADM) and ADM's checkpoint files, model{step:06d}.pt,
ema_{rate}_{step:06d}.pt and opt{step:06d}.pt, plain ``torch.save`` state_dicts. Differences:

* the step in a file name is the number of completed optimizer steps, and a resumed run starts
  from it on every rank (model, EMA and optimizer, read with weights_only loading);
* checkpoints are a set: the files of one step are written to temporary names first and renamed
  only when all of them are complete, then ``checkpoint{step:06d}.json`` records their sizes and
  sha256 last (see ``write_checkpoint_set``). A kill or a full disk at any moment leaves the earlier
  sets untouched; resuming verifies the set and refuses an incomplete or damaged one in one line,
  unless ``allow_incomplete_resume`` says to continue without the missing pieces. An EMA or
  optimizer state that does not fit the model is refused before anything is loaded;
* with a seed, every step's random draws (timesteps, noise, dropout) are a function of
  (seed, rank, step), so a resumed run continues exactly as an uninterrupted one;
* microbatches accumulate the gradient of the full batch (each is weighted by its share), and a
  step's timesteps and noise are drawn for the whole batch, so --microbatch changes memory only;
* the learning rate of every step is --lr (decayed linearly to 0 over --lr_anneal_steps), also
  after a resume; optional bfloat16 autocast, DDPM-IP input perturbation, --max_steps to end a run;
* a step limit means what it says: the run ends at step N of --max_steps N (0: no step at all;
  -1 or None: no limit), of --lr_anneal_steps N (0, ADM's default: no annealing and no end) or of
  the classifier's --iterations N (0: no step, as ADM's ``range(iterations - resume_step)``). A run
  whose resumed step already is its end says so in one line and ends normally (status 0: a
  requeued job that had finished); one resumed beyond its end is refused (status 2: a typo);
* the scripts (guided_diffusion/run/training.py) check their flags before anything is created, hold their log
  folder against a second run, and continue the newest complete checkpoint set already in it, so
  that rerunning the command of a preempted run resumes it. SIGTERM and Ctrl-C leave the sets
  written so far (an interrupted save removes its temporary files; its set reads as incomplete).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from guided_diffusion import dist_util, logger
from guided_diffusion.run.checkpoints import check_fits, load_state_dict
from adm_common.errors import UsageError
from adm_common.files import (
    atomic_write_text,
    sha256_file,
    temp_path_for,
    writing,
)
from guided_diffusion.fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer, get_param_groups_and_shapes
from guided_diffusion.nn import update_ema
from guided_diffusion.resample import LossAwareSampler, UniformSampler
from guided_diffusion.image_noise import mixed_seed

_STEP_IN_NAME = re.compile(r"model(\d+)\.")
_EMA_OR_OPT_NAME = re.compile(r"(ema_[\d.]+_|opt)\d+\.")
_MODEL_FILE = re.compile(r"model(\d+)\.pt")
_MANIFEST_NAME = re.compile(r"checkpoint(\d+)\.json")
MANIFEST_FORMAT = "guided_diffusion checkpoint set 1"
ALLOW_INCOMPLETE_FLAG = "--allow_incomplete_resume True"


def parse_ema_rates(ema_rate) -> list[float]:
    """EMA decay rates from a float, a comma list ("0.9999,0.999") or "" (no EMA)."""
    if isinstance(ema_rate, (int, float)):
        rates = [float(ema_rate)]
    else:
        try:
            rates = [float(r) for r in str(ema_rate).split(",") if r.strip()]
        except ValueError:
            raise UsageError(f"cannot read --ema_rate {ema_rate!r}; use e.g. 0.9999 or 0.9999,0.999") from None
    for rate in rates:
        if not 0.0 <= rate < 1.0:
            raise UsageError(f"EMA rate {rate} is not in [0, 1); use e.g. 0.9999")
    return rates


def parse_resume_step_from_filename(filename) -> int:
    """The step in a checkpoint name: ``.../model012345.pt`` -> 12345; 0 when the name has none."""
    match = _STEP_IN_NAME.match(os.path.basename(str(filename)))
    return int(match.group(1)) if match else 0


def model_checkpoint_name(step: int) -> str:
    return f"model{step:06d}.pt"


def ema_checkpoint_name(rate: float, step: int) -> str:
    return f"ema_{rate}_{step:06d}.pt"


def opt_checkpoint_name(step: int) -> str:
    return f"opt{step:06d}.pt"


def manifest_name(step: int) -> str:
    """The record that the set of ``step`` is complete (written after all its files)."""
    return f"checkpoint{step:06d}.json"


def get_blob_logdir():
    """Where checkpoints go: the log folder. Forks replace this function to save elsewhere."""
    return logger.get_dir()


def find_resume_checkpoint():
    """A checkpoint to resume from when --resume_checkpoint is empty: none here, as in ADM.

    Replace it (``train_util.find_resume_checkpoint = ...``) to resume automatically, e.g. with
    ``lambda: latest_complete_checkpoint(folder)``.
    """
    return None


def find_ema_checkpoint(main_checkpoint, step, rate):
    """The EMA file written beside ``main_checkpoint`` at ``step``, or None."""
    if main_checkpoint is None:
        return None
    path = os.path.join(os.path.dirname(main_checkpoint), ema_checkpoint_name(rate, step))
    return path if os.path.exists(path) else None


def save_atomic(obj, path) -> None:
    """torch.save to a temporary sibling, then rename: ``path`` is the old file or the whole new one."""
    tmp = temp_path_for(path)
    try:
        _save_hashed(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- checkpoint sets ------------------------------------------------------------------------------


class _HashingWriter:
    """A binary file that hashes and counts what is written through it (torch.save writes here)."""

    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()
        self.size = 0

        self.error = None  # the OS's refusal of a write (torch.save reports it as its own RuntimeError)

    def write(self, data):
        self.digest.update(data)
        self.size += len(data)
        try:
            return self.file.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self):
        try:
            self.file.flush()
        except OSError as exc:
            self.error = exc
            raise


def _save_hashed(obj, path) -> tuple[int, str]:
    """torch.save ``obj`` to ``path``, flushed to disk; return (bytes, sha256) of what was written.
    A write the OS refuses (a full disk) is raised as that OSError, whatever torch made of it."""
    with open(path, "wb") as f:
        writer = _HashingWriter(f)
        try:
            torch.save(obj, writer)
        except Exception:
            if writer.error is not None:
                raise writer.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return writer.size, writer.digest.hexdigest()


def _fsync_dir(folder) -> None:
    """Make renames in ``folder`` durable (where the OS allows opening a folder)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint_set(folder, step: int, states) -> Path:
    """Write ``states`` ([(file name, object for torch.save)]) as the checkpoint set of ``step``.

    All files are written to temporary names (and fsynced) first, so a full disk or a kill
    during that phase leaves every earlier file as it was. Then the record
    ``checkpoint{step:06d}.json`` is written as pending, the files are renamed into place, and the
    record is rewritten with their sizes and sha256, last: a set is complete exactly when its
    record is final and matches. A full disk ends as one UsageError line. Returns the record's path.
    """
    folder = Path(folder)
    staged = []
    try:
        for name, obj in states:
            final = folder / name
            tmp = temp_path_for(final)
            staged.append((tmp, final))
            with writing(final):
                size, sha = _save_hashed(obj, tmp)
            staged[-1] = (tmp, final, size, sha)
        record = folder / manifest_name(step)
        # from here until the final record, the set of this step reads as interrupted (an earlier
        # save of the same step included)
        atomic_write_text(record, json.dumps({"format": MANIFEST_FORMAT, "step": step, "pending": True}))
        _fsync_dir(folder)
        for tmp, final, *_ in staged:
            with writing(final):
                os.replace(tmp, final)
        _fsync_dir(folder)
        files = {final.name: {"bytes": size, "sha256": sha} for _, final, size, sha in staged}
        atomic_write_text(record, json.dumps({"format": MANIFEST_FORMAT, "step": step, "files": files}, indent=1))
        _fsync_dir(folder)
        return record
    finally:
        for tmp, *_ in staged:
            tmp.unlink(missing_ok=True)


@dataclass
class CheckpointSetStatus:
    """What a checkpoint set on disk holds of the files a resume needs."""

    folder: Path
    step: int
    needed: list[str]
    missing: list[str] = field(default_factory=list)  # absent, or never recorded as part of the set
    damaged: list[str] = field(default_factory=list)  # present, but not what the save recorded
    recorded: bool = False  # the set has a record (else: interrupted, or ADM's own layout)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.damaged

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append("missing " + ", ".join(self.missing))
        if self.damaged:
            parts.append(", ".join(self.damaged) + " not as saved (size or sha256 differ from the record)")
        return "; ".join(parts)


def check_checkpoint_set(model_path, ema_rates, with_optimizer: bool = True) -> CheckpointSetStatus:
    """Whether the set of ``model_path`` (model{step}.pt) holds everything a resume with ``ema_rates`` needs.

    A set with a record must match it (each needed file listed, of the recorded size and sha256).
    In a folder whose other sets have records, a set without one was interrupted. In a folder
    without any record (ADM's own training, or files copied by hand) the needed files must exist.
    """
    model_path = Path(model_path)
    folder, step = model_path.parent, parse_resume_step_from_filename(model_path)
    needed = [model_path.name] + [ema_checkpoint_name(r, step) for r in ema_rates]
    if with_optimizer:
        needed.append(opt_checkpoint_name(step))
    status = CheckpointSetStatus(folder=folder, step=step, needed=needed)
    record_path = folder / manifest_name(step)
    interrupted = f"{record_path.name} (the save of step {step} did not finish)"
    if record_path.exists():
        status.recorded = True
        try:
            record = json.loads(record_path.read_text())
            if record.get("pending"):
                status.missing = [name for name in needed if not (folder / name).exists()] + [interrupted]
                return status
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            status.damaged.append(record_path.name)
            files = {}
        for name in needed:
            path, entry = folder / name, files.get(name)
            if not path.exists() or (entry is None and files):
                status.missing.append(name)
            elif entry is not None and (
                path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256")
            ):
                status.damaged.append(name)
        return status
    status.missing = [name for name in needed if not (folder / name).exists()]
    if any(_MANIFEST_NAME.fullmatch(p.name) for p in folder.iterdir()):
        status.missing.append(interrupted)
    return status


def model_checkpoints(folder) -> list[tuple[int, Path]]:
    """The model{step}.pt files in ``folder`` as (step, path), newest first."""
    found = ((int(m.group(1)), p) for p in Path(folder).iterdir() if (m := _MODEL_FILE.fullmatch(p.name)))
    return sorted(found, reverse=True)


def latest_complete_checkpoint(folder, ema_rates=(), with_optimizer: bool = True, before_step=None):
    """The model file of the newest complete set in ``folder`` (older than ``before_step``), or None."""
    if not Path(folder).is_dir():
        return None
    for step, path in model_checkpoints(folder):
        if before_step is not None and step >= before_step:
            continue
        if check_checkpoint_set(path, ema_rates, with_optimizer).complete:
            return path
    return None


def _unreadable(path, what, exc) -> UsageError:
    try:
        empty = os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty:
        return UsageError(f"{path} is empty (0 bytes), not a readable {what}: a save or copy cut short")
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    if " " not in first:  # KeyError('101') and the like say nothing by themselves
        first = f"{type(exc).__name__}: {first}"
    if isinstance(exc, (EOFError, OSError)) or "zip archive" in first or "central directory" in first:
        return UsageError(f"{path} is truncated or damaged, not a readable {what} ({first})")
    return UsageError(f"{path} is not a readable {what} ({first})")


def _load_tensors(path, what: str):
    """torch.load with tensors only, memory-mapped where the file allows (pages shared by the ranks)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        if "mmap" not in str(exc):
            raise _unreadable(path, what, exc) from None
    except Exception as exc:  # whatever makes it unreadable, name the file
        raise _unreadable(path, what, exc) from None
    try:  # an old (non-zip) torch.save file cannot be mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise _unreadable(path, what, exc) from None


def master_param_shapes(model, use_fp16: bool) -> list[tuple]:
    """Shapes of the tensors the optimizer updates: the parameters, or fp16 training's flat masters."""
    named = list(model.named_parameters())
    if not use_fp16:
        return [tuple(p.shape) for _, p in named]
    shapes = []
    for group, shape in get_param_groups_and_shapes(named):
        total = sum(p.numel() for _, p in group)
        shapes.append((total,) if len(shape) == 1 else (1, total))
    return shapes


def check_optimizer_state_fits(state, shapes, path) -> None:
    """Refuse (one line) an AdamW state_dict that does not belong to parameters of ``shapes``."""
    if not (
        isinstance(state, dict) and isinstance(state.get("state"), dict) and isinstance(state.get("param_groups"), list)
    ):
        raise UsageError(
            f"{path} is not an optimizer state (no 'state' and 'param_groups'); pass the model*.pt of a training run"
        )
    groups = state["param_groups"]
    ids = [i for g in groups for i in g.get("params", [])]
    fp16_hint = ""
    if len(ids) != len(shapes):
        if len(ids) <= 2 < len(shapes):
            fp16_hint = " (it was saved by --use_fp16 True training, which optimizes two flat tensors)"
        elif len(shapes) <= 2 < len(ids):
            fp16_hint = " (it was saved without --use_fp16; this run optimizes two flat fp16 master tensors)"
        raise UsageError(
            f"{path} does not fit this model: it holds the optimizer state of {len(ids)} parameter tensors, "
            f"this model has {len(shapes)}{fp16_hint}; resume with the flags of the run that saved it"
        )
    if len(groups) != 1:
        raise UsageError(f"{path} has {len(groups)} parameter groups; TrainLoop's AdamW has one")
    for index, (param_id, shape) in enumerate(zip(ids, shapes)):
        entry = state["state"].get(param_id)
        if entry is None:
            continue  # a parameter that has not been stepped yet
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in entry:
                raise UsageError(f"{path} is not an AdamW state (parameter {index} has no {key})")
            saved_shape = tuple(getattr(entry[key], "shape", ()))
            if saved_shape != tuple(shape):
                raise UsageError(
                    f"{path} does not fit this model: parameter {index} has {key} of shape "
                    f"{saved_shape}, the model's is {tuple(shape)}; "
                    "resume with the flags of the run that saved it"
                )


@dataclass
class _ResumeState:
    path: str
    step: int
    from_training: bool
    model: dict
    emas: dict  # rate -> state_dict, or None when the run continues without it
    opt: dict | None


# -- step limits ----------------------------------------------------------------------------------


def limit_reached_note(step: int, resumed_from: str, end: int, flag: str) -> str:
    """The one line of a run that has no step to take (it ends normally, with status 0)."""
    if not resumed_from:
        return f"{flag} {end}: the run ends at step {end}, before its first step; nothing was trained or saved"
    return (f"nothing to train: {resumed_from} is step {step}, where {flag} {end} ends the run; "
            f"raise {flag} to train further")


def past_limit_refusal(step: int, resumed_from: str, end: int, flag: str) -> str:
    """Why a run that would resume beyond its own end is refused."""
    return (f"{resumed_from} is step {step}, past the end that {flag} {end} sets; pass {flag} above {step} "
            "to train further, or resume from an earlier set")


# -- the loops ------------------------------------------------------------------------------------


def seed_step(seed: int, rank: int, step: int) -> None:
    """Seed torch's and numpy's global RNGs (noise, timesteps, dropout) from (seed, rank, step)."""
    mixed = mixed_seed(seed, rank, step)
    torch.manual_seed(mixed)
    np.random.seed([mixed & 0xFFFFFFFF, mixed >> 32])


def input_perturbed_losses(diffusion, model, x_start, t, gamma, model_kwargs=None, noise=None, perturbation=None):
    """Training losses with DDPM-IP's input perturbation (Ning et al., ICML 2023).

    x_t is made with noise + gamma * perturbation (the network input, and the posterior of the
    VLB term when the variance is learned, as in DDPM-IP); the epsilon target stays ``noise``.
    """
    if noise is None:
        noise = torch.randn_like(x_start)
    if perturbation is None:
        perturbation = torch.randn_like(x_start)
    return diffusion.training_losses(model, x_start, t, model_kwargs=model_kwargs, noise=noise,
                                     input_noise=noise + gamma * perturbation)


def log_loss_dict(diffusion, ts, losses):
    """Log each loss's mean, and its mean per quarter of the diffusion process (key_q0 .. key_q3)."""
    for key, values in losses.items():
        logger.logkv_mean(key, values.mean().item())
        for sub_t, sub_loss in zip(ts.cpu().numpy(), values.detach().cpu().numpy()):
            quartile = int(4 * sub_t / diffusion.num_timesteps)
            logger.logkv_mean(f"{key}_q{quartile}", sub_loss)


def compute_top_k(logits, labels, k, reduction="mean"):
    """Top-k accuracy: per sample (reduction "none") or the batch mean as a float."""
    _, top_ks = torch.topk(logits, k, dim=-1)
    hits = (top_ks == labels[:, None]).float().sum(dim=-1)
    return hits.mean().item() if reduction == "mean" else hits


def microbatch_slices(batch_size: int, microbatch: int):
    """Slices that cover a batch in pieces of ``microbatch`` (the whole batch when microbatch <= 0)."""
    step = microbatch if microbatch > 0 else batch_size
    return [slice(i, min(i + step, batch_size)) for i in range(0, batch_size, step)]


class _TrainLoopBase:
    """What both loops share: optimizer, fp16/bf16, DDP, EMA, resume, checkpoints, the step loop."""

    def __init__(
        self,
        *,
        model,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        use_bf16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        weight_decay=0.0,
        lr_anneal_steps=0,
        max_steps=None,
        seed=None,
        checkpoint_dir=None,
        allow_incomplete_resume=False,
    ):
        if use_fp16 and use_bf16:
            raise UsageError("--use_fp16 and --use_bf16 exclude each other; pick one")
        if batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
        for name, value in (("log_interval", log_interval), ("save_interval", save_interval)):
            if value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        if lr_anneal_steps < 0:
            raise UsageError(f"{self.LR_ANNEAL_FLAG} must be >= 0 (0: no annealing, no end), got {lr_anneal_steps}")
        if max_steps == -1:
            max_steps = None
        if max_steps is not None and max_steps < 0:
            raise UsageError(f"{self.MAX_STEPS_FLAG} must be >= 0 (-1: no limit), got {max_steps}")
        self.model = model
        self.data = data
        self.batch_size = batch_size
        self.microbatch = microbatch if microbatch > 0 else batch_size
        self.lr = lr
        self.ema_rate = parse_ema_rates(ema_rate)
        self.log_interval = log_interval
        self.save_interval = save_interval
        self.resume_checkpoint = resume_checkpoint
        self.use_fp16 = use_fp16
        self.use_bf16 = use_bf16
        self.fp16_scale_growth = fp16_scale_growth
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.seed = seed
        self.allow_incomplete_resume = allow_incomplete_resume
        self.checkpoint_dir = checkpoint_dir or get_blob_logdir()
        if not self.checkpoint_dir:
            raise UsageError("no folder for checkpoints: call logger.configure(dir=...) or pass checkpoint_dir")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.device = dist_util.dev()
        self.rank = dist_util.get_rank()
        self.global_batch = batch_size * dist_util.get_world_size()
        self.sync_cuda = torch.cuda.is_available()

        self.step = 0  # steps taken by this run (ADM's meaning)
        self.resume_step = 0  # steps behind the checkpoint this run resumed from
        self._resume = None
        self._load_and_sync_parameters()
        end = self.end_step()
        if end is not None and self.resume_step > end:
            raise UsageError(past_limit_refusal(self.resume_step, self._resume_source(), *self._binding_limit()))
        self.last_saved_step = self.resume_step if self._resume is not None and self._resume.from_training else None
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
        )
        self.opt = torch.optim.AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        self._load_optimizer_state()
        for group in self.opt.param_groups:  # the coming step's rate, as ADM's optimizer file holds it
            group["lr"] = self.lr_at(self.completed_steps)
        self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]
        self._resume = None  # loaded: let the file mappings go

        self.use_ddp = dist_util.get_world_size() > 1
        if self.use_ddp:
            on_gpu = self.device.type == "cuda"
            self.ddp_model = DDP(
                self.model,
                device_ids=[self.device] if on_gpu else None,
                output_device=self.device if on_gpu else None,
                bucket_cap_mb=128,
                find_unused_parameters=False,
            )
        else:
            self.ddp_model = self.model

    @property
    def completed_steps(self) -> int:
        """Optimizer steps behind the current weights, those before the resume included."""
        return self.step + self.resume_step

    # -- resume ---------------------------------------------------------------------------------

    def _load_and_sync_parameters(self):
        """Read the checkpoint set to resume from (find_resume_checkpoint() or --resume_checkpoint),
        check that all of it fits, load the model weights and set ``resume_step``.

        A name without a step (a released checkpoint) starts at step 0 with a fresh optimizer and
        EMA: fine-tuning. Every rank reads the files itself, so no rank waits on another; rank 0's
        weights are then broadcast, as in ADM.
        """
        path = find_resume_checkpoint() or self.resume_checkpoint
        if path:
            self._resumed_from = str(path)
            self._resume = self._read_resume_set(str(path))
            self.resume_step = self._resume.step
            self.model.load_state_dict(self._resume.model)
        dist_util.sync_params(self.model.parameters())

    def _read_resume_set(self, path) -> _ResumeState:
        """Every file of the resume, verified and checked against the model before anything is loaded."""
        if os.path.isdir(path):
            raise UsageError(f"--resume_checkpoint {path} is a folder; pass a model*.pt written by training")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume_checkpoint {path} does not exist; pass a model*.pt written by training")
        name = os.path.basename(path)
        if _EMA_OR_OPT_NAME.match(name):
            raise UsageError(
                f"--resume_checkpoint {path} is an EMA or optimizer file; pass the model*.pt beside it "
                "(its EMA and optimizer files are found from its name)"
            )
        image_size = getattr(self.model, "image_size", None)
        from_training = bool(_STEP_IN_NAME.match(name))
        if not from_training:
            state_dict = load_state_dict(path, map_location="cpu")
            check_fits(self.model, state_dict, image_size)
            logger.log(f"{name} has no step in its name: starting at step 0 from its weights (fine-tuning)")
            return _ResumeState(path, 0, False, state_dict, {r: None for r in self.ema_rate}, None)

        status = self._resume_status = check_checkpoint_set(path, self.ema_rate)
        unusable = set(status.missing) | set(status.damaged)
        if name in status.damaged:
            raise UsageError(
                f"cannot resume from {path}: the file is not as its save recorded (size or sha256 differ); "
                + self._complete_set_hint(status)
            )
        if not status.complete:
            if not self.allow_incomplete_resume:
                raise UsageError(
                    f"cannot resume from {path}: its checkpoint set is incomplete ({status.describe()}); "
                    + self._complete_set_hint(status) + f", or pass {ALLOW_INCOMPLETE_FLAG} to continue without them"
                )
            logger.warn(f"resuming from an incomplete checkpoint set ({status.describe()}): continuing without them")
        step = parse_resume_step_from_filename(path)
        state_dict = load_state_dict(path, map_location="cpu")
        try:
            check_fits(self.model, state_dict, image_size)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None

        emas = {}
        for rate in self.ema_rate:
            ema_path = os.path.join(status.folder, ema_checkpoint_name(rate, step))
            if os.path.basename(ema_path) in unusable:
                logger.warn(f"no usable {os.path.basename(ema_path)}: the EMA of rate {rate} restarts from the model")
                emas[rate] = None
                continue
            ema = self._read_optional(ema_path, "EMA state_dict")
            if ema is not None:
                if not (isinstance(ema, dict) and all(isinstance(v, torch.Tensor) for v in ema.values())):
                    raise UsageError(f"{ema_path} is not an EMA state_dict (a dict of tensors)")
                try:
                    check_fits(self.model, ema, image_size)
                except UsageError as exc:
                    raise UsageError(f"{ema_path} does not fit this model: {exc}") from None
            emas[rate] = ema

        opt_path = os.path.join(status.folder, opt_checkpoint_name(step))
        opt = None
        if os.path.basename(opt_path) in unusable:
            logger.warn(f"no usable {os.path.basename(opt_path)}: the optimizer starts afresh")
        else:
            opt = self._read_optional(opt_path, "optimizer state")
            if opt is not None:
                check_optimizer_state_fits(opt, master_param_shapes(self.model, self.use_fp16), opt_path)
        logger.log(f"resuming at step {step} from {path}")
        return _ResumeState(path, step, True, state_dict, emas, opt)

    def _read_optional(self, path, what):
        """A file of the set; an unreadable one is refused, or skipped when resuming incomplete sets is allowed."""
        try:
            return _load_tensors(path, what)
        except UsageError as exc:
            if not self.allow_incomplete_resume:
                hint = self._complete_set_hint(self._resume_status)
                raise UsageError(f"{exc}; {hint}, or pass {ALLOW_INCOMPLETE_FLAG} to continue without it") from None
            logger.warn(f"{exc}: continuing without it")
            return None

    def _complete_set_hint(self, status: CheckpointSetStatus) -> str:
        best = latest_complete_checkpoint(status.folder, self.ema_rate, before_step=status.step)
        if best is None:
            return "no earlier complete set is in that folder"
        return f"resume from {best}, the newest complete set before it"

    def _load_optimizer_state(self):
        resume = self._resume
        if resume is None or not resume.from_training:
            return
        if resume.opt is None:
            return
        self.opt.load_state_dict(resume.opt)
        for group in self.opt.param_groups:
            group["weight_decay"] = self.weight_decay

    def _load_ema_parameters(self, rate):
        resume = self._resume
        state_dict = None if resume is None else resume.emas.get(rate)
        if state_dict is None:
            return copy.deepcopy(self.mp_trainer.master_params)
        masters = self.mp_trainer.state_dict_to_master_params(state_dict)
        return [p.detach().to(self.device, copy=True) for p in masters]

    # -- the loop -------------------------------------------------------------------------------

    # the flags that set the step limits, as the script that runs the loop names them
    MAX_STEPS_FLAG = "--max_steps"
    LR_ANNEAL_FLAG = "--lr_anneal_steps"

    def step_limits(self) -> list[tuple[int, str]]:
        """(step at which the run ends, the flag that says so) for each limit: --max_steps (None and
        -1: none; 0: no step at all) and --lr_anneal_steps (0: none, as in ADM)."""
        limits = []
        if self.max_steps is not None and self.max_steps >= 0:
            limits.append((self.max_steps, self.MAX_STEPS_FLAG))
        if self.lr_anneal_steps:
            limits.append((self.lr_anneal_steps, self.LR_ANNEAL_FLAG))
        return limits

    def _resume_source(self) -> str:
        return getattr(self, "_resumed_from", None) or self.resume_checkpoint or "the resumed checkpoint"

    def _binding_limit(self) -> tuple[int, str]:
        return min(self.step_limits())

    def end_step(self):
        """The step at which the run stops (None: never)."""
        limits = self.step_limits()
        return min(limits)[0] if limits else None

    def run_loop(self):
        end = self.end_step()
        if end is not None and self.completed_steps >= end:
            # nothing to do: said in one line, and the run ends normally (a rerun of a finished command)
            logger.log(limit_reached_note(self.completed_steps, self._resume_source() if self.resume_step else "",
                                          *self._binding_limit()))
            return
        progress = tqdm(
            total=end, initial=self.completed_steps, disable=True if self.rank != 0 else None, unit="step",
            dynamic_ncols=True,
        )  # disable=None: no bar when stderr is not a terminal (a job's log file)
        self._last_dump = (time.perf_counter(), self.completed_steps)
        while end is None or self.completed_steps < end:
            batch, cond = next(self.data)
            if self.seed is not None:
                seed_step(self.seed, self.rank, self.completed_steps)
            self.run_step(batch, cond)
            self.step += 1
            progress.update(1)
            if self.completed_steps % self.log_interval == 0:
                self._dump_logs(progress)
            if self.completed_steps % self.save_interval == 0:
                self.save()
        if self._last_dump[1] != self.completed_steps:
            self._dump_logs(progress)
        progress.close()
        if self.last_saved_step != self.completed_steps:
            self.save()

    def _dump_logs(self, progress):
        """Write the logged means since the last dump, with the throughput, and show them in the bar."""
        now = time.perf_counter()
        then, step_then = self._last_dump
        images_per_sec = (self.completed_steps - step_then) * self.global_batch / max(now - then, 1e-9)
        self._last_dump = (now, self.completed_steps)
        logger.logkv("images_per_sec", images_per_sec)
        row = logger.dumpkvs()
        loss = row.get("loss", row.get("train_loss"))
        if loss is not None:
            progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_sec:.1f}")

    def run_step(self, batch, cond):
        """One optimizer step on ``batch``: gradients, update, EMA, the next step's learning rate (set
        after the step, as ADM does, so an optimizer file holds the rate its resumed run starts with),
        logged values."""
        self.forward_backward(batch, cond)
        took_step = self.mp_trainer.optimize(self.opt)
        if took_step:
            self._update_ema()
            self._anneal_lr()
        self.log_step()

    def _update_ema(self):
        for rate, params in zip(self.ema_rate, self.ema_params):
            update_ema(params, self.mp_trainer.master_params, rate=rate)

    def _anneal_lr(self):
        """Set the learning rate of the step after the one just taken (see lr_at)."""
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.completed_steps + 1)

    def log_step(self):
        """Log the step just taken (its number counts from 1), the images seen and the learning rate."""
        logger.logkv("step", self.completed_steps + 1)
        logger.logkv("samples", (self.completed_steps + 1) * self.global_batch)
        logger.logkv("lr", self.lr_at(self.completed_steps))  # the rate this step ran at

    def lr_at(self, step: int) -> float:
        """Learning rate of the step that follows ``step`` completed ones, decaying linearly when
        annealing as ADM's does: ADM sets the rate after each step from the step just taken, so the
        first two steps both run at --lr and the last at 2/N of it. The one-step lag is kept so that
        runs equal ADM's."""
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * max(0.0, 1.0 - max(step - 1, 0) / self.lr_anneal_steps)

    def forward_backward(self, batch, cond):
        raise NotImplementedError

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _sync_unless_last(self, is_last: bool):
        """DDP all-reduces gradients on the last microbatch only."""
        if self.use_ddp and not is_last:
            return self.ddp_model.no_sync()
        return contextlib.nullcontext()

    # -- checkpoints ----------------------------------------------------------------------------

    def save(self):
        """Write the checkpoint set of the current step (rank 0): model, each EMA, the optimizer, then its record."""
        step = self.completed_steps
        if self.rank == 0:
            states = [(model_checkpoint_name(step), self.mp_trainer.master_params)]
            states += [(ema_checkpoint_name(r, step), p) for r, p in zip(self.ema_rate, self.ema_params)]
            logger.log(f"saving the checkpoint set of step {step}: " + ", ".join(name for name, _ in states) + " and "
                       + opt_checkpoint_name(step))
            files = [(name, self.mp_trainer.master_params_to_state_dict(params)) for name, params in states]
            files.append((opt_checkpoint_name(step), self.opt.state_dict()))
            write_checkpoint_set(self.checkpoint_dir, step, files)
        dist_util.barrier()
        self.last_saved_step = step


class TrainLoop(_TrainLoopBase):
    """ADM's diffusion training loop (ADM's arguments first), plus use_bf16, input_perturbation,
    max_steps, seed, checkpoint_dir and allow_incomplete_resume.

    For a resume identical to an uninterrupted run, give the same seed and data made with
    ``load_data(..., seed=..., start_batch=parse_resume_step_from_filename(resume_checkpoint))``.
    """

    def __init__(
        self,
        *,
        model,
        diffusion,
        data,
        batch_size,
        microbatch,
        lr,
        ema_rate,
        log_interval,
        save_interval,
        resume_checkpoint,
        use_fp16=False,
        fp16_scale_growth=1e-3,
        schedule_sampler=None,
        weight_decay=0.0,
        lr_anneal_steps=0,
        use_bf16=False,
        input_perturbation=0.0,
        max_steps=None,
        seed=None,
        checkpoint_dir=None,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
        allow_incomplete_resume=False,
    ):
        if input_perturbation < 0:
            raise UsageError(f"--input_perturbation must be >= 0 (DDPM-IP uses 0.1), got {input_perturbation}")
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.input_perturbation = input_perturbation
        super().__init__(
            model=model,
            data=data,
            batch_size=batch_size,
            microbatch=microbatch,
            lr=lr,
            ema_rate=ema_rate,
            log_interval=log_interval,
            save_interval=save_interval,
            resume_checkpoint=resume_checkpoint,
            use_fp16=use_fp16,
            use_bf16=use_bf16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
            weight_decay=weight_decay,
            lr_anneal_steps=lr_anneal_steps,
            max_steps=max_steps,
            seed=seed,
            checkpoint_dir=checkpoint_dir,
            allow_incomplete_resume=allow_incomplete_resume,
        )

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        batch = batch.to(self.device)
        cond = {k: v.to(self.device) for k, v in cond.items()}
        n = batch.shape[0]
        t, weights = self.schedule_sampler.sample(n, self.device)
        noise = torch.randn_like(batch)
        perturbation = torch.randn_like(batch) if self.input_perturbation else None
        slices = microbatch_slices(n, self.microbatch)
        for sl in slices:
            micro_cond = {k: v[sl] for k, v in cond.items()}
            with self._sync_unless_last(sl is slices[-1]):
                with self._autocast():
                    micro_perturbation = None if perturbation is None else perturbation[sl]
                    losses = self._losses(batch[sl], t[sl], micro_cond, noise[sl], micro_perturbation)
                if isinstance(self.schedule_sampler, LossAwareSampler):
                    self.schedule_sampler.update_with_local_losses(t[sl], losses["loss"].detach())
                loss = (losses["loss"] * weights[sl]).mean() * ((sl.stop - sl.start) / n)
                log_loss_dict(self.diffusion, t[sl], {k: v * weights[sl] for k, v in losses.items()})
                self.mp_trainer.backward(loss)

    def _losses(self, x_start, t, model_kwargs, noise, perturbation):
        if perturbation is None:
            return self.diffusion.training_losses(self.ddp_model, x_start, t, model_kwargs=model_kwargs, noise=noise)
        return input_perturbed_losses(
            self.diffusion, self.ddp_model, x_start, t, self.input_perturbation,
            model_kwargs=model_kwargs, noise=noise, perturbation=perturbation,
        )


class ClassifierTrainLoop(_TrainLoopBase):
    """ADM's noise-aware classifier training (classifier_train.py), on the shared loop.

    With ``noised``, images are forward-noised to timesteps from ``schedule_sampler`` and the
    classifier is told the timestep; otherwise it sees clean images at t = 0. ``val_data`` is
    scored every ``eval_interval`` steps.
    """

    MAX_STEPS_FLAG = "--iterations"
    LR_ANNEAL_FLAG = "--iterations"  # with --anneal_lr True

    def __init__(self, *, diffusion, noised=True, schedule_sampler=None, val_data=None, eval_interval=5, **kwargs):
        if eval_interval < 1:
            raise UsageError(f"--eval_interval must be at least 1, got {eval_interval}")
        kwargs.setdefault("ema_rate", "")
        kwargs.setdefault("initial_lg_loss_scale", 16.0)
        self.diffusion = diffusion
        self.noised = noised
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.val_data = val_data
        self.eval_interval = eval_interval
        super().__init__(**kwargs)

    def forward_backward(self, batch, cond):
        self.mp_trainer.zero_grad()
        self._forward_backward_log(self.ddp_model, batch, cond, prefix="train")

    def run_step(self, batch, cond):
        super().run_step(batch, cond)
        if self.val_data is not None and self.completed_steps % self.eval_interval == 0:
            self.model.eval()
            with torch.no_grad():
                self._forward_backward_log(self.model, *next(self.val_data), prefix="val")
            self.model.train()

    def _forward_backward_log(self, model, batch, cond, prefix):
        batch = batch.to(self.device)
        labels = cond["y"].to(self.device)
        n = batch.shape[0]
        if self.noised:
            t, _ = self.schedule_sampler.sample(n, self.device)
            batch = self.diffusion.q_sample(batch, t)
        else:
            t = torch.zeros(n, dtype=torch.long, device=self.device)
        slices = microbatch_slices(n, self.microbatch)
        for sl in slices:
            with self._sync_unless_last(sl is slices[-1]):
                with self._autocast():
                    logits = model(batch[sl], timesteps=t[sl])
                loss = F.cross_entropy(logits.float(), labels[sl], reduction="none")
                metrics = {f"{prefix}_loss": loss.detach()}
                for k in (1, 5) if logits.shape[-1] >= 5 else (1,):
                    metrics[f"{prefix}_acc@{k}"] = compute_top_k(logits, labels[sl], k=k, reduction="none")
                log_loss_dict(self.diffusion, t[sl], metrics)
                if loss.requires_grad:
                    self.mp_trainer.backward(loss.mean() * ((sl.stop - sl.start) / n))

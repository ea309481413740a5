"""Training loops for ADM diffusion models (TrainLoop) and noise-aware classifiers (ClassifierTrainLoop).

Both keep ADM's behaviour and checkpoint files (model{step:06d}.pt, ema_{rate}_{step:06d}.pt,
opt{step:06d}.pt in the log folder) with these differences:

* the step in a file name is the number of completed optimizer steps, and a resumed run starts
  from it on every rank (model, EMA and optimizer, read with weights_only loading);
* checkpoints are written to a temporary name and renamed, so a crash never leaves half a file;
* with a seed, every step's random draws (timesteps, noise, dropout) are a function of
  (seed, rank, step), so a resumed run continues exactly as an uninterrupted one;
* microbatches accumulate the gradient of the full batch (each is weighted by its share), and a
  step's timesteps and noise are drawn for the whole batch, so --microbatch changes memory only;
* optional bfloat16 autocast, DDPM-IP input perturbation, and --max_steps to end a run.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel.distributed import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from . import dist_util, logger
from .checkpoints import check_fits, load_state_dict
from .errors import UsageError
from .file_util import temp_path_for
from .fp16_util import INITIAL_LOG_LOSS_SCALE, MixedPrecisionTrainer
from .nn import update_ema
from .resample import LossAwareSampler, UniformSampler
from .sample_io import mixed_seed

_STEP_IN_NAME = re.compile(r"model(\d+)\.")
_EMA_OR_OPT_NAME = re.compile(r"(ema_[\d.]+_|opt)\d+\.")


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


def find_ema_checkpoint(main_checkpoint, step, rate):
    """The EMA file written beside ``main_checkpoint`` at ``step``, or None."""
    path = os.path.join(os.path.dirname(main_checkpoint), ema_checkpoint_name(rate, step))
    return path if os.path.exists(path) else None


def save_atomic(obj, path) -> None:
    """torch.save to a temporary sibling, then rename: ``path`` is the old file or the whole new one."""
    tmp = temp_path_for(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        max_steps=0,
        seed=None,
        checkpoint_dir=None,
    ):
        if use_fp16 and use_bf16:
            raise UsageError("--use_fp16 and --use_bf16 exclude each other; pick one")
        if batch_size < 1:
            raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
        for name, value in (("log_interval", log_interval), ("save_interval", save_interval)):
            if value < 1:
                raise UsageError(f"--{name} must be at least 1, got {value}")
        for name, value in (("lr_anneal_steps", lr_anneal_steps), ("max_steps", max_steps)):
            if value < 0:
                raise UsageError(f"--{name} must be >= 0 (0: no limit), got {value}")
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
        self.weight_decay = weight_decay
        self.lr_anneal_steps = lr_anneal_steps
        self.max_steps = max_steps
        self.seed = seed
        self.checkpoint_dir = checkpoint_dir or logger.get_dir()
        if not self.checkpoint_dir:
            raise UsageError("no folder for checkpoints: call logger.configure(dir=...) or pass checkpoint_dir")
        os.makedirs(self.checkpoint_dir, exist_ok=True)
        self.device = dist_util.dev()
        self.rank = dist_util.get_rank()
        self.global_batch = batch_size * dist_util.get_world_size()

        self.resume_step = self._load_model_weights()
        self.step = self.resume_step
        self.last_saved_step = self.resume_step if self.resumed_from_training else None
        dist_util.sync_params(self.model.parameters())
        self.mp_trainer = MixedPrecisionTrainer(
            model=self.model,
            use_fp16=use_fp16,
            fp16_scale_growth=fp16_scale_growth,
            initial_lg_loss_scale=initial_lg_loss_scale,
        )
        self.opt = torch.optim.AdamW(self.mp_trainer.master_params, lr=lr, weight_decay=weight_decay)
        self._load_optimizer_state()
        self.ema_params = [self._load_ema_parameters(rate) for rate in self.ema_rate]

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

    # -- resume ---------------------------------------------------------------------------------

    def _load_model_weights(self) -> int:
        """Load --resume_checkpoint into the model on this rank; return the step it was saved at.

        A name without a step (a released checkpoint) starts at step 0 with a fresh optimizer and
        EMA: fine-tuning. Every rank reads the files itself, so no rank waits on another.
        """
        path = self.resume_checkpoint
        self.resumed_from_training = False
        if not path:
            return 0
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--resume_checkpoint {path} does not exist; pass a model*.pt written by training")
        name = os.path.basename(path)
        if _EMA_OR_OPT_NAME.match(name):
            raise UsageError(
                f"--resume_checkpoint {path} is an EMA or optimizer file; pass the model*.pt beside it "
                "(its EMA and optimizer files are found from its name)"
            )
        state_dict = load_state_dict(path, map_location="cpu")
        check_fits(self.model, state_dict, getattr(self.model, "image_size", None))
        self.model.load_state_dict(state_dict)
        self.resumed_from_training = bool(_STEP_IN_NAME.match(name))
        if not self.resumed_from_training:
            logger.log(f"{name} has no step in its name: starting at step 0 from its weights (fine-tuning)")
            return 0
        step = parse_resume_step_from_filename(path)
        logger.log(f"resuming at step {step} from {path}")
        return step

    def _load_optimizer_state(self):
        if not self.resumed_from_training:
            return
        path = os.path.join(os.path.dirname(self.resume_checkpoint), opt_checkpoint_name(self.resume_step))
        if not os.path.exists(path):
            logger.warn(f"no optimizer state {path}; the optimizer starts afresh")
            return
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # whatever makes it unreadable, name the file
            raise UsageError(f"{path} is not a readable optimizer state ({str(exc).splitlines()[0][:160]})") from None
        self.opt.load_state_dict(state)
        for group in self.opt.param_groups:
            group["weight_decay"] = self.weight_decay

    def _load_ema_parameters(self, rate):
        ema_path = None
        if self.resumed_from_training:
            ema_path = find_ema_checkpoint(self.resume_checkpoint, self.resume_step, rate)
            if ema_path is None:
                logger.warn(f"no EMA file for rate {rate} at step {self.resume_step}; it restarts from the model")
        if ema_path is None:
            return copy.deepcopy(self.mp_trainer.master_params)
        state_dict = load_state_dict(ema_path, map_location=self.device)
        return [p.detach().clone() for p in self.mp_trainer.state_dict_to_master_params(state_dict)]

    # -- the loop -------------------------------------------------------------------------------

    def end_step(self):
        """The step at which the run stops (None: never)."""
        limits = [n for n in (self.lr_anneal_steps, self.max_steps) if n]
        return min(limits) if limits else None

    def run_loop(self):
        end = self.end_step()
        progress = tqdm(total=end, initial=self.step, disable=self.rank != 0, unit="step", dynamic_ncols=True)
        self._last_dump = (time.perf_counter(), self.step)
        while end is None or self.step < end:
            batch, cond = next(self.data)
            self.run_step(batch, cond)
            self.step += 1
            progress.update(1)
            if self.step % self.log_interval == 0:
                self._dump_logs(progress)
            if self.step % self.save_interval == 0:
                self.save()
        if self._last_dump[1] != self.step:
            self._dump_logs(progress)
        progress.close()
        if self.last_saved_step != self.step:
            self.save()

    def _dump_logs(self, progress):
        """Write the logged means since the last dump, with the throughput, and show them in the bar."""
        now = time.perf_counter()
        then, step_then = self._last_dump
        images_per_sec = (self.step - step_then) * self.global_batch / max(now - then, 1e-9)
        self._last_dump = (now, self.step)
        logger.logkv("images_per_sec", images_per_sec)
        row = logger.dumpkvs()
        loss = row.get("loss", row.get("train_loss"))
        if loss is not None:
            progress.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_sec:.1f}")

    def run_step(self, batch, cond):
        if self.seed is not None:
            seed_step(self.seed, self.rank, self.step)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.forward_backward(batch, cond)
        if self.mp_trainer.optimize(self.opt):
            for rate, params in zip(self.ema_rate, self.ema_params):
                update_ema(params, self.mp_trainer.master_params, rate=rate)
        logger.logkv("step", self.step + 1)
        logger.logkv("samples", (self.step + 1) * self.global_batch)
        logger.logkv("lr", self.opt.param_groups[0]["lr"])

    def lr_at(self, step: int) -> float:
        """Learning rate of the step that follows ``step`` completed ones (linear decay to 0 when annealing)."""
        if not self.lr_anneal_steps:
            return self.lr
        return self.lr * max(0.0, 1.0 - step / self.lr_anneal_steps)

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
        """Write the model, each EMA and the optimizer state at the current step (rank 0), atomically."""
        if self.rank == 0:
            files = [(model_checkpoint_name(self.step), self.mp_trainer.master_params)]
            files += [(ema_checkpoint_name(r, self.step), p) for r, p in zip(self.ema_rate, self.ema_params)]
            for name, params in files:
                logger.log(f"saving {name}...")
                state_dict = self.mp_trainer.master_params_to_state_dict(params)
                save_atomic(state_dict, os.path.join(self.checkpoint_dir, name))
            save_atomic(self.opt.state_dict(), os.path.join(self.checkpoint_dir, opt_checkpoint_name(self.step)))
        dist_util.barrier()
        self.last_saved_step = self.step


class TrainLoop(_TrainLoopBase):
    """ADM's diffusion training loop (same arguments) plus use_bf16, input_perturbation, max_steps, seed.

    For a resume identical to an uninterrupted run, give the same seed and data made with
    ``load_data(..., seed=..., start_batch=parse_resume_step_from_filename(resume_checkpoint))``.
    """

    def __init__(self, *, diffusion, schedule_sampler=None, input_perturbation=0.0, **kwargs):
        if input_perturbation < 0:
            raise UsageError(f"--input_perturbation must be >= 0 (DDPM-IP uses 0.1), got {input_perturbation}")
        self.diffusion = diffusion
        self.schedule_sampler = schedule_sampler or UniformSampler(diffusion)
        self.input_perturbation = input_perturbation
        super().__init__(**kwargs)

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
        if self.val_data is not None and self.step % self.eval_interval == 0:
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


# -- what the training scripts share ----------------------------------------------------------


def start_training(args) -> None:
    """Process group, log folder (--log_dir, else $OPENAI_LOGDIR or a temp folder, as ADM) and the
    seed of the initial weights (rank 0's are broadcast to the others)."""
    dist_util.setup_dist()
    logger.configure(dir=args.log_dir or None)
    torch.manual_seed(args.seed)


def train_loop_from_args(args, model, diffusion, data, schedule_sampler):
    """A TrainLoop configured by the flags of script_util.diffusion_training_defaults()."""
    return TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        ema_rate=args.ema_rate,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_fp16=args.use_fp16,
        use_bf16=args.use_bf16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        weight_decay=args.weight_decay,
        lr_anneal_steps=args.lr_anneal_steps,
        input_perturbation=args.input_perturbation,
        max_steps=args.max_steps,
        seed=args.seed,
    )

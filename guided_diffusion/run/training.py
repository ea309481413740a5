"""The training scripts' set-up, from their flags: image_train.py, classifier_train.py and
super_res_train.py each parse their flags and call one function here.

``train_image_model``, ``train_classifier`` and ``train_super_res_model`` check the flags (one line,
before anything is created: ``check_training_flags``), set up the ranks, build the network, claim
the log folder and continue the run already in it (``start_training``), load the data agreed
across ranks (``training_data``) and run the loop of guided_diffusion.train_util with the flags
(``train_loop_from_args``, ``classifier_train_loop_from_args``).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import os
import tempfile

import torch

from adm_common.errors import UsageError
from adm_common.files import acquire_lock, folder_lock_file, release_lock
from guided_diffusion import dist_util, logger
from guided_diffusion import script_util as su
from guided_diffusion.image_datasets import load_data, load_superres_data
from guided_diffusion.resample import create_named_schedule_sampler
from guided_diffusion.run.collective import together
from guided_diffusion.train_util import (
    ALLOW_INCOMPLETE_FLAG,
    ClassifierTrainLoop,
    TrainLoop,
    check_checkpoint_set,
    latest_complete_checkpoint,
    model_checkpoints,
    parse_ema_rates,
    parse_resume_step_from_filename,
    past_limit_refusal,
)

# -- the flags --------------------------------------------------------------------------------


def _argparser(description, *defaults) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    flags = {}
    for table in defaults:
        flags.update(table)
    su.add_dict_to_argparser(parser, flags)
    return parser


def image_train_argparser(description=None) -> argparse.ArgumentParser:
    """image_train.py's flags: ADM's training and model flags, then the new ones."""
    return _argparser(description, su.diffusion_training_defaults(), su.model_and_diffusion_defaults())


def classifier_train_argparser(description=None) -> argparse.ArgumentParser:
    """classifier_train.py's flags."""
    return _argparser(description, su.classifier_training_defaults(), su.classifier_and_diffusion_defaults())


def super_res_train_argparser(description=None) -> argparse.ArgumentParser:
    """super_res_train.py's flags."""
    return _argparser(description, su.diffusion_training_defaults(), su.sr_model_and_diffusion_defaults())


def _script_limits(args) -> list[tuple[int, str]]:
    """The step limits a training script's flags set, as (end step, flag)."""
    if hasattr(args, "iterations"):  # classifier_train.py: --iterations ends it, and anneals with --anneal_lr
        return [(args.iterations, "--iterations")]
    limits = []
    if args.max_steps >= 0:
        limits.append((args.max_steps, "--max_steps"))
    if args.lr_anneal_steps > 0:
        limits.append((args.lr_anneal_steps, "--lr_anneal_steps"))
    return limits


def _check_resume_step(args, found_in: str = "") -> None:
    """A --resume_checkpoint beyond the run's own end is refused by its name, before anything is read
    (a name without a step reads as step 0, which no limit is below)."""
    limits = _script_limits(args)
    if not args.resume_checkpoint or not limits:
        return
    step = parse_resume_step_from_filename(args.resume_checkpoint)
    end, flag = min(limits)
    if step > end:
        raise UsageError(found_in + past_limit_refusal(step, args.resume_checkpoint, end, flag))


def _check_folder_flag(flag: str, folder: str) -> None:
    from guided_diffusion.digits.data import is_digits_spec

    if not folder or is_digits_spec(folder):
        return
    if os.path.isfile(folder):
        raise UsageError(f"{flag} {folder} is a file; pass a folder of images, digits or digits:SIZE")
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder} does not exist; pass a folder of images, digits or digits:SIZE")


def check_training_flags(args) -> None:
    """Refuse, in one line and before anything is created, the flags of a training script that no
    run can use: sizes and counts below 1, a microbatch larger than the batch, negative step
    limits (--max_steps -1 is "no limit"), two input perturbations at once, a data folder or
    checkpoint that is not there. The loops check their own arguments again, for code that
    builds them directly; these are the checks that only the flags allow, or that must come
    before the log folder is made."""
    from guided_diffusion.run.pipeline import check_size_flags

    check_size_flags(args)
    fp16 = "--classifier_use_fp16" if hasattr(args, "classifier_use_fp16") else "--use_fp16"
    if getattr(args, fp16[2:]) and args.use_bf16:
        raise UsageError(f"{fp16} and --use_bf16 exclude each other; pick one")
    if args.batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {args.batch_size}")
    if args.microbatch > args.batch_size:
        raise UsageError(f"--microbatch {args.microbatch} is larger than --batch_size {args.batch_size}; use at most "
                         f"{args.batch_size} (or -1: the whole batch at once)")
    for name in ("log_interval", "save_interval", "eval_interval"):
        value = getattr(args, name, 1)
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    if hasattr(args, "iterations") and args.iterations < 0:
        raise UsageError(f"--iterations must be >= 0 (0: no training step), got {args.iterations}")
    if getattr(args, "max_steps", -1) < -1:
        raise UsageError(f"--max_steps must be >= 0 (-1, the default: no limit), got {args.max_steps}")
    if getattr(args, "lr_anneal_steps", 0) < 0:
        raise UsageError(f"--lr_anneal_steps must be >= 0 (0: no annealing, no end), got {args.lr_anneal_steps}")
    for name in ("lr", "weight_decay", "input_perturbation"):
        value = getattr(args, name, 0.0)
        if not value >= 0:  # NaN too
            raise UsageError(f"--{name} must be >= 0, got {value}")
    if getattr(args, "eps_scaler", 0.0) and getattr(args, "input_perturbation", 0.0):
        raise UsageError("--eps_scaler (ADM-ES's input perturbation) and --input_perturbation are the same "
                         "DDPM-IP perturbation; give one of them")
    parse_ema_rates(getattr(args, "ema_rate", ""))
    if not args.data_dir:
        raise UsageError("no data given; pass --data_dir a folder of images, digits or digits:SIZE")
    _check_folder_flag("--data_dir", args.data_dir)
    _check_folder_flag("--val_data_dir", getattr(args, "val_data_dir", ""))
    path = args.resume_checkpoint
    if path and os.path.isdir(path):
        raise UsageError(f"--resume_checkpoint {path} is a folder; pass a model*.pt written by training")
    if path and not os.path.isfile(path):
        raise UsageError(f"--resume_checkpoint {path} does not exist; pass a model*.pt written by training")
    _check_resume_step(args)


# -- the log folder and the run already in it -------------------------------------------------


class TrainingRun:
    """What start_training set up: the log folder, held by this run until ``close`` (or the end of the
    process); usable as a context manager."""

    def __init__(self, folder: str, lock_file):
        self.folder = folder
        self._lock_file = lock_file
        self.built = None  # what start_training's ``build`` returned

    def close(self) -> None:
        if self._lock_file is not None:
            release_lock(self._lock_file)
            self._lock_file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _log_folder_flag(args) -> str:
    return "--log_dir" if args.log_dir else "$OPENAI_LOGDIR"


def _claim_log_folder(folder: str, flag: str):
    """Create the log folder and hold its one-writer lock (rank 0); one line when it cannot be."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{flag} {folder} is a file, not a folder; choose another {flag}")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create {flag} {folder} ({exc.strerror or exc}); choose a writable {flag}") from None
    lock_file = folder_lock_file(folder)
    acquire_lock(lock_file, f"{flag} {folder}", f"wait for it to finish or choose another {flag}")
    return lock_file


def _resume_point(folder: str, args, flag: str):
    """The checkpoint a run with an empty --resume_checkpoint continues from: the newest complete set
    in its log folder (so that rerunning a stopped run's command resumes it), or None when the folder
    holds no checkpoint. Checkpoint files without a complete set are refused rather than overwritten."""
    ema_rates = parse_ema_rates(getattr(args, "ema_rate", ""))
    models = model_checkpoints(folder)
    if not models:
        return None
    found = latest_complete_checkpoint(folder, ema_rates)
    if found is not None:
        return str(found)
    newest = models[0][1]
    if args.allow_incomplete_resume:
        return str(newest)
    status = check_checkpoint_set(newest, ema_rates)
    raise UsageError(
        f"{flag} {folder} holds the checkpoints of an earlier run but no complete set ({newest.name}: "
        f"{status.describe()}); pass --resume_checkpoint {newest} {ALLOW_INCOMPLETE_FLAG} to continue from it, "
        f"or choose another {flag}"
    )


def _on_rank0(action):
    """``action()`` on rank 0, its result on every rank; a user error on rank 0 is raised on all of them."""
    result = together(action if dist_util.get_rank() == 0 else None)
    if dist_util.get_world_size() > 1:
        import torch.distributed as dist

        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def start_training(args, build=None) -> TrainingRun:
    """What every training script does first: check its flags (one line, nothing created), set up the
    process group, seed the initial weights (rank 0's are broadcast to the others), build the model
    (``build()``, whose result is ``run.built``: a model flag no network can take is refused before
    any folder is made), claim the log folder (--log_dir, else $OPENAI_LOGDIR, else a temp folder,
    as ADM; one run at a time: a second is refused in one line) and continue the run already in it.

    With an empty --resume_checkpoint, a log folder that holds complete checkpoint sets is continued
    from the newest (``args.resume_checkpoint`` is set to it), so rerunning the command of a stopped
    or preempted run resumes it; its log files are continued, not emptied.
    """
    check_training_flags(args)
    dist_util.setup_dist()
    torch.manual_seed(args.seed)  # nothing below draws from it before ``build`` (ADM's initial weights)
    built = build() if build is not None else None
    flag = _log_folder_flag(args)
    # rank 0 names the folder (ADM's time-stamped temp folder would differ from rank to rank)
    folder = _on_rank0(lambda: os.path.expanduser(args.log_dir or os.environ.get("OPENAI_LOGDIR") or os.path.join(
        tempfile.gettempdir(), datetime.datetime.now().strftime("openai-%Y-%m-%d-%H-%M-%S-%f"))))
    lock_file = _on_rank0(lambda: _claim_log_folder(folder, flag))
    run = TrainingRun(folder, lock_file if dist_util.get_rank() == 0 else None)
    run.built = built
    if dist_util.get_rank() == 0:
        atexit.register(run.close)
    try:
        resumed = None
        if not args.resume_checkpoint:
            resumed = _on_rank0(lambda: _resume_point(folder, args, flag))
            if resumed:
                args.resume_checkpoint = resumed
                _check_resume_step(args, f"the run in {flag} {folder} would resume from its newest set, but ")
        together(lambda: logger.configure(dir=folder, append=True))
        if resumed:
            logger.log(f"{flag} {folder} holds the checkpoint sets of an earlier run: resuming from {resumed}, "
                       f"the newest complete one (choose another {flag} to start afresh)")
    except BaseException:
        run.close()
        raise
    return run


# -- data and loops from the flags ----------------------------------------------------------


def training_data(args, data_dir=None, resumed=True, **options):
    """The batches of --data_dir (or ``data_dir``) with the flags every training script shares:
    --batch_size, --seed, --skip_bad_images, and, when ``resumed``, the batch the resumed step had
    reached. ``options`` go to load_data (``loader=load_superres_data`` with its sizes for
    super-resolution). Every rank loads its share; a rank's refusal stops all of them in one line."""
    loader = options.pop("loader", load_data)
    start_batch = parse_resume_step_from_filename(args.resume_checkpoint) if resumed else 0
    return together(lambda: loader(
        data_dir=data_dir or args.data_dir,
        batch_size=args.batch_size,
        seed=args.seed,
        start_batch=start_batch,
        skip_bad_images=args.skip_bad_images,
        **options,
    ))


def _loop_flags(args) -> dict:
    """The arguments both loops take from the flags of the same names."""
    return dict(
        batch_size=args.batch_size,
        microbatch=args.microbatch,
        lr=args.lr,
        weight_decay=args.weight_decay,
        log_interval=args.log_interval,
        save_interval=args.save_interval,
        resume_checkpoint=args.resume_checkpoint,
        use_bf16=args.use_bf16,
        seed=args.seed,
        allow_incomplete_resume=args.allow_incomplete_resume,
    )


def train_loop_from_args(args, model, diffusion, data, schedule_sampler) -> TrainLoop:
    """A TrainLoop configured by the flags of script_util.diffusion_training_defaults()."""
    return TrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        ema_rate=args.ema_rate,
        use_fp16=args.use_fp16,
        fp16_scale_growth=args.fp16_scale_growth,
        schedule_sampler=schedule_sampler,
        lr_anneal_steps=args.lr_anneal_steps,
        input_perturbation=args.input_perturbation,
        max_steps=None if args.max_steps == -1 else args.max_steps,
        **_loop_flags(args),
    )


def classifier_train_loop_from_args(args, model, diffusion, data, val_data, schedule_sampler) -> ClassifierTrainLoop:
    """A ClassifierTrainLoop configured by the flags of script_util.classifier_training_defaults()."""
    return ClassifierTrainLoop(
        model=model,
        diffusion=diffusion,
        data=data,
        val_data=val_data,
        noised=args.noised,
        schedule_sampler=schedule_sampler,
        eval_interval=args.eval_interval,
        lr_anneal_steps=args.iterations if args.anneal_lr else 0,
        max_steps=args.iterations,  # 0: no step, as ADM's range(iterations - resume_step)
        use_fp16=args.classifier_use_fp16,
        **_loop_flags(args),
    )


# -- the three scripts ----------------------------------------------------------------------


def _train(args, create, defaults, load, make_loop, what: str) -> None:
    """Build with ``create(**flags of defaults)``, then train on ``load(args)`` with ``make_loop``."""

    def build():
        model, diffusion = create(**su.args_to_dict(args, defaults().keys()))
        return model, diffusion, create_named_schedule_sampler(args.schedule_sampler, diffusion)

    with start_training(args, build) as run:
        model, diffusion, schedule_sampler = run.built
        model.to(dist_util.dev())
        logger.log("created model and diffusion; creating data loader...")
        data = load(args)
        logger.log(f"training{what}...")
        make_loop(model, diffusion, data, schedule_sampler).run_loop()


def train_image_model(args) -> None:
    """image_train.py: a diffusion model on --data_dir."""
    _train(
        args, su.create_model_and_diffusion, su.model_and_diffusion_defaults,
        lambda args: training_data(args, image_size=args.image_size, class_cond=args.class_cond,
                                   num_classes=args.num_classes),
        lambda *built: train_loop_from_args(args, *built), "",
    )


def train_super_res_model(args) -> None:
    """super_res_train.py: a diffusion model that also sees the image downsampled to --small_size."""
    _train(
        args, su.sr_create_model_and_diffusion, su.sr_model_and_diffusion_defaults,
        lambda args: training_data(args, loader=load_superres_data, large_size=args.large_size,
                                   small_size=args.small_size, class_cond=args.class_cond,
                                   num_classes=su.NUM_CLASSES),  # ADM's super-resolution models: ImageNet's classes
        lambda *built: train_loop_from_args(args, *built), "",
    )


def train_classifier(args) -> None:
    """classifier_train.py: a noise-aware classifier on --data_dir, scored on --val_data_dir."""

    def load(args):
        common = dict(image_size=args.image_size, class_cond=True, num_classes=args.num_classes)
        train = training_data(args, random_crop=True, **common)
        val = training_data(args, data_dir=args.val_data_dir, resumed=False, **common) if args.val_data_dir else None
        return train, val

    def make_loop(model, diffusion, data, schedule_sampler):
        train, val = data
        return classifier_train_loop_from_args(args, model, diffusion, train, val, schedule_sampler)

    _train(args, su.create_classifier_and_diffusion, su.classifier_and_diffusion_defaults, load, make_loop,
           " classifier model")

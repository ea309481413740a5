"""The tiny random-weight checkpoints and the script runner that the sampling-script tests share."""

import contextlib
import io
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from guided_diffusion import script_util as su

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_head_channels=16, diffusion_steps=40, noise_schedule="cosine", learn_sigma=True,
            use_new_attention_order=True, resblock_updown=True)
TINY_FLAGS = [f"--{k}={v}" for k, v in TINY.items()] + ["--timestep_respacing=6"]


def script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PYTHONPATH=str(ROOT))
    for name in ("OPENAI_LOGDIR", "MASTER_ADDR", "MASTER_PORT"):  # a script starts as from a fresh shell
        env.pop(name, None)
    return env


def run_script(name, *flags, launcher=(), check=True):
    cmd = [*launcher, sys.executable, str(ROOT / "scripts" / name), *flags]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=script_env(), timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _show_warning_on_stderr(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _warnings_as_a_child_shows_them():
    """Python's default warning filters (not pytest's), printed to stderr (not recorded by pytest)."""
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        warnings.showwarning = _show_warning_on_stderr
        yield


def run_in_process(name, *flags, check=True, env=None):
    """``scripts/NAME FLAGS`` (or NAME, an absolute path to a script) run in this process as
    ``run_script`` runs it in a child, with its exit status, stdout and stderr as a
    CompletedProcess. It spares the child's interpreter and torch import (3 s of CPU each) where a test is about what a script does or refuses, not about
    how a process ends (signals, kill -9, launchers, exit codes of real processes stay with
    ``run_script``). The environment is a fresh shell's as ``script_env`` makes it, plus ``env``,
    and torch runs on the threads that environment gives a child, so float round-off is a child's;
    warnings are filtered and printed as a child prints them (one on stderr fails a one-line check).
    Afterwards the process group the script set up is destroyed, the folder locks it holds "until
    the process ends" are released (their files removed, as at a child's exit), ADM's logger is the
    one before, and the environment, torch's threads and the global random states (torch, NumPy,
    Python) are as they were.
    """
    import random

    import numpy as np
    import torch.distributed as dist

    from adm_common import files
    from guided_diffusion import logger

    was_initialized = dist.is_initialized()
    held_before, logger_before = set(files._HELD), logger.Logger.CURRENT
    saved_environ, saved_argv, saved_threads = dict(os.environ), sys.argv, torch.get_num_threads()
    saved_random = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    fresh = dict(script_env(), **(env or {}))
    os.environ.clear()
    os.environ.update(fresh)
    torch.set_num_threads(int(fresh["OMP_NUM_THREADS"]))
    sys.argv = [str(ROOT / "scripts" / name if not Path(name).is_absolute() else name), *flags]
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _warnings_as_a_child_shows_them():
            runpy.run_path(sys.argv[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_environ)
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(saved_random[0])
        np.random.set_state(saved_random[1])
        random.setstate(saved_random[2])
        if not was_initialized and dist.is_initialized():
            dist.destroy_process_group()
        for key in set(files._HELD) - held_before:
            files._HELD[key][1] = 1
            files.release_lock(key)
        if logger.Logger.CURRENT is not logger_before:
            if logger.Logger.CURRENT not in (None, logger.Logger.DEFAULT):
                logger.Logger.CURRENT.close()
            logger.Logger.CURRENT = logger_before
    proc = subprocess.CompletedProcess([name, *flags], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"{name} failed ({code}):\n{proc.stderr[-3000:]}")
    return proc


def _randomized(net):
    """ADM zero-initialises output layers; perturb every weight so all branches matter."""
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.state_dict()


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    uncond = dict(su.model_and_diffusion_defaults(), **TINY)
    model, _ = su.create_model_and_diffusion(**uncond)
    torch.save(_randomized(model), folder / "uncond.pt")
    cond = dict(uncond, class_cond=True, num_classes=10)
    model, _ = su.create_model_and_diffusion(**cond)
    torch.save(_randomized(model), folder / "cond.pt")
    classifier = su.create_classifier(8, False, 32, 1, "4", True, True, "attention", classifier_channel_mult="1,2",
                                      num_classes=10)
    torch.save(_randomized(classifier), folder / "classifier.pt")
    return folder



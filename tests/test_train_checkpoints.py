"""Training checkpoints are a set: model, EMA and optimizer files of a step become complete together.

A kill -9 or a full disk at any moment of a save leaves the earlier sets usable; resuming from an
incomplete or damaged set is refused in one line (exit status 2 from the scripts) unless
--allow_incomplete_resume says to continue without the missing pieces; an EMA or optimizer state
of another model is refused before the model is touched. The files stay ADM's: plain torch.save
state_dicts under ADM's names.
"""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guided_diffusion import dist_util, logger, train_util
from adm_common.errors import UsageError
from guided_diffusion.image_datasets import load_data
from guided_diffusion.train_util import (
    TrainLoop,
    check_checkpoint_set,
    latest_complete_checkpoint,
    write_checkpoint_set,
)
from training_setup import REPO, TINY_FLAGS, cli_status, load, tiny_model_and_diffusion, train_command
from training_setup import make_loop as tiny_loop

pytest.importorskip("sklearn")

@pytest.fixture(autouse=True)
def cpu_quiet_logger(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(dist_util, "dev", lambda: torch.device("cpu"))
    logger.configure(dir=str(tmp_path_factory.mktemp("log")), format_strs=(), rank=0)


def make_loop(folder, resume="", max_steps=2, **overrides):
    return tiny_loop(folder, resume=resume, batch_size=4, max_steps=max_steps, **overrides)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir()}


def adm_step_from_filename(filename):
    """ADM's parse_resume_step_from_filename, as ADM's tools read the names (split at "model")."""
    split = str(filename).split("model")
    if len(split) < 2:
        return 0
    try:
        return int(split[-1].split(".")[0])
    except ValueError:
        return 0


# -- what a save writes ---------------------------------------------------------------------------


def test_a_save_is_adms_files_plus_a_record_written_last(tmp_path):
    loop = make_loop(tmp_path, max_steps=2, ema_rate="0.9,0.99")
    loop.run_loop()
    names = {"model000002.pt", "ema_0.9_000002.pt", "ema_0.99_000002.pt", "opt000002.pt"}
    assert set(os.listdir(tmp_path)) == names | {"checkpoint000002.json"}
    record = json.loads((tmp_path / "checkpoint000002.json").read_text())
    assert record["step"] == 2 and set(record["files"]) == names
    for name, entry in record["files"].items():  # sizes and hashes of the bytes on disk
        assert entry == {"bytes": (tmp_path / name).stat().st_size, "sha256": sha256(tmp_path / name)}
    # ADM's tools: plain state_dicts under ADM's names, the step where ADM's parser finds it
    model_sd = load(tmp_path / "model000002.pt")
    assert list(model_sd) == list(loop.model.state_dict())
    assert all(torch.equal(model_sd[k], v) for k, v in loop.model.state_dict().items())
    assert list(load(tmp_path / "ema_0.99_000002.pt")) == list(loop.model.state_dict())
    assert set(load(tmp_path / "opt000002.pt")) == {"state", "param_groups"}
    assert adm_step_from_filename(tmp_path / "model000002.pt") == 2
    assert adm_step_from_filename(tmp_path / "checkpoint000002.json") == 0  # not taken for a model
    assert check_checkpoint_set(tmp_path / "model000002.pt", [0.9, 0.99]).complete


# -- a full disk at any moment of a save ---------------------------------------------------------


def _fail_at(monkeypatch, moment):
    """Make the save of the next set raise ENOSPC at ``moment``: the n-th file written (after part of
    it is), or the n-th rename (the first and the fifth are the record's: pending, then final)."""
    calls = {"save": 0, "replace": 0}
    real_save, real_replace = torch.save, os.replace
    disk_full = OSError(errno.ENOSPC, "No space left on device")

    def save(obj, f, *args, **kwargs):
        calls["save"] += 1
        if moment == f"write{calls['save']}":
            f.write(b"PK\x03\x04 partial")
            raise disk_full
        return real_save(obj, f, *args, **kwargs)

    def replace(src, dst):
        calls["replace"] += 1
        if moment == f"rename{calls['replace']}":
            raise disk_full
        return real_replace(src, dst)

    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(os, "replace", replace)


@pytest.mark.parametrize("moment", ["write1", "write2", "write3", "rename1", "rename2", "rename3", "rename4",
                                    "rename5"])
def test_a_full_disk_during_a_save_leaves_the_earlier_set_usable(tmp_path, monkeypatch, moment):
    loop = make_loop(tmp_path, max_steps=1)
    loop.run_loop()
    before = snapshot(tmp_path)
    loop.max_steps = 2
    _fail_at(monkeypatch, moment)
    with pytest.raises(UsageError, match="no space left on device writing"):
        loop.run_loop()
    monkeypatch.undo()
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # the set of step 1, byte for byte
    assert all(".tmp" not in name for name in after)  # nothing temporary left behind
    new = tmp_path / "model000002.pt"
    assert not new.exists() or not check_checkpoint_set(new, [0.9]).complete
    assert latest_complete_checkpoint(tmp_path, [0.9]) == tmp_path / "model000001.pt"
    resumed = make_loop(tmp_path / "resumed", resume=tmp_path / "model000001.pt")
    assert resumed.resume_step == 1


def test_a_failed_save_of_the_same_step_keeps_the_old_set_until_the_renames(tmp_path, monkeypatch):
    loop = make_loop(tmp_path, max_steps=1)
    loop.run_loop()
    before = snapshot(tmp_path)
    _fail_at(monkeypatch, "write3")  # the optimizer file of a second save at step 1
    with pytest.raises(UsageError, match="no space left"):
        loop.save()
    assert snapshot(tmp_path) == before
    _fail_at(monkeypatch, "rename3")  # files half replaced: the set must not pass for complete
    with pytest.raises(UsageError, match="no space left"):
        loop.save()
    monkeypatch.undo()
    status = check_checkpoint_set(tmp_path / "model000001.pt", [0.9])
    assert not status.complete and status.missing == ["checkpoint000001.json (the save of step 1 did not finish)"]


# -- kill -9 at any moment of a save -------------------------------------------------------------

FLAGS = ["--data_dir", "digits", "--batch_size", "4", *TINY_FLAGS, "--save_interval", "2", "--seed", "0"]

# Runs image_train.py and kills itself with SIGKILL while it saves the set of step 4: in the middle
# of writing the EMA file, or right after model000004.pt is renamed into place.
KILLER = r"""
import os, runpy, signal, sys
import torch
from guided_diffusion import train_util
moment, script, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
real_write, real_save, real_replace = train_util.write_checkpoint_set, torch.save, os.replace
armed = {"on": False, "saves": 0}
def write_checkpoint_set(folder, step, states):
    armed["on"] = step == 4
    return real_write(folder, step, states)
def save(obj, f, *a, **k):
    if armed["on"]:
        armed["saves"] += 1
        if moment == "writing" and armed["saves"] == 2:
            f.write(b"PK\x03\x04 half an EMA file")
            os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *a, **k)
def replace(src, dst):
    real_replace(src, dst)
    if armed["on"] and moment == "renaming" and os.path.basename(dst).startswith("model"):
        os.kill(os.getpid(), signal.SIGKILL)
train_util.write_checkpoint_set = write_checkpoint_set
torch.save = save
os.replace = replace
sys.argv = [script, *argv]
runpy.run_path(script, run_name="__main__")
"""


@pytest.mark.parametrize("moment", ["writing", "renaming"])
def test_kill_9_during_a_save_leaves_the_previous_set_and_resume_uses_it(
    tmp_path, moment, script_process_group, capsys
):
    killed = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, moment, str(REPO / "scripts" / "image_train.py"), *FLAGS,
         "--max_steps", "4", "--log_dir", str(killed)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    names = set(os.listdir(killed))
    assert {"model000002.pt", "ema_0.9_000002.pt", "opt000002.pt", "checkpoint000002.json"} <= names
    if "checkpoint000004.json" in names:  # the record of step 4 never became final
        assert json.loads((killed / "checkpoint000004.json").read_text())["pending"] is True
    assert any(".tmp" in n for n in names)  # the kill left its temporary files, which nothing reads
    assert check_checkpoint_set(killed / "model000002.pt", [0.9]).complete
    assert latest_complete_checkpoint(killed, [0.9]) == killed / "model000002.pt"

    if moment == "renaming":  # model000004.pt is in place, the rest of its set is not
        assert "model000004.pt" in names and "opt000004.pt" not in names
        code, err, _ = cli_status(
            "image_train", FLAGS + ["--max_steps", "6", "--log_dir", str(tmp_path / "refused"),
                                    "--resume_checkpoint", str(killed / "model000004.pt")], capsys)
        assert code == 2 and len(err.splitlines()) == 1
        assert err.startswith("error: cannot resume from") and "incomplete" in err
        assert "ema_0.9_000004.pt" in err and "opt000004.pt" in err and "checkpoint000004.json" in err
        assert str(killed / "model000002.pt") in err and "--allow_incomplete_resume True" in err
        assert not (tmp_path / "refused" / "model000006.pt").exists()
    else:
        assert "model000004.pt" not in names

    # the previous set resumes, and the run ends where an uninterrupted one does
    resumed, straight = tmp_path / "resumed", tmp_path / "straight"
    train_command("image_train", FLAGS + ["--max_steps", "4", "--log_dir", str(resumed),
                                          "--resume_checkpoint", str(killed / "model000002.pt")])
    train_command("image_train", FLAGS + ["--max_steps", "4", "--log_dir", str(straight)])
    for name in ("model000004.pt", "ema_0.9_000004.pt"):
        a, b = load(resumed / name), load(straight / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


# -- resuming from incomplete or damaged sets ----------------------------------------------------


@pytest.fixture
def two_sets(tmp_path):
    """A folder with the complete sets of steps 1 and 2."""
    folder = tmp_path / "run"
    loop = make_loop(folder, max_steps=2, save_interval=1)
    loop.run_loop()
    return folder


@pytest.mark.parametrize("damage,named", [
    ("remove opt", "missing opt000002.pt"),
    ("remove ema", "missing ema_0.9_000002.pt"),
    ("remove record", "missing checkpoint000002.json (the save of step 2 did not finish)"),
    ("flip a byte of the ema", "ema_0.9_000002.pt not as saved"),
    ("truncate the opt", "opt000002.pt not as saved"),
])
def test_an_incomplete_set_is_refused_in_one_line_naming_what_is_missing(two_sets, tmp_path, damage, named):
    if damage == "remove opt":
        (two_sets / "opt000002.pt").unlink()
    elif damage == "remove ema":
        (two_sets / "ema_0.9_000002.pt").unlink()
    elif damage == "remove record":
        (two_sets / "checkpoint000002.json").unlink()
    elif damage == "flip a byte of the ema":
        data = bytearray((two_sets / "ema_0.9_000002.pt").read_bytes())
        data[len(data) // 2] ^= 1
        (two_sets / "ema_0.9_000002.pt").write_bytes(bytes(data))
    else:
        data = (two_sets / "opt000002.pt").read_bytes()
        (two_sets / "opt000002.pt").write_bytes(data[: len(data) // 2])
    model, diffusion = tiny_model_and_diffusion(init_seed=7)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as info:
        make_loop(tmp_path / "new", resume=two_sets / "model000002.pt", model_and_diffusion=(model, diffusion))
    message = str(info.value)
    assert "\n" not in message and named in message
    assert f"resume from {two_sets / 'model000001.pt'}, the newest complete set" in message
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())  # nothing loaded


def test_allow_incomplete_resume_continues_without_the_missing_pieces(two_sets, tmp_path):
    (two_sets / "opt000002.pt").unlink()
    loop = make_loop(tmp_path / "a", resume=two_sets / "model000002.pt", allow_incomplete_resume=True)
    assert loop.resume_step == 2 and loop.opt.state_dict()["state"] == {}  # a fresh optimizer
    ema = load(two_sets / "ema_0.9_000002.pt")
    assert all(torch.equal(e, ema[n]) for e, (n, _) in zip(loop.ema_params[0], loop.model.named_parameters()))

    (two_sets / "ema_0.9_000002.pt").unlink()
    loop = make_loop(tmp_path / "b", resume=two_sets / "model000002.pt", allow_incomplete_resume=True)
    assert all(torch.equal(e, p) for e, p in zip(loop.ema_params[0], loop.model.parameters()))
    loop.run_loop()  # and it trains on
    assert loop.completed_steps == 2 and loop.step == 0
    loop.max_steps = 3
    loop.run_loop()
    assert check_checkpoint_set(tmp_path / "b" / "model000003.pt", [0.9]).complete


def test_a_damaged_model_file_is_refused_even_when_incomplete_sets_are_allowed(two_sets, tmp_path):
    data = bytearray((two_sets / "model000002.pt").read_bytes())
    data[-100] ^= 1
    (two_sets / "model000002.pt").write_bytes(bytes(data))
    with pytest.raises(UsageError, match="model000002.pt: the file is not as its save recorded"):
        make_loop(tmp_path / "new", resume=two_sets / "model000002.pt", allow_incomplete_resume=True)


def test_adm_layout_without_records_resumes_when_every_file_is_there(two_sets, tmp_path):
    for record in two_sets.glob("checkpoint*.json"):
        record.unlink()  # as ADM's own training writes a folder
    loop = make_loop(tmp_path / "a", resume=two_sets / "model000002.pt")
    assert loop.resume_step == 2 and loop.opt.state_dict()["state"]
    (two_sets / "opt000002.pt").unlink()
    with pytest.raises(UsageError, match=r"incomplete \(missing opt000002.pt\)"):
        make_loop(tmp_path / "b", resume=two_sets / "model000002.pt")


def test_the_script_refuses_an_incomplete_set_with_status_2(two_sets, tmp_path, script_process_group, capsys):
    (two_sets / "opt000002.pt").unlink()
    code, err, _ = cli_status("image_train", FLAGS + [
        "--max_steps", "3", "--log_dir", str(tmp_path / "log"), "--resume_checkpoint", str(two_sets / "model000002.pt"),
    ], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "missing opt000002.pt" in err


# -- states of another model ----------------------------------------------------------------------


def _set_with(folder, step, model_sd, ema_sd, opt_sd):
    """A complete, recorded set whose files hold what is given."""
    folder.mkdir(parents=True, exist_ok=True)
    write_checkpoint_set(folder, step, [
        (f"model{step:06d}.pt", model_sd), (f"ema_0.9_{step:06d}.pt", ema_sd), (f"opt{step:06d}.pt", opt_sd),
    ])
    return folder / f"model{step:06d}.pt"


def _states_of(loop):
    return loop.model.state_dict(), loop.opt.state_dict()


@pytest.mark.parametrize("wrong", ["ema", "opt", "fp16 opt"])
def test_a_state_of_another_model_is_refused_before_anything_changes(tmp_path, wrong):
    small = make_loop(tmp_path / "small", max_steps=1)
    small.run_loop()
    if wrong == "fp16 opt":
        other = make_loop(tmp_path / "fp16", max_steps=1, model_and_diffusion=tiny_model_and_diffusion(use_fp16=True),
                          use_fp16=True)
    else:
        other = make_loop(tmp_path / "big", max_steps=1, model_and_diffusion=tiny_model_and_diffusion(num_channels=64))
    other.run_loop()
    model_sd, opt_sd = _states_of(small)
    other_model_sd, other_opt_sd = _states_of(other)
    if wrong == "ema":
        path = _set_with(tmp_path / "set", 1, model_sd, other_model_sd, opt_sd)
        expected = "ema_0.9_000001.pt does not fit this model"
    else:
        path = _set_with(tmp_path / "set", 1, model_sd, model_sd, other_opt_sd)
        expected = "opt000001.pt does not fit this model"
    before = snapshot(tmp_path / "set")
    model, diffusion = tiny_model_and_diffusion(init_seed=3)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UsageError) as info:
        make_loop(tmp_path / "resumed", resume=path, model_and_diffusion=(model, diffusion))
    message = str(info.value)
    assert expected in message and "\n" not in message
    if wrong == "fp16 opt":
        assert "--use_fp16 True" in message
    elif wrong == "opt":
        assert "exp_avg of shape" in message
    assert all(torch.equal(initial[k], v) for k, v in model.state_dict().items())  # not half-loaded
    assert snapshot(tmp_path / "set") == before
    assert not list((tmp_path / "resumed").iterdir())


# -- ADM's hooks for other storage ----------------------------------------------------------------


def test_find_resume_checkpoint_and_get_blob_logdir_can_be_replaced(two_sets, tmp_path, monkeypatch):
    elsewhere = tmp_path / "blob"
    elsewhere.mkdir()
    monkeypatch.setattr(train_util, "find_resume_checkpoint", lambda: latest_complete_checkpoint(two_sets, [0.9]))
    monkeypatch.setattr(train_util, "get_blob_logdir", lambda: str(elsewhere))
    model, diffusion = tiny_model_and_diffusion()
    data = load_data(data_dir="digits", batch_size=4, image_size=8, seed=1, start_batch=2)
    loop = TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=4, microbatch=-1, lr=1e-3,
                     ema_rate="0.9", log_interval=1000, save_interval=1000, resume_checkpoint="", max_steps=3)
    assert loop.resume_step == 2
    loop.run_loop()
    assert check_checkpoint_set(elsewhere / "model000003.pt", [0.9]).complete

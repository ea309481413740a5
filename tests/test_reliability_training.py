"""The training scripts (and the small scripts beside them) under the faults a long run meets, run as
a user runs them: typos in flags and paths, a log folder that cannot be written or is in use, step
limits of 0 or already reached, damaged images, labels the model has no output for, damaged
checkpoint files, a full disk, SIGTERM (preemption) mid-run and mid-save. Each user error ends with
exit status 2 and one ``error:`` line, no traceback, and nothing half-written; a stopped run is
resumed by rerunning its command, and ends with the bytes of an uninterrupted run.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from guided_diffusion import dist_util, logger
from adm_common.errors import UsageError
from guided_diffusion.image_datasets import ImageDataset, UnreadableImage, load_data
from guided_diffusion.train_util import check_checkpoint_set, latest_complete_checkpoint
from sample_scripts import run_in_process
from training_setup import REPO, TINY_FLAGS, cli_status, load, one_line

pytest.importorskip("sklearn")

MPIRUN = ("mpirun", "-n", "2", "--oversubscribe", "--allow-run-as-root")
DIGITS = ["--data_dir", "digits", "--batch_size", "8", *TINY_FLAGS]
CLASSIFIER = ["--data_dir", "digits", "--image_size", "8", "--num_classes", "10", "--classifier_width", "64",
              "--classifier_depth", "1", "--classifier_channel_mult", "1", "--classifier_attention_resolutions", "",
              "--classifier_pool", "adaptive", "--batch_size", "8", "--diffusion_steps", "50"]
SUPER_RES = ["--data_dir", "digits:16", "--large_size", "16", "--small_size", "8", "--num_channels", "32",
             "--num_res_blocks", "1", "--attention_resolutions", "", "--diffusion_steps", "50", "--batch_size", "2"]


@pytest.fixture(autouse=True)
def cpu_and_a_clean_logger(monkeypatch):
    monkeypatch.setattr(dist_util, "dev", lambda: torch.device("cpu"))
    for name in ("OPENAI_LOGDIR", "OPENAI_LOG_FORMAT", "OPENAI_LOG_FORMAT_MPI"):
        monkeypatch.delenv(name, raising=False)
    previous = logger.Logger.CURRENT
    yield
    current = logger.Logger.CURRENT
    if current is not None and current is not logger.Logger.DEFAULT and current is not previous:
        current.close()
    logger.Logger.CURRENT = previous


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env.pop("OPENAI_LOGDIR", None)
    env.update(extra)
    return env


def _run(script, *argv, launcher=(), **env):
    return subprocess.run([*launcher, sys.executable, str(REPO / "scripts" / script), *argv], env=_env(**env),
                          cwd=REPO, capture_output=True, text=True, timeout=600)


def _only_line(proc):
    """The one stderr line of a failed script (exit 2, no traceback, nothing else on stderr)."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def _no_leftovers(folder):
    names = os.listdir(folder)
    assert not [n for n in names if ".tmp" in n], names
    assert ".lock" not in names, names


# -- flags: one line, before anything is created ------------------------------------------------


@pytest.mark.parametrize("script,flags,expected", [
    ("image_train", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
    ("image_train", ["--microbatch", "16"], "--microbatch 16 is larger than --batch_size 8"),
    ("image_train", ["--image_size", "0"], "--image_size must be at least 1, got 0"),
    ("image_train", ["--num_channels", "0"], "--num_channels must be at least 1, got 0"),
    ("image_train", ["--save_interval", "0"], "--save_interval must be at least 1, got 0"),
    ("image_train", ["--log_interval", "-5"], "--log_interval must be at least 1, got -5"),
    ("image_train", ["--max_steps", "-2"], "--max_steps must be >= 0 (-1, the default: no limit), got -2"),
    ("image_train", ["--lr_anneal_steps", "-1"], "--lr_anneal_steps must be >= 0"),
    ("image_train", ["--lr=-1e-4"], "--lr must be >= 0"),
    ("image_train", ["--ema_rate", "0.99,fast"], "cannot read --ema_rate"),
    ("image_train", ["--data_dir", "NOWHERE"], "--data_dir NOWHERE does not exist"),
    ("image_train", ["--data_dir", "A_FILE"], "--data_dir A_FILE is a file"),
    ("image_train", ["--resume_checkpoint", "NOWHERE/model000002.pt"], "does not exist"),
    ("image_train", ["--resume_checkpoint", "A_FOLDER"], "is a folder"),
    ("classifier_train", ["--iterations", "-1"], "--iterations must be >= 0 (0: no training step), got -1"),
    ("classifier_train", ["--eval_interval", "0"], "--eval_interval must be at least 1, got 0"),
    ("classifier_train", ["--num_classes", "0"], "--num_classes must be at least 1, got 0"),
    ("classifier_train", ["--classifier_width", "0"], "--classifier_width must be at least 1, got 0"),
    ("super_res_train", ["--small_size", "0"], "--small_size must be at least 1, got 0"),
    ("super_res_train", ["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
])
def test_a_flag_no_run_can_use_is_one_line_and_creates_nothing(tmp_path, script, flags, expected, capsys,
                                                               script_process_group):
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    flags = [f.replace("NOWHERE", str(tmp_path / "nowhere")).replace("A_FILE", str(tmp_path / "a_file"))
             .replace("A_FOLDER", str(tmp_path / "a_folder")) for f in flags]
    base = {"image_train": DIGITS + ["--max_steps", "1"], "classifier_train": CLASSIFIER + ["--iterations", "1"],
            "super_res_train": SUPER_RES + ["--max_steps", "1"]}[script]
    code, err, _ = cli_status(script, base + flags + ["--log_dir", str(tmp_path / "log")], capsys)
    line = one_line(code, err)
    assert expected.replace("NOWHERE", str(tmp_path / "nowhere")).replace("A_FILE", str(tmp_path / "a_file")) in line
    assert not (tmp_path / "log").exists()


def test_a_log_folder_that_cannot_be_written_is_one_line(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        ({}, ["--log_dir", str(a_file)], f"error: --log_dir {a_file} is a file, not a folder; choose another --log_dir"),
        ({}, ["--log_dir", str(a_file / "sub")], f"error: cannot create --log_dir {a_file / 'sub'} (Not a directory)"),
        ({}, ["--log_dir", "/proc/no/such"], "error: cannot create --log_dir /proc/no/such"),
        ({"OPENAI_LOGDIR": str(a_file)}, [], f"error: $OPENAI_LOGDIR {a_file} is a file, not a folder"),
    ]
    for env, flags, expected in cases:
        line = _only_line(run_in_process("image_train.py", *DIGITS, "--max_steps", "1", *flags, check=False, env=env))
        assert line.startswith(expected), line
    assert a_file.read_text() == "x"


def test_a_second_run_on_a_log_folder_in_use_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code = ("import sys, time; from adm_common.files import acquire_lock; "
            "acquire_lock(sys.argv[1], 'x'); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / ".lock")], stdout=subprocess.PIPE, env=_env())
    try:
        assert holder.stdout.readline().strip() == b"held"
        line = _only_line(_run("image_train.py", *DIGITS, "--max_steps", "1", "--log_dir", str(run)))
        assert f"--log_dir {run} is in use by another run (pid {holder.pid}" in line
        assert sorted(os.listdir(run)) == [".lock"]  # no log file of the refused run, nothing emptied
    finally:
        holder.kill()
        holder.wait()


# -- step limits ------------------------------------------------------------------------------------


def test_zero_iterations_and_zero_max_steps_take_no_step(tmp_path, capsys, script_process_group):
    # ADM's classifier loop is range(iterations - resume_step): 0 iterations, no step
    code, err, out = cli_status("classifier_train",
                                CLASSIFIER + ["--iterations", "0", "--log_dir", str(tmp_path / "c")], capsys)
    assert (code, err) == (0, "")
    assert "--iterations 0: the run ends at step 0, before its first step; nothing was trained or saved" in out
    code, err, out = cli_status("image_train", DIGITS + ["--max_steps", "0", "--log_dir", str(tmp_path / "d")], capsys)
    assert (code, err) == (0, "")
    assert "--max_steps 0: the run ends at step 0" in out
    for folder in (tmp_path / "c", tmp_path / "d"):
        assert sorted(os.listdir(folder)) == ["log.txt", "progress.csv"]  # no checkpoint, no lock left


def test_a_limit_reached_by_the_resumed_step_exits_0_and_one_past_it_is_refused(tmp_path, capsys,
                                                                                 script_process_group):
    run = tmp_path / "run"
    assert cli_status("classifier_train", CLASSIFIER + ["--iterations", "2", "--log_dir", str(run)], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".json")}
    assert set(before) == {"model000002.pt", "opt000002.pt", "checkpoint000002.json"}
    # the same command again (a requeued job): nothing to train, status 0, nothing rewritten
    code, err, out = cli_status("classifier_train", CLASSIFIER + ["--iterations", "2", "--log_dir", str(run)], capsys)
    assert (code, err) == (0, "")
    assert (f"nothing to train: {run / 'model000002.pt'} is step 2, where --iterations 2 ends the run; "
            "raise --iterations to train further") in out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".json")} == before
    # a smaller limit than the step already reached: refused, in this folder and from another
    code, err, _ = cli_status("classifier_train", CLASSIFIER + ["--iterations", "1", "--log_dir", str(run)], capsys)
    assert "is step 2, past the end that --iterations 1 sets" in one_line(code, err)
    code, err, _ = cli_status("image_train", DIGITS + ["--max_steps", "1", "--log_dir", str(tmp_path / "other"),
                                                       "--resume_checkpoint", str(tmp_path / "x" / "model000005.pt")],
                              capsys)
    assert "does not exist" in one_line(code, err)
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "model000005.pt").write_bytes(b"")  # refused by its name, before it is read
    code, err, _ = cli_status("image_train", DIGITS + ["--lr_anneal_steps", "3", "--log_dir", str(tmp_path / "other"),
                                                       "--resume_checkpoint", str(tmp_path / "x" / "model000005.pt")],
                              capsys)
    assert "model000005.pt is step 5, past the end that --lr_anneal_steps 3 sets" in one_line(code, err)
    assert not (tmp_path / "other").exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix in (".pt", ".json")} == before
    _no_leftovers(run)


# -- preemption: SIGTERM mid-run and mid-save, then the same command again -------------------------

SIGTERM_AT_RENAME = """
import os, signal, sys, runpy
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if os.path.basename(dst) == "model000004.pt":
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's preemption, in the middle of a save
os.replace = replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _finals(folder, step):
    return {name: load(Path(folder) / name) for name in (f"model{step:06d}.pt", f"ema_0.9_{step:06d}.pt")}


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k][t], b[k][t]) for k in a for t in a[k])


def test_sigterm_during_training_leaves_a_resumable_run_and_the_same_command_finishes_it(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    argv = [*DIGITS, "--max_steps", "3000", "--save_interval", "3", "--log_interval", "1", "--log_dir", str(run)]
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "image_train.py"), *argv], env=_env(), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (
            (run / "checkpoint000003.json").exists() and check_checkpoint_set(run / "model000003.pt", [0.9]).complete):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert [line for line in err.splitlines() if line.strip()] == [
        "error: terminated (SIGTERM); rerun the same command to resume"]
    _no_leftovers(run)
    newest = latest_complete_checkpoint(run, [0.9])
    assert newest is not None
    rows_before = (run / "progress.csv").read_text().splitlines()
    # the same command, with an end the run has not reached: it continues from the newest complete set
    end = int(newest.name[5:11]) + 2
    argv[argv.index("3000")] = str(end)
    proc = _run("image_train.py", *argv)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"resuming from {newest}" in proc.stdout
    _no_leftovers(run)
    rows_after = (run / "progress.csv").read_text().splitlines()
    assert rows_after[: len(rows_before)] == rows_before and len(rows_after) > len(rows_before)  # history kept
    argv[argv.index(str(run))] = str(straight)
    run_in_process("image_train.py", *argv)
    assert _equal(_finals(run, end), _finals(straight, end))


def test_sigterm_during_a_save_leaves_the_previous_set_and_the_same_command_finishes_the_run(tmp_path):
    run, straight = tmp_path / "run", tmp_path / "straight"
    argv = [*DIGITS, "--max_steps", "6", "--save_interval", "2", "--log_dir", str(run)]
    proc = subprocess.run([sys.executable, "-c", SIGTERM_AT_RENAME, str(REPO / "scripts" / "image_train.py"), *argv],
                          env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "error: terminated (SIGTERM); rerun the same command to resume"]
    _no_leftovers(run)  # the interrupted save's temporary files are removed, the lock released
    assert check_checkpoint_set(run / "model000002.pt", [0.9]).complete
    assert not check_checkpoint_set(run / "model000004.pt", [0.9]).complete  # renamed, but its set never finished
    proc = run_in_process("image_train.py", *argv)
    assert f"resuming from {run / 'model000002.pt'}" in proc.stdout
    argv[argv.index(str(run))] = str(straight)
    run_in_process("image_train.py", *argv)
    assert _equal(_finals(run, 6), _finals(straight, 6)) and _equal(_finals(run, 4), _finals(straight, 4))
    _no_leftovers(run)


def test_checkpoint_files_without_a_complete_set_are_not_overwritten_by_a_fresh_run(tmp_path, capsys,
                                                                                  script_process_group):
    run = tmp_path / "run"
    assert cli_status("image_train", DIGITS + ["--max_steps", "2", "--log_dir", str(run)], capsys)[0] == 0
    (run / "opt000002.pt").unlink()
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".pt"}
    code, err, _ = cli_status("image_train", DIGITS + ["--max_steps", "4", "--log_dir", str(run)], capsys)
    line = one_line(code, err)
    assert "holds the checkpoints of an earlier run but no complete set (model000002.pt: missing opt000002.pt)" in line
    assert f"--resume_checkpoint {run / 'model000002.pt'} --allow_incomplete_resume True" in line
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.suffix == ".pt"} == before


# -- a full disk --------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = shutil.which("mount") and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        logger.reset()  # an in-process run's log files are open on the disk: close them, or umount is refused
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_full_disk_during_a_save_or_a_log_write_is_one_line_and_the_same_command_resumes(tmp_path, small_disk):
    run = small_disk / "run"
    argv = [*DIGITS, "--max_steps", "3", "--log_dir", str(run)]
    # a set (model 0.8 MB, EMA 0.8 MB, optimizer 1.5 MB) does not fit in 1 MB
    line = _only_line(run_in_process("image_train.py", *argv, check=False))
    assert line.startswith(f"error: no space left on device writing {run}/") and "rerun the same command" in line
    _no_leftovers(run)
    assert not list(run.glob("*.pt")) and not list(run.glob("checkpoint*.json"))
    # a disk so full that the log cannot grow
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024 - 8192))
    line = _only_line(run_in_process("image_train.py", *argv, "--log_interval", "1", check=False))
    assert line.startswith("error: no space left on device writing") and "rerun the same command" in line
    _no_leftovers(run)
    filler.unlink()
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)
    run_in_process("image_train.py", *argv)
    assert check_checkpoint_set(run / "model000003.pt", [0.9]).complete
    _no_leftovers(run)


# -- damaged checkpoint files -------------------------------------------------------------------------


@pytest.mark.parametrize("damage,expected", [
    ("empty opt", "opt000002.pt is empty (0 bytes), not a readable optimizer state"),
    ("truncated opt", "opt000002.pt is truncated or damaged, not a readable optimizer state"),
    ("text opt", "opt000002.pt is not a readable optimizer state (KeyError: 101)"),
    ("empty ema", "ema_0.9_000002.pt is empty (0 bytes), not a readable EMA state_dict"),
    ("empty model", "model000002.pt is empty (0 bytes)"),
    ("truncated model", "model000002.pt is not a readable PyTorch checkpoint"),
])
def test_an_empty_or_truncated_state_of_adms_layout_is_one_line(tmp_path, damage, expected, capsys,
                                                                 script_process_group):
    run, adm = tmp_path / "run", tmp_path / "adm"
    assert cli_status("image_train", DIGITS + ["--max_steps", "2", "--log_dir", str(run)], capsys)[0] == 0
    adm.mkdir()
    for path in run.glob("*.pt"):  # ADM's own layout: the files without a record
        shutil.copy(path, adm / path.name)
    kind, _, name = damage.partition(" ")
    target = adm / {"opt": "opt000002.pt", "ema": "ema_0.9_000002.pt", "model": "model000002.pt"}[name]
    data = target.read_bytes()
    target.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "text": b"hello\n"}[kind])
    code, err, _ = cli_status("image_train", DIGITS + ["--max_steps", "3", "--log_dir", str(tmp_path / "out"),
                                                       "--resume_checkpoint", str(adm / "model000002.pt")], capsys)
    assert expected in one_line(code, err)
    assert not list((tmp_path / "out").glob("*.pt"))


# -- data: damaged images, labels out of range ---------------------------------------------------------


def _image_folder(folder, count=12, size=8, ext="png", classes=3):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"c{i % classes}_{i}.{ext}")
    return folder


def _damage(path, how):
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "cut": data[: len(data) // 2], "text": b"not an image"}[how])


@pytest.mark.parametrize("ext,how,reason", [
    ("png", "empty", "empty (0 bytes)"),
    ("png", "cut", "Truncated File Read"),
    ("png", "text", "not an image file PIL can read"),
    ("jpg", "cut", "image file is truncated"),  # its header is whole: found by its missing end marker
])
def test_an_unreadable_image_is_found_before_the_run_or_skipped_by_choice(tmp_path, ext, how, reason, capsys,
                                                                          script_process_group):
    data = _image_folder(tmp_path / "data", size=128 if ext == "jpg" else 8, ext=ext)
    bad = sorted(data.iterdir())[5]
    _damage(bad, how)
    flags = [*TINY_FLAGS, "--data_dir", str(data), "--batch_size", "4", "--max_steps", "3", "--class_cond", "True",
             "--num_classes", "3"]
    code, err, _ = cli_status("image_train", flags + ["--log_dir", str(tmp_path / "refused")], capsys)
    line = one_line(code, err)
    assert line.startswith(f"error: 1 of the 12 images of {data} cannot be read (first: {bad}: {reason}")
    assert line.endswith("); remove or replace them, or pass --skip_bad_images True to train without them")
    assert not list((tmp_path / "refused").glob("*.pt"))
    code, err, out = cli_status("image_train", flags + ["--log_dir", str(tmp_path / "skipped"), "--skip_bad_images",
                                                        "True"], capsys)
    assert (code, err) == (0, "")
    assert f"1 of the 12 images of {data} cannot be read (first: {bad}: {reason}" in out and "skipping them" in out
    # on one rank, skipping a file is training on the folder without it
    os.replace(bad, tmp_path / bad.name)
    assert cli_status("image_train", flags + ["--log_dir", str(tmp_path / "without")], capsys)[0] == 0
    assert _equal(_finals(tmp_path / "skipped", 3), _finals(tmp_path / "without", 3))


def _png_with_damaged_pixels(path):
    """A PNG whose chunks (and their CRCs) are whole, so its header check passes, but whose pixel
    data does not decompress: found only when decoded."""
    import struct
    import zlib

    png = bytearray(path.read_bytes())
    at = png.find(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    data = bytearray(png[at + 4:at + 4 + length])
    for k in range(10, len(data) - 10, 7):
        data[k] ^= 0x55
    png[at + 4:at + 4 + length] = data
    png[at + 4 + length:at + 8 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(data)))
    path.write_bytes(bytes(png))


def test_an_image_that_fails_only_when_decoded_is_one_line_from_a_loader_worker_or_replaced(tmp_path):
    data = _image_folder(tmp_path / "data", count=4, size=16, classes=4)
    files = sorted(str(p) for p in data.iterdir())
    _png_with_damaged_pixels(Path(files[1]))
    loader = torch.utils.data.DataLoader(ImageDataset(8, files, classes=[0, 1, 2, 3]), batch_size=4, num_workers=1)
    with pytest.raises(UnreadableImage) as refused:  # raised in the worker, re-raised here by torch
        next(iter(loader))
    message = str(refused.value)
    assert message.startswith(f"image {files[1]} cannot be read (") and "data stream" in message, message
    assert message.endswith("); remove or replace it, or pass --skip_bad_images True to train without it")
    assert "\n" not in message
    skipping = ImageDataset(8, files, classes=[0, 1, 2, 3], skip_bad_images=True, random_flip=False)
    replaced, label = skipping[1]
    following, next_label = skipping[2]
    assert np.array_equal(replaced, following) and label == next_label == {"y": 2}  # the next file, its label too


def test_labels_beyond_num_classes_are_refused_before_training(tmp_path, capsys, script_process_group):
    data = _image_folder(tmp_path / "data")
    code, err, _ = cli_status("image_train", [*TINY_FLAGS, "--data_dir", str(data), "--batch_size", "4",
                                              "--max_steps", "1", "--class_cond", "True", "--num_classes", "2",
                                              "--log_dir", str(tmp_path / "a")], capsys)
    assert one_line(code, err) == (
        f"error: --data_dir {data} has 3 classes (c0, c1, c2: the file-name prefixes before the first '_'), "
        "more than --num_classes 2; pass --num_classes 3")
    code, err, _ = cli_status("classifier_train", CLASSIFIER + ["--num_classes", "5", "--iterations", "1",
                                                                "--log_dir", str(tmp_path / "b")], capsys)
    assert one_line(code, err) == ("error: --data_dir digits has 10 classes (the digits 0-9), more than "
                                    "--num_classes 5; pass --num_classes 10")
    assert not list(tmp_path.glob("*/*.pt"))
    # without class_cond the labels are not used, so not checked
    load_data(data_dir=str(data), batch_size=4, image_size=8, num_classes=2)


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs mpirun")
def test_a_bad_image_in_another_ranks_share_is_reported_by_rank_0(tmp_path):
    data = _image_folder(tmp_path / "data")
    bad = sorted(data.iterdir())[5]  # rank 1 reads files 1, 3, 5, ...
    _damage(bad, "empty")
    proc = _run("image_train.py", *TINY_FLAGS, "--data_dir", str(data), "--batch_size", "2", "--max_steps", "2",
                "--log_dir", str(tmp_path / "run"), launcher=MPIRUN)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: 1 of the 6 images of {data} (rank 1 of 2) cannot be read (first: {bad}: empty "
                      "(0 bytes)); remove or replace them, or pass --skip_bad_images True to train without them"]
    assert not list((tmp_path / "run").glob("*.pt"))


# -- the logger -----------------------------------------------------------------------------------


def test_an_appended_log_keeps_its_history_and_drops_a_row_cut_short(tmp_path):
    logger.configure(dir=str(tmp_path), format_strs=["csv", "json", "log"], rank=0)
    logger.logkv("step", 1)
    logger.dumpkvs()
    logger.log("first run")
    logger.reset()
    with open(tmp_path / "progress.csv", "a") as f:
        f.write("2,0.")  # a row that a kill or a full disk cut short
    with open(tmp_path / "progress.json", "a") as f:
        f.write('{"step": 2, "lo')
    logger.configure(dir=str(tmp_path), format_strs=["csv", "json", "log"], rank=0, append=True)
    logger.logkvs({"step": 3, "loss": 0.5})
    logger.dumpkvs()
    logger.reset()
    assert (tmp_path / "progress.csv").read_text() == "step,loss\n1,\n3,0.5\n"
    assert [json.loads(line) for line in (tmp_path / "progress.json").read_text().splitlines()] == [
        {"step": 1}, {"step": 3, "loss": 0.5}]
    text = (tmp_path / "log.txt").read_text().splitlines()
    assert text.count("Logging to " + str(tmp_path)) == 2 and text.index("first run") < text.index("| loss | 0.5      |")


def test_a_log_file_the_os_refuses_is_one_line(tmp_path):
    (tmp_path / "log.txt").mkdir()  # a folder where the log file belongs
    with pytest.raises(UsageError, match=f"cannot write the log file {tmp_path / 'log.txt'} .*choose a writable"):
        logger.configure(dir=str(tmp_path), format_strs=["csv", "log"], rank=0)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        logger.configure(dir=str(tmp_path / "a_file"), format_strs=["csv"], rank=0)


# -- train_digits_models.py -----------------------------------------------------------------------


def test_train_digits_models_says_in_one_line_what_went_wrong(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert _only_line(_run("train_digits_models.py", "--only", "digits_classifier", "--max_steps", "0",
                           "--work_dir", str(tmp_path / "w"))) == (
        "error: --max_steps must be at least 1 (the steps each network trains), got 0")
    assert _only_line(run_in_process("train_digits_models.py", "--only", "digits_classifier", "--work_dir", str(a_file),
                                     check=False)) == (
        f"error: --work_dir {a_file} is a file, not a folder; choose another --work_dir")
    # a training script's own refusal comes back as one line naming the network
    (tmp_path / "w" / "digits_classifier").mkdir(parents=True)
    (tmp_path / "w" / "digits_classifier" / "model000002.pt").write_bytes(b"")
    line = _only_line(run_in_process("train_digits_models.py", "--only", "digits_classifier", "--max_steps", "1",
                                     "--work_dir", str(tmp_path / "w"), check=False))
    assert line.startswith("error: training digits_classifier (classifier_train.py) failed: --log_dir ")
    assert "holds the checkpoints of an earlier run but no complete set" in line


@pytest.mark.parametrize("script,flags,expected", [
    ("image_train", ["--schedule_sampler", "unifrom"], "unknown schedule sampler 'unifrom'"),
    ("image_train", ["--noise_schedule", "cosin"], "unknown beta schedule 'cosin'"),
    ("image_train", ["--channel_mult", "1,x"], "cannot read channel_mult '1,x'"),
    ("image_train", ["--use_fp16", "True", "--use_bf16", "True"], "--use_fp16 and --use_bf16 exclude each other"),
    ("classifier_train", ["--classifier_pool", "adaptve"], "unknown pool 'adaptve'"),
])
def test_a_model_flag_no_network_takes_is_refused_before_the_log_folder_is_made(tmp_path, script, flags, expected,
                                                                                capsys, script_process_group):
    base = {"image_train": DIGITS + ["--max_steps", "1"], "classifier_train": CLASSIFIER + ["--iterations", "1"]}
    code, err, _ = cli_status(script, base[script] + flags + ["--log_dir", str(tmp_path / "log")], capsys)
    assert expected in one_line(code, err)
    assert not (tmp_path / "log").exists()

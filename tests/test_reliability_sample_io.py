"""Faults a 50,000-image run meets, provoked as they happen: a second process on the folder, kill -9,
NaN or infinite values, damaged files, a full disk. Each ends in one clear line (or is repaired),
leaves nothing half-written, and a rerun gives the bytes of an uninterrupted run."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from adm_common import files as file_util
from adm_common.errors import UsageError
from adm_common.files import FolderInUse, NpzWriter, atomic_write_text, folder_lock_file
from guided_diffusion.run.batching import AlignedNetwork
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.output import NonFiniteError, SampleRun, quantize, run_sampling

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (4, 4, 3)


def _sampler(seed=1, bad=None, calls=None):
    """Images of ImageNoise(seed, i) in [-1, 1]; image ``bad`` (if given) comes out NaN."""

    def sample_batch(indices):
        if calls is not None:
            calls.append(list(indices))
        images = ImageNoise(seed, indices).randn((len(indices), 3, 4, 4)).clamp(-1, 1)
        if bad is not None and bad in indices:
            images[list(indices).index(bad), 1, 2, 3] = float("nan")
        return images, image_labels(seed, indices, 5)

    return sample_batch


def _run(folder, num=10, batch=3, sampler=None, settings=None, **kw):
    run = SampleRun(folder, settings or {"seed": 1}, num, batch, SHAPE, True, **kw)
    return run_sampling(run, sampler or _sampler(), {"note": "test"}, progress=False)


@pytest.fixture
def clean(tmp_path):
    """The bytes of an uninterrupted run of 10 images."""
    return _run(tmp_path / "clean").read_bytes()


def _listing(folder: Path):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _holder(folder: Path, *extra_files: Path):
    """Another process that holds ``folder``'s lock (as a running sampler would) and has written
    ``extra_files`` (its temporary files) meanwhile."""
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from adm_common.files import lock_output_folder\n"
        "lock_output_folder(sys.argv[1])\n"
        "for name in sys.argv[2:]:\n"
        "    Path(name).parent.mkdir(parents=True, exist_ok=True); Path(name).write_bytes(b'half a shard')\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), *map(str, extra_files)],
                            stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def _kill9(proc):
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


# ---------------------------------------------------------------------------------------------
# One writer per folder


def test_a_second_process_is_refused_and_touches_nothing_until_the_holder_dies(tmp_path, clean):
    folder = tmp_path / "shared"
    theirs = folder / "shards" / "shard-00000000-00000002.npz.tmp999999"
    holder = _holder(folder, theirs)
    try:
        before = _listing(folder)
        with pytest.raises(FolderInUse) as info:
            _run(folder, sampler=lambda idx: pytest.fail("sampled in a folder another run holds"))
        message = str(info.value)
        assert "\n" not in message and f"output folder {folder} is in use by another run" in message
        assert f"pid {holder.pid}" in message and "--output_dir" in message
        assert _listing(folder) == before  # its temporary file included
        assert theirs.exists()
    finally:
        _kill9(holder)
    # kill -9 leaves the lock file but not the lock: the next run takes over and sweeps
    assert folder_lock_file(folder).exists()
    path = _run(folder)
    assert path.read_bytes() == clean
    assert not theirs.exists() and not folder_lock_file(folder).exists()


def test_any_settings_are_refused_while_the_folder_is_held(tmp_path):
    folder = tmp_path / "shared"
    holder = _holder(folder)
    try:
        for settings in ({"seed": 1}, {"seed": 2}):
            with pytest.raises(FolderInUse):
                _run(folder, settings=settings)
    finally:
        _kill9(holder)
    assert not (folder / "shards").exists()


def test_the_lock_is_reentrant_within_one_process(tmp_path, clean):
    folder = tmp_path / "mine"
    file_util.lock_output_folder(folder)  # as sampling.start holds it for the whole script
    try:
        assert _run(folder).read_bytes() == clean
        assert folder_lock_file(folder).exists()  # still held by the outer holder
        code = "import sys; from adm_common.files import lock_output_folder; lock_output_folder(sys.argv[1])"
        proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode != 0 and "is in use by another run" in proc.stderr
    finally:
        file_util.release_lock(folder_lock_file(folder))
    assert not folder_lock_file(folder).exists()


def test_prepare_sweeps_only_temporary_names_of_its_own(tmp_path):
    folder = tmp_path / "out"
    (folder / "shards").mkdir(parents=True)
    left = [folder / "shards" / "shard-00000000-00000002.npz.tmp123", folder / "shards" / "run.json.tmp77",
            folder / "samples_10x4x4x3.npz.tmp4242"]
    kept = [folder / "notes.tmp1", folder / "mine.txt"]
    for p in left + kept:
        p.write_bytes(b"x")
    _run(folder)
    assert not any(p.exists() for p in left)
    assert all(p.exists() for p in kept)


# ---------------------------------------------------------------------------------------------
# No silent garbage


def test_a_nan_image_stops_the_run_naming_it_and_nothing_of_its_batch_is_written(tmp_path, clean):
    folder = tmp_path / "nan"
    with pytest.raises(NonFiniteError) as info:
        _run(folder, sampler=_sampler(bad=7))
    message = str(info.value)
    assert "\n" not in message and "image 7 (batch 6-8)" in message
    shards = sorted(p.name for p in (folder / "shards").glob("shard-*"))
    assert shards == ["shard-00000000-00000002.npz", "shard-00000003-00000005.npz"]
    assert not list(folder.rglob("*.tmp*")) and not list(folder.glob("samples_*"))
    calls = []
    assert _run(folder, sampler=_sampler(calls=calls)).read_bytes() == clean
    assert calls == [[6, 7, 8], [9]]


def test_infinite_images_are_refused_too():
    images = torch.zeros(3, 3, 4, 4)
    images[2, 0, 0, 0] = float("inf")
    from guided_diffusion.run.output import finite_pixels

    with pytest.raises(NonFiniteError, match=r"image 12 \(batch 10-12\)"):
        finite_pixels(images, [10, 11, 12])
    assert np.array_equal(finite_pixels(images[:2], [10, 11]), quantize(images[:2]))


def test_aligned_network_names_the_evaluation_the_timestep_and_the_images():
    calls = []

    def model(x, t):
        calls.append(1)
        out = x.clone()
        if len(calls) == 2:
            out[1] = float("nan")  # slot 1 of the chunk: image 5
        return out

    net = AlignedNetwork(model, [4, 5, 6], 4)
    x = torch.zeros(3, 2)
    net(x, torch.tensor([9, 9, 9]))
    with pytest.raises(NonFiniteError) as info:
        net(x, torch.tensor([8, 8, 8]))
    message = str(info.value)
    assert "network evaluation 2 of batch 4-6 (t = 8), for image 5" in message and "\n" not in message


def test_aligned_network_output_is_unchanged_when_finite():
    model = lambda x, t: x * 2 + t.view(-1, 1)  # noqa: E731
    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(AlignedNetwork(model, [0, 1, 2], 2)(x, torch.ones(3)), x * 2 + 1)


# ---------------------------------------------------------------------------------------------
# Damaged files


def _killed_after_two_batches(folder):
    with pytest.raises(KeyboardInterrupt):
        calls = []

        def dying(indices):
            if len(calls) == 2:
                raise KeyboardInterrupt
            calls.append(indices)
            return _sampler()(indices)

        _run(folder, sampler=dying)


def test_a_truncated_shard_is_removed_and_made_again(tmp_path, clean):
    folder = tmp_path / "cut"
    _killed_after_two_batches(folder)
    shard = folder / "shards" / "shard-00000003-00000005.npz"
    shard.write_bytes(shard.read_bytes()[:100])  # a copy cut short
    calls = []
    assert _run(folder, sampler=_sampler(calls=calls)).read_bytes() == clean
    assert calls == [[3, 4, 5], [6, 7, 8], [9]]


def test_an_empty_shard_is_removed_and_made_again(tmp_path, clean):
    folder = tmp_path / "empty"
    _killed_after_two_batches(folder)
    (folder / "shards" / "shard-00000000-00000002.npz").write_bytes(b"")
    assert _run(folder).read_bytes() == clean


def test_a_shard_damaged_after_the_check_is_named_removed_and_made_again(tmp_path, clean, monkeypatch):
    folder = tmp_path / "crc"
    _killed_after_two_batches(folder)
    shard = folder / "shards" / "shard-00000000-00000002.npz"
    data = bytearray(shard.read_bytes())
    start = data.index(b"\x93NUMPY") + 128  # inside images.npy's data, past its header
    data[start] ^= 0xFF  # a flipped byte: the zip's CRC no longer matches
    shard.write_bytes(bytes(data))
    with pytest.raises(UsageError) as info:
        _run(folder)
    assert f"shard {shard} is damaged" in str(info.value) and "rerun the same command" in str(info.value)
    assert not shard.exists() and not list(folder.glob("samples_*")) and not list(folder.rglob("*.tmp*"))
    assert _run(folder).read_bytes() == clean


@pytest.mark.parametrize("content", [b"", b"{not json", b"[1, 2]"])
def test_a_damaged_run_json_beside_shards_is_named(tmp_path, content):
    folder = tmp_path / "runjson"
    _killed_after_two_batches(folder)
    run_file = folder / "shards" / "run.json"
    run_file.write_bytes(content)
    with pytest.raises(UsageError) as info:
        _run(folder)
    message = str(info.value)
    assert f"{run_file} is damaged" in message and f"delete {folder / 'shards'}" in message and "\n" not in message
    assert run_file.read_bytes() == content


def test_a_damaged_run_json_without_shards_is_rewritten(tmp_path, clean):
    folder = tmp_path / "runjson"
    (folder / "shards").mkdir(parents=True)
    (folder / "shards" / "run.json").write_text("{half")
    assert _run(folder).read_bytes() == clean
    assert json.loads((folder / "shards" / "run.json").read_text())["seed"] == 1


def test_a_damaged_sidecar_or_npz_of_a_finished_run_is_named(tmp_path, clean):
    folder = tmp_path / "done"
    path = _run(folder)
    sidecar = path.with_suffix(".json")
    good = sidecar.read_bytes()
    sidecar.write_text("")
    with pytest.raises(UsageError) as info:
        _run(folder, sampler=lambda idx: pytest.fail("resampled"))
    assert f"{sidecar} is damaged" in str(info.value) and "delete samples_10x4x4x3.npz" in str(info.value)
    sidecar.write_bytes(good)
    path.write_bytes(clean[: len(clean) // 2])
    with pytest.raises(UsageError, match="is damaged.*delete samples_10x4x4x3.npz and samples_10x4x4x3.json"):
        _run(folder, sampler=lambda idx: pytest.fail("resampled"))
    path.unlink()
    sidecar.unlink()
    assert _run(folder).read_bytes() == clean


# ---------------------------------------------------------------------------------------------
# A full disk


def _full_disk_after(monkeypatch, writes: int):
    """Every zip member write after the first ``writes`` fails with ENOSPC, as a full disk does."""
    original = zipfile.ZipFile.open
    count = [0]

    def open_(self, name, mode="r", **kwargs):
        member = original(self, name, mode, **kwargs)
        if mode == "w":
            count[0] += 1
            if count[0] > writes:
                def refuse(data):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                member.write = refuse
        return member

    monkeypatch.setattr(zipfile.ZipFile, "open", open_)


def test_enospc_writing_a_shard_is_one_line_and_keeps_the_finished_shards(tmp_path, clean, monkeypatch):
    folder = tmp_path / "full"
    _full_disk_after(monkeypatch, writes=3 * 2)  # two shards of 3 members, then the disk is full
    with pytest.raises(UsageError) as info:
        _run(folder)
    monkeypatch.undo()
    message = str(info.value)
    assert message == (f"no space left on device writing {folder / 'shards' / 'shard-00000006-00000008.npz'}; "
                       "free space and rerun the same command to resume")
    assert sorted(p.name for p in (folder / "shards").iterdir()) == [
        "run.json", "shard-00000000-00000002.npz", "shard-00000003-00000005.npz"]
    assert not list(folder.rglob("*.tmp*")) and not folder_lock_file(folder).exists()
    assert _run(folder).read_bytes() == clean


def test_enospc_assembling_the_final_npz_leaves_the_shards(tmp_path, clean, monkeypatch):
    folder = tmp_path / "full"
    _full_disk_after(monkeypatch, writes=4 * 3)  # every shard fits, the final NPZ does not
    with pytest.raises(UsageError, match="no space left on device writing .*samples_10x4x4x3.npz"):
        _run(folder)
    monkeypatch.undo()
    assert len(list((folder / "shards").glob("shard-*.npz"))) == 4
    assert not list(folder.rglob("*.tmp*")) and not list(folder.glob("samples_*"))
    assert _run(folder, sampler=lambda idx: pytest.fail("resampled")).read_bytes() == clean


def test_enospc_in_atomic_writes_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "record.json"
    atomic_write_text(path, "old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(UsageError, match=f"no space left on device writing {path}; free space"):
        atomic_write_text(path, "new")
    monkeypatch.undo()
    assert path.read_text() == "old" and sorted(tmp_path.iterdir()) == [path]
    with pytest.raises(ValueError, match="header promised"):
        with NpzWriter(tmp_path / "short.npz") as writer:
            list(writer.add_streamed("arr_0", (3, 2), np.uint8, [np.zeros((2, 2), np.uint8)]))
    assert sorted(tmp_path.iterdir()) == [path]


TMPFS = Path("/tmp") / f"gd_es_tmpfs_{os.getpid()}"


@pytest.fixture
def tiny_disk():
    """A real 64 KiB filesystem (tmpfs; needs root), else the test is skipped."""
    TMPFS.mkdir(exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(TMPFS)],
                             capture_output=True).returncode == 0 if shutil.which("mount") else False
    if not mounted:
        TMPFS.rmdir()
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield TMPFS
    finally:
        subprocess.run(["umount", str(TMPFS)], check=False)
        TMPFS.rmdir()


def test_a_really_full_disk_then_freed_gives_the_uninterrupted_bytes(tmp_path, tiny_disk):
    shape = (32, 32, 3)  # 3 KiB per image: a few shards fill 64 KiB

    def run(folder):
        return run_sampling(SampleRun(folder, {"seed": 1}, 40, 4, shape, False), lambda idx: (
            ImageNoise(1, idx).randn((len(idx), 3, 32, 32)).clamp(-1, 1), None), {}, progress=False)

    reference = run(tmp_path / "clean").read_bytes()
    folder = tiny_disk / "out"
    with pytest.raises(UsageError, match=r"no space left on device writing .*shard-\d+-\d+\.npz; free space"):
        run(folder)
    done = len(list((folder / "shards").glob("shard-*.npz")))
    assert 0 < done < 10 and not list(folder.rglob("*.tmp*"))
    subprocess.run(["mount", "-o", "remount,size=2m", str(tiny_disk)], check=True)
    assert run(folder).read_bytes() == reference


RANKS_CODE = """
import sys
from guided_diffusion import dist_util
from guided_diffusion.image_noise import ImageNoise, image_labels
from guided_diffusion.run.output import SampleRun, run_sampling
from adm_common.cli import cli_main

def main():
    dist_util.setup_dist()
    bad = int(sys.argv[2])
    def sample_batch(indices):
        images = ImageNoise(1, indices).randn((len(indices), 3, 4, 4)).clamp(-1, 1)
        if bad in indices:
            images[list(indices).index(bad)] = float("nan")
        return images, image_labels(1, indices, 5)
    run = SampleRun(sys.argv[1], {"seed": 1}, 10, 1, (4, 4, 3), True, rank=dist_util.get_rank(),
                    world_size=dist_util.get_world_size())
    run_sampling(run, sample_batch, {"note": "test"}, progress=False)

cli_main(main)
"""


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_a_failure_on_one_rank_stops_every_rank_with_one_line(tmp_path, clean):
    folder = tmp_path / "ranks"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    proc = subprocess.run(["mpirun", "-n", "2", "--oversubscribe", sys.executable, "-c", RANKS_CODE, str(folder), "3"],
                          capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(errors) == 1 and "image 3 (batch 3)" in errors[0], proc.stderr[-3000:]  # found on rank 1
    # batches go round by round (0 and 1, then 2 and 3): nothing of image 3, nothing after its round
    assert sorted(p.name for p in (folder / "shards").glob("shard-*")) == [
        f"shard-{i:08d}-{i:08d}.npz" for i in range(3)]
    assert not list(folder.rglob("*.tmp*")) and not folder_lock_file(folder).exists()
    assert _run(folder).read_bytes() == clean

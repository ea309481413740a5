"""Sample output: ADM's NPZ, written as atomic per-batch shards that a killed run resumes from."""

from __future__ import annotations

import json
import os
import re
import zipfile
from collections import Counter, deque
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from adm_common.errors import UsageError, first_line
from adm_common.files import (
    NpzWriter,
    acquire_lock,
    atomic_write_text,
    folder_lock_file,
    is_temp_name,
    read_json_object,
    release_lock,
    sha256_file,
)
from guided_diffusion.run.collective import together
from guided_diffusion.run.non_finite import NonFiniteError, images_text, index_ranges


def output_folder(output_dir: str, default: str) -> Path:
    """--output_dir, else $OPENAI_LOGDIR (ADM's), else ``default``: created, or one clear error."""
    folder = Path(output_dir or os.environ.get("OPENAI_LOGDIR") or default)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"output folder {folder} is a file, not a folder; choose another --output_dir")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(
            f"cannot write to output folder {folder} ({exc.strerror}); choose a writable --output_dir"
        ) from None
    return folder


def quantize(images: torch.Tensor) -> np.ndarray:
    """Model output in [-1, 1], NCHW -> uint8 NHWC, exactly as ADM's sample scripts round it."""
    out = ((images + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def dequantize(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC images (as an NPZ holds them) -> float32 NCHW in [-1, 1], as the models see data."""
    return torch.from_numpy(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# Settings that change how a run is split up but not a single pixel of any image.
NON_IMAGE_SETTINGS = frozenset(
    {"batch_size", "num_samples", "output_dir", "log_dir", "world_size", "progress", "keep_shards", "infer_flags"}
)

_SHARD_RE = re.compile(r"^shard-(\d{8,})-(\d{8,})\.npz$")


class SampleRun:
    """One sampling run's output folder: shards/ while running, then ADM's final NPZ + JSON sidecar.

    Image indices 0..num_samples-1 are split into contiguous batches; each finished batch is saved
    as ``shards/shard-FIRST-LAST.npz`` by an atomic rename, so a run killed at any moment resumes
    with exactly the missing images. ``shards/run.json`` records the settings that determine the
    pixels; a folder made with other settings is refused rather than mixed.
    """

    def __init__(self, output_dir, settings: dict, num_samples: int, batch_size: int,
                 image_shape, class_cond: bool, rank: int = 0, world_size: int = 1,
                 keep_shards: bool = False):
        if num_samples < 1:
            raise ValueError(f"--num_samples must be at least 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
        self.output_dir = Path(output_dir)
        self.shard_dir = self.output_dir / "shards"
        self.settings = dict(settings)
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.image_shape = tuple(int(s) for s in image_shape)  # H, W, C
        self.class_cond = bool(class_cond)
        self.rank, self.world_size = int(rank), int(world_size)
        self.keep_shards = keep_shards
        shape_str = "x".join(str(s) for s in (self.num_samples, *self.image_shape))
        self.final_path = self.output_dir / f"samples_{shape_str}.npz"
        self.sidecar_path = self.final_path.with_suffix(".json")
        self.lock_file = folder_lock_file(self.output_dir)
        self.identity = {k: v for k, v in self.settings.items() if k not in NON_IMAGE_SETTINGS}
        self.identity.update(image_shape=list(self.image_shape), class_cond=self.class_cond)

    # -- set-up, called on every rank before any shard is written -------------------------------
    def lock(self) -> None:
        """Take the output folder's one-writer lock for this process (rank 0 of a run; see run_sampling).

        Another process holding it (another run on this folder, any settings) is refused in one
        line; the OS drops the lock when its holder ends, ``kill -9`` included.
        """
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PermissionError(
                f"cannot write to output folder {self.output_dir} ({exc.strerror}); choose a writable --output_dir"
            ) from None
        acquire_lock(self.lock_file, f"output folder {self.output_dir}")

    def unlock(self) -> None:
        release_lock(self.lock_file)

    def prepare(self) -> None:
        """Create the folders and check earlier shards were made with the same settings (rank 0).

        Holding the folder's lock, it also removes what killed runs left: temporary files (no
        other process can be writing them) and shards that cannot be read (made again).
        """
        if self.rank != 0:
            return
        try:
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            probe = self.shard_dir / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise PermissionError(
                f"cannot write to output folder {self.output_dir} ({exc.strerror}); "
                "choose a writable --output_dir"
            ) from None
        self.lock()
        try:
            self._prepare_locked()
        finally:
            self.unlock()

    def _prepare_locked(self) -> None:
        self._sweep_temporary_files()
        run_file = self.shard_dir / "run.json"
        mine = _jsonable(self.identity)
        earlier = self._earlier_identity(run_file)
        # Settings that made no image yet (a first batch that failed) do not hold the folder.
        if earlier is not None and earlier != mine and (self.is_complete() or self.done_indices()):
            diff = sorted(k for k in set(earlier) | set(mine) if earlier.get(k) != mine.get(k))
            made = f"{self.shard_dir}" + (f" and {self.final_path.name} with its .json" if self.is_complete() else "")
            raise ValueError(
                f"{self.output_dir} holds samples made with other settings (differing: "
                f"{', '.join(diff[:5])}); use another --output_dir or delete {made}"
            )
        if earlier != mine or not _json_ok(run_file):  # new, other settings that made no image, or damaged
            atomic_write_text(run_file, json.dumps(mine, indent=1, sort_keys=True))
        if self.is_complete():
            self._check_complete()
        else:
            self._remove_damaged_shards()

    def _sweep_temporary_files(self) -> None:
        """Temporary files of killed runs: every NAME.tmpPID in shards/, samples_*.tmpPID beside it."""
        for folder, prefix in ((self.shard_dir, ""), (self.output_dir, "samples_")):
            for stale in folder.iterdir():
                if stale.name.startswith(prefix) and is_temp_name(stale.name) and stale.is_file():
                    stale.unlink(missing_ok=True)

    def _earlier_identity(self, run_file: Path) -> dict | None:
        """The settings the folder's images were made with: shards/run.json, else the finished sidecar."""
        if run_file.exists():
            try:
                return read_json_object(run_file)
            except UsageError as exc:
                if self.done_indices():
                    raise UsageError(
                        f"{exc}; it records the settings that made the shards beside it: restore it, or "
                        f"delete {self.shard_dir} to start over"
                    ) from None
                # it made no image: the finished sidecar (if any) says the rest, and it is rewritten
        if self.is_complete():
            try:
                return read_json_object(self.sidecar_path).get("run_identity")
            except UsageError as exc:
                raise UsageError(f"{exc}; delete it and {self.final_path.name}, then rerun the same command "
                                 "to make them again") from None
        return None

    def _check_complete(self) -> None:
        """A finished NPZ must be whole and its sidecar readable (a copy cut short, an edit)."""
        fix = f"delete {self.final_path.name} and {self.sidecar_path.name}, then rerun the same command to make them again"
        try:
            record = read_json_object(self.sidecar_path)
        except UsageError as exc:
            raise UsageError(f"{exc}; {fix}") from None
        members = {"arr_0.npy": self.num_samples * int(np.prod(self.image_shape))}
        if self.class_cond:
            members["arr_1.npy"] = self.num_samples * 8
        try:
            with zipfile.ZipFile(self.final_path) as archive:
                sizes = {info.filename: info.file_size for info in archive.infolist()}
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise UsageError(f"{self.final_path} is damaged ({first_line(exc, limit=160)}); {fix}") from None
        short = [m for m, size in members.items() if sizes.get(m, -1) < size]
        if short or record.get("npz") != self.final_path.name:
            raise UsageError(f"{self.final_path} does not hold the {self.num_samples} images its sidecar "
                             f"{self.sidecar_path.name} records; {fix}")

    def _remove_damaged_shards(self) -> None:
        """Shards that cannot be read are removed, with a log line: their images are made again."""
        from guided_diffusion import logger

        for p in sorted(self.shard_dir.iterdir()):
            m = _SHARD_RE.match(p.name)
            if m and not self._shard_is_whole(p, int(m.group(1)), int(m.group(2))):
                p.unlink(missing_ok=True)
                logger.log(f"removed damaged shard {p}; its images are made again")

    def _shard_is_whole(self, path: Path, first: int, last: int) -> bool:
        count = last - first + 1
        try:
            with zipfile.ZipFile(path) as archive:
                sizes = {info.filename: info.file_size for info in archive.infolist()}
                if sizes.get("images.npy", -1) < count * int(np.prod(self.image_shape)):
                    return False
                if self.class_cond and sizes.get("labels.npy", -1) < count * 8:
                    return False
                with archive.open("indices.npy") as member:
                    indices = np.lib.format.read_array(member, allow_pickle=False)
            return np.array_equal(indices, np.arange(first, last + 1))
        except (zipfile.BadZipFile, ValueError, EOFError, KeyError):
            return False

    def is_complete(self) -> bool:
        return self.final_path.exists() and self.sidecar_path.exists()

    def done_indices(self) -> set[int]:
        done = set()
        if self.shard_dir.exists():
            for p in self.shard_dir.iterdir():
                m = _SHARD_RE.match(p.name)
                if m:
                    done.update(range(int(m.group(1)), int(m.group(2)) + 1))
        return done

    def pending_batches(self) -> list[list[int]]:
        """All missing images as contiguous batches, in index order (every rank computes the same)."""
        done = self.done_indices()
        batches, current = [], []
        for i in range(self.num_samples):
            if i in done:
                continue
            if current and (len(current) == self.batch_size or current[-1] != i - 1):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    def my_batches(self, batches: list[list[int]]) -> list[list[int]]:
        return batches[self.rank::self.world_size]

    # -- writing --------------------------------------------------------------------------------
    def write_shard(self, indices, images: np.ndarray, labels=None, time_shift=None) -> Path:
        """One batch as an atomic shard; ``time_shift``: each image's chosen timestep per sampling
        step ([n, steps]) of a Time-Shift run, summarised in the sidecar by ``finish``."""
        indices = [int(i) for i in indices]
        if indices != list(range(indices[0], indices[0] + len(indices))):
            raise ValueError("a shard must hold consecutive image indices")
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape != (len(indices), *self.image_shape):
            raise ValueError(
                f"shard images must be uint8 {(len(indices), *self.image_shape)}, "
                f"got {images.dtype} {images.shape}"
            )
        arrays = {"images": images, "indices": np.asarray(indices, dtype=np.int64)}
        if self.class_cond:
            if labels is None:
                raise ValueError("a class-conditional run needs labels for every shard")
            arrays["labels"] = np.asarray(labels, dtype=np.int64).reshape(len(indices))
        if time_shift is not None:
            arrays["time_shift"] = np.asarray(time_shift, dtype=np.int64).reshape(len(indices), -1)
        path = self.shard_dir / f"shard-{indices[0]:08d}-{indices[-1]:08d}.npz"
        with NpzWriter(path) as writer:
            for name, array in arrays.items():
                writer.add(name, array)
        return path

    def finish(self, sidecar: dict) -> Path:
        """Assemble the final NPZ from the shards, streaming (rank 0), then write the sidecar."""
        shards = sorted(
            (int(m.group(1)), int(m.group(2)), p)
            for p in self.shard_dir.iterdir()
            if (m := _SHARD_RE.match(p.name))
        )
        expected = 0
        for first, last, p in shards:
            if first != expected:
                break
            expected = last + 1
        if expected < self.num_samples:
            raise UsageError(f"images from index {expected} are missing in {self.shard_dir}; rerun to finish")
        shards = [s for s in shards if s[0] < self.num_samples]
        n = self.num_samples
        with NpzWriter(self.final_path) as writer:
            deque(writer.add_streamed("arr_0", (n, *self.image_shape), np.uint8,
                                      _first_rows((_read_shard(p, "images") for _, _, p in shards), n)), maxlen=0)
            if self.class_cond:
                deque(writer.add_streamed("arr_1", (n,), np.int64,
                                          _first_rows((_read_shard(p, "labels") for _, _, p in shards), n)), maxlen=0)
        # The NPZ first, then its sidecar: a run stopped in between is not complete and redoes this.
        record = dict(sidecar)
        record.update(num_samples=n, image_shape=list(self.image_shape), npz=self.final_path.name,
                      npz_sha256=sha256_file(self.final_path), run_identity=_jsonable(self.identity))
        shifted = time_shift_summary(_shard_members(shards, "time_shift"), n)
        if shifted is not None:
            record["time_shift_timesteps"] = shifted
        atomic_write_text(self.sidecar_path, json.dumps(_jsonable(record), indent=1, sort_keys=True))
        if not self.keep_shards:
            for _, _, p in shards:
                p.unlink(missing_ok=True)
        return self.final_path


def _shard_members(shards, member: str):
    """``member`` of each shard that has it (a Time-Shift run's shards all do, others none)."""
    for _, _, path in shards:
        with zipfile.ZipFile(path) as archive:
            present = f"{member}.npy" in archive.namelist()
        if present:
            yield _read_shard(path, member)


def time_shift_summary(chunks, count: int) -> list[dict] | None:
    """Per sampling step (first step first), how many of the first ``count`` images moved to each
    timestep: ``[{"step": k, "timesteps": {"t": images}}, ...]``; None without any chunk."""
    counters = None
    for chunk in _first_rows(chunks, count):
        if counters is None:
            counters = [Counter() for _ in range(chunk.shape[1])]
        for k, counter in enumerate(counters):
            counter.update(int(t) for t in chunk[:, k])
    if counters is None:
        return None
    return [{"step": k, "timesteps": {str(t): c[t] for t in sorted(c)}} for k, c in enumerate(counters)]


def _read_shard(path: Path, member: str) -> np.ndarray:
    """One array of a shard; a shard damaged since it was checked is removed, with one line."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return data[member]
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError) as exc:
        path.unlink(missing_ok=True)
        raise UsageError(
            f"shard {path} is damaged ({first_line(exc, limit=160)}); it was removed: rerun the same command to make its "
            "images again"
        ) from None


def _json_ok(path: Path) -> bool:
    try:
        read_json_object(path)
        return True
    except UsageError:
        return False


def _first_rows(chunks, count: int):
    """The chunks, cut after ``count`` rows in all."""
    for chunk in chunks:
        if count <= 0:
            return
        yield chunk[:count]
        count -= len(chunk)


def _jsonable(value):
    """Settings as JSON would read them back (tuples become lists, paths strings)."""
    return json.loads(json.dumps(value, default=str))



def environment_record(world_size: int) -> dict:
    """Versions and parallelism of this run, for the sidecar."""
    import platform
    from importlib import metadata

    try:
        version = metadata.version("guided-diffusion-es")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "package_version": version,
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "python_version": platform.python_version(),
        "world_size": world_size,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def run_sampling(run: SampleRun, sample_batch, sidecar: dict, progress: bool = True,
                 quantize=quantize) -> Path | None:
    """Sample every missing image of ``run`` on this rank, then assemble the output on rank 0.

    ``sample_batch(indices)`` returns (images in [-1, 1] as an NCHW tensor, labels or None), and a
    Time-Shift sampler each image's chosen timesteps ([n, steps]) third, for the consecutive image
    indices given; ``quantize`` makes them uint8 NHWC (default ``quantize``: ADM's floor).
    Returns the final NPZ path on rank 0 and None elsewhere.

    Rank 0 holds the output folder's lock throughout (``SampleRun.lock``): a second run on the
    folder is refused on every one of its ranks. A batch with NaN or infinite values is never
    written (``finite_pixels``). The ranks go through the batches in rounds and learn after each
    whether any rank failed, so a user error on any rank (a non-finite batch, a full disk) stops
    every rank with the same one line instead of leaving the others waiting.
    """
    from tqdm.auto import tqdm

    from guided_diffusion import dist_util

    together(run.lock if run.rank == 0 else None)
    try:
        together(run.prepare if run.rank == 0 else None)  # refuses other settings, sweeps, checks
        if run.is_complete():
            return run.final_path if run.rank == 0 else None
        batches = run.pending_batches()
        dist_util.barrier()  # every rank has listed the shards before any rank writes a new one
        mine = run.my_batches(batches)
        total = sum(len(b) for b in batches)
        bar = tqdm(total=total, unit="img", disable=not progress or run.rank != 0, desc="sampling",
                   dynamic_ncols=True, smoothing=0.1)
        rounds = -(-len(batches) // run.world_size)
        for k in range(rounds):
            indices = mine[k] if k < len(mine) else None
            together(None if indices is None else (lambda: _sample_and_write(run, sample_batch, indices, quantize)))
            bar.update(sum(len(b) for b in batches[k * run.world_size:(k + 1) * run.world_size]))
        bar.close()
        record = dict(sidecar)
        record.update(environment_record(run.world_size))
        return together((lambda: run.finish(record)) if run.rank == 0 else None)
    finally:
        if run.rank == 0:
            run.unlock()


def _sample_and_write(run: SampleRun, sample_batch, indices, quantize=quantize) -> None:
    images, labels, *time_shift = sample_batch(indices)  # a Time-Shift sampler adds its timesteps
    run.write_shard(indices, finite_pixels(images, indices, quantize), None if labels is None else labels.cpu().numpy(),
                    time_shift[0] if time_shift else None)


def finite_pixels(images: torch.Tensor, indices: Sequence[int], quantize=quantize) -> np.ndarray:
    """``quantize(images)``, refusing NaN or infinite values (they would become black pixels)."""
    finite = torch.isfinite(images.reshape(len(images), -1)).all(dim=1)
    if not bool(finite.all()):
        bad = [int(indices[j]) for j in torch.nonzero(~finite).flatten().tolist()]
        raise NonFiniteError(
            f"sampling gave NaN or infinite values for {images_text(bad)} (batch {index_ranges(indices)}); nothing "
            "of this batch was written: check the checkpoint, the noise schedule and --eps_scale"
        )
    return quantize(images)

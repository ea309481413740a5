"""scripts/image_sample.py measured end to end: its peak RSS, and its images with the speed switches."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from guided_diffusion import script_util as su

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------
# Peak RSS of the sample script


RSS_MODEL = dict(image_size=64, num_channels=32, num_res_blocks=1, channel_mult="1,2,2", attention_resolutions="16",
                 num_head_channels=32, diffusion_steps=40, noise_schedule="cosine", learn_sigma=True)


def _script_model(folder: Path) -> list[str]:
    """Save the tiny 64 px model (random weights, every layer non-zero) in ``folder``; its flags."""
    torch.manual_seed(0)
    model, _ = su.create_model_and_diffusion(**{**su.model_and_diffusion_defaults(), **RSS_MODEL})
    with torch.no_grad():  # ADM zero-initialises its output layers
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "model.pt")
    return [f"--{k}={v}" for k, v in RSS_MODEL.items()] + [f"--model_path={folder / 'model.pt'}"]


def _script_command(flags) -> tuple[list[str], dict]:
    """scripts/image_sample.py with ``flags``, and an environment that imports this checkout."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return [sys.executable, str(ROOT / "scripts" / "image_sample.py"), "--progress=False", *flags], env


def sample_script_rss(counts=(64, 1024), batch_size=64) -> dict:
    """Peak RSS of scripts/image_sample.py (tiny 64 px model, two steps) at each --num_samples."""
    with tempfile.TemporaryDirectory() as tmp:
        model_flags = _script_model(Path(tmp))
        runs = []
        for n in counts:
            cmd, env = _script_command([*model_flags, "--timestep_respacing=2", f"--num_samples={n}",
                                        f"--batch_size={batch_size}", f"--output_dir={Path(tmp) / f'out{n}'}"])
            started = time.perf_counter()
            with open(Path(tmp) / f"stderr{n}.txt", "w+b") as stderr:
                proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
                # wait4 gives this child's own resource usage, its peak RSS included.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = os.waitstatus_to_exitcode(status)
                stderr.seek(0)
                last = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
            if proc.returncode != 0:
                raise RuntimeError(f"image_sample.py --num_samples={n} failed: {last}")
            runs.append(dict(num_samples=n, peak_rss_mib=usage.ru_maxrss / 1024, seconds=time.perf_counter() - started))
    size = RSS_MODEL["image_size"]
    held = (counts[-1] - counts[0]) * size * size * 3
    return dict(model=RSS_MODEL, batch_size=batch_size, runs=runs,
                rss_difference_mib=runs[-1]["peak_rss_mib"] - runs[0]["peak_rss_mib"],
                extra_samples_uint8_mib=held / 2**20, extra_samples_float32_mib=4 * held / 2**20)


def sample_script_checks(cuda: bool, num_samples: int = 12, steps: int = 4) -> list[dict]:
    """scripts/image_sample.py end to end with the speed switches, against its plain run.

    Each row: the flags, the batch size, seconds, and how its images differ from the plain run
    at batch 4 (uint8 levels; "bytes equal" for the whole NPZ). The plain run at batch 7 checks
    that no pixel depends on the batch size on this device.
    """
    import numpy as np

    runs = [("plain", [], 4), ("plain", [], 7), ("bf16", ["--autocast_dtype=bf16"], 4)]
    if cuda:
        runs += [("cuda_graphs+channels_last+fp16", ["--cuda_graphs=True", "--channels_last=True",
                                                    "--autocast_dtype=fp16"], 4),
                 ("cuda_graphs+use_fp16", ["--cuda_graphs=True", "--use_fp16=True"], 4)]
    else:
        runs.append(("channels_last", ["--channels_last=True"], 4))
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        model_flags = _script_model(Path(tmp))
        for k, (name, flags, batch) in enumerate(runs):
            out = Path(tmp) / f"run{k}"
            cmd, env = _script_command([*model_flags, *flags, f"--timestep_respacing={steps}",
                                        f"--num_samples={num_samples}", f"--batch_size={batch}", f"--output_dir={out}"])
            started = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            row = dict(variant=name, batch=batch, seconds=round(time.perf_counter() - started, 1), ok=proc.returncode == 0)
            if proc.returncode != 0:
                row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:300]
                rows.append(row)
                continue
            npz = next(out.glob("samples_*.npz"))
            images = np.load(npz)["arr_0"].astype(np.int16)
            if reference is None:
                reference = (npz.read_bytes(), images)
            diff = np.abs(images - reference[1])
            row.update(bytes_equal=npz.read_bytes() == reference[0], max_abs_uint8_diff=int(diff.max()),
                       mean_abs_uint8_diff=float(diff.mean()))
            rows.append(row)
    return rows

"""Exposure bias of an ADM sampler, measured as Ning et al. (ICLR 2024) measure it.

N data images x_0 are forward-noised to the first sampling step (q_sample at chain index T' - 1)
and sampled from there. At every step t of the chain (T' - 1 first, 0 last) the state x_t that
enters the step is compared with the image its chain started from:

* ``std``: the standard deviation over the N chains of x_t - sqrt(abar_t) x_0, per pixel,
  averaged over pixels; the forward process gives ``target_std`` = sqrt(1 - abar_t);
* ``delta`` = (std - sqrt(1 - abar_t))^2, the authors' exposure-bias metric;
* ``eps_norm_sampling``: the mean over images of the L2 norm of the network's noise prediction
  at x_t (before Epsilon Scaling; ``eps_norm_scaled`` after it), against ``eps_norm_forward``,
  the same at forward-noised data q(x_t | x_0), which is what the network saw in training.

delta is not zero for a perfect model: a chain forgets the image it started from, so late in the
chain x_t - sqrt(abar_t) x_0 also holds the difference between the sampled and the original
image (for Gaussian data and the exact noise predictor std tends to sqrt(2) times the data std).
It compares samplers and lambdas on the same starts; it is not a distance to the data. The
``marginal_std`` columns compare the spread of x_t over the chains with the spread of
forward-noised data; they agree for an exact model and a sampler without discretization error.

abar_t is that of the respaced chain at index t (equal to the original process at
``timestep``). Noise comes from per-image streams (image_noise), so a baseline and an ES run
start from the same x_{T'-1} and draw the same step noise.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from guided_diffusion.eps_scaling import EpsScale, parse_eps_scale, scale_eps
from adm_common.files import atomic_write_figure, atomic_write_text
from guided_diffusion.gaussian_diffusion import _model_device
from guided_diffusion.image_datasets import (
    ImageDataset,
    choose_indices,
    class_indices_from_names,
    list_image_files_recursively,
)
from guided_diffusion.image_noise import STREAM_EXTRA, ImageNoise
from guided_diffusion.run.output import dequantize

STEP_COLUMNS = (
    "t",
    "timestep",
    "alpha_bar",
    "target_std",
    "std",
    "delta",
    "marginal_std_sampling",
    "marginal_std_forward",
    "lambda",
    "eps_norm_sampling",
    "eps_norm_scaled",
    "eps_norm_forward",
    "eps_norm_ratio",
)

# schedule_at(t, eps_norm_sampling, eps_norm_forward) -> the EpsScale that step t uses
ScheduleChooser = Callable[[int, float, float], EpsScale]


# ---------------------------------------------------------------------------------------------
# Data


def load_images(source, image_size: int, num_images: int = 256, seed: int = 0, with_labels: bool = False):
    """A seeded random subset of ``num_images`` data images (0: all), in source order.

    :param source: a folder of images (center-cropped as ADM prepares training data), an .npz
        batch (``arr_0`` uint8 [N, S, S, 3], labels in ``arr_1``), ``digits`` or ``digits:SIZE``.
    :return: (images float32 [N, 3, S, S] in [-1, 1], int64 labels [N] or None).
    """
    from guided_diffusion.digits.data import checked_digits_size, digits_arrays, is_digits_spec

    if not source:
        raise ValueError("no data given; pass --data_dir a folder of images, an .npz batch, digits or digits:SIZE")
    if is_digits_spec(source):
        size = checked_digits_size(source, image_size)
        images, labels = digits_arrays(size)
        chosen = _choose(len(images), num_images, seed, source)
        return images[chosen], labels[chosen] if with_labels else None
    path = Path(source)
    if path.is_dir():
        return _folder_images(path, image_size, num_images, seed, with_labels)
    if not path.exists():
        raise FileNotFoundError(f"data {path} does not exist; pass a folder of images, an .npz batch or digits")
    if path.suffix.lower() == ".npz":
        return _npz_images(path, image_size, num_images, seed, with_labels)
    raise ValueError(f"data {path} must be a folder of images, an .npz batch, digits or digits:SIZE")


def _choose(total: int, num_images: int, seed: int, source) -> np.ndarray:
    if num_images < 0:
        raise ValueError(f"--num_images must be >= 0 (0 = all), got {num_images}")
    if total == 0:
        raise ValueError(f"{source} holds no images")
    wanted = total if num_images == 0 else num_images
    if wanted > total:
        raise ValueError(f"asked for {wanted} images but {source} holds {total}; lower --num_images")
    if wanted < 2:
        raise ValueError(f"a spread over chains needs at least 2 images, got {wanted}")
    return choose_indices(total, wanted, seed)


def _folder_images(path: Path, image_size, num_images, seed, with_labels):
    files = list_image_files_recursively(str(path))
    chosen = _choose(len(files), num_images, seed, path)
    dataset = ImageDataset(image_size, [files[i] for i in chosen], random_flip=False)
    images = torch.stack([torch.from_numpy(np.ascontiguousarray(dataset[i][0])) for i in range(len(dataset))])
    labels = None
    if with_labels:
        labels = torch.tensor(class_indices_from_names(files), dtype=torch.int64)[torch.from_numpy(chosen)]
    return images, labels


def _npz_images(path: Path, image_size, num_images, seed, with_labels):
    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as an .npz batch ({exc})") from None
    with data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no arr_0; ADM batches hold their images in arr_0 as uint8 [N, H, W, 3]")
        arr = data["arr_0"]
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"{path}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} {arr.shape}")
        if arr.shape[1:3] != (image_size, image_size):
            raise ValueError(
                f"{path} holds {arr.shape[1]}x{arr.shape[2]} images but the model takes "
                f"{image_size}x{image_size}; pass a batch of {image_size}x{image_size} images"
            )
        chosen = _choose(len(arr), num_images, seed, path)
        labels = None
        if with_labels:
            if "arr_1" not in data.files:
                raise ValueError(f"{path} has no labels (arr_1), which a class-conditional model needs")
            labels = torch.from_numpy(data["arr_1"].astype(np.int64)[chosen])
    return dequantize(arr[chosen]).contiguous(), labels


# ---------------------------------------------------------------------------------------------
# Measurement


@dataclass
class ChainRun:
    """One measured sampling run: a row per step in sampling order, and the final samples."""

    label: str
    eps_scale: str  # the schedule's flag form; "calibrated" runs give their table
    rows: list[dict]
    samples: torch.Tensor  # [N, C, H, W], the chains' outputs
    data: torch.Tensor  # [N, C, H, W], the images the chains started from

    def column(self, name: str) -> np.ndarray:
        return np.array([row[name] for row in self.rows], dtype=np.float64)

    def summary(self) -> dict:
        delta = self.column("delta")
        return {
            "mean_delta": float(delta.mean()),
            "last_delta": float(delta[-1]),
            "sample_std": _spread(self.samples),
            "data_std": _spread(self.data),
        }


class _OutputRecorder:
    """Calls the network and keeps what it returned, for the norms and the step that follows."""

    def __init__(self, model):
        self.model = model
        self.output = None

    def __call__(self, x, t, **kwargs):
        self.output = self.model(x, t, **kwargs)
        return self.output


def _spread(x: torch.Tensor) -> float:
    """Per-pixel standard deviation over the batch (population, as np.std), averaged over pixels."""
    return float(x.double().std(dim=0, unbiased=False).mean())


def stochastic_std(x_t: torch.Tensor, x_start: torch.Tensor, alpha_bar: float) -> float:
    """Std over the chains of x_t - sqrt(alpha_bar) x_0, per pixel, averaged over pixels."""
    return _spread(x_t.double() - math.sqrt(alpha_bar) * x_start.double())


def exposure_delta(x_t: torch.Tensor, x_start: torch.Tensor, alpha_bar: float) -> float:
    """The authors' delta_t: (stochastic_std - sqrt(1 - alpha_bar))^2."""
    return (stochastic_std(x_t, x_start, alpha_bar) - math.sqrt(1.0 - alpha_bar)) ** 2


def _mean_norm(eps: torch.Tensor) -> float:
    return float(eps.double().flatten(1).norm(dim=1).mean())


def run_chains(
    diffusion,
    model,
    images: torch.Tensor,
    schedule_at: ScheduleChooser,
    *,
    labels=None,
    seed: int = 0,
    batch_size: int = 64,
    clip_denoised: bool = True,
    use_ddim: bool = False,
    forward_norms: bool = True,
    progress: bool = False,
    label: str = "",
    eps_scale_text: str = "",
    time_shift=None,
) -> ChainRun:
    """Sample from forward-noised ``images``, choosing lambda step by step, and measure each step.

    ``schedule_at(t, eps_norm_sampling, eps_norm_forward)`` returns the EpsScale that step t
    uses; it is called after the network has seen every chain's x_t and before the step is taken
    (``eps_norm_forward`` is NaN when ``forward_norms`` is False). The network runs once per
    chain and step, plus once on forward-noised data when ``forward_norms``. Chain i draws its
    noise from image i's stream of ``seed``, the forward-noised probes from another stream.
    ``time_shift`` (time_shift.TimeShift or its text): each step moves an image to the timestep
    the Time-Shift rule chooses, as the sampling loops do; delta_t is still measured against the
    scheduled step's alpha_bar, so the rows say how far the chains are from where they should be.
    """
    from tqdm.auto import tqdm

    if images.dim() != 4 or len(images) < 2:
        raise ValueError(f"need at least 2 images as [N, C, H, W] to measure a spread, got {tuple(images.shape)}")
    if batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {batch_size}")
    if labels is not None and len(labels) != len(images):
        raise ValueError(f"got {len(labels)} labels for {len(images)} images")
    num_steps = diffusion.num_timesteps
    device = _model_device(model, images)
    data = images.to(device=device, dtype=torch.float32)
    channels = data.shape[1]
    batches = [range(i, min(i + batch_size, len(data))) for i in range(0, len(data), batch_size)]
    chain_noise = [ImageNoise(seed, b) for b in batches]
    probe_noise = [ImageNoise(seed, b, STREAM_EXTRA) for b in batches]
    kwargs = [{} if labels is None else {"y": labels[b.start:b.stop].to(device)} for b in batches]
    timestep_map = getattr(diffusion, "timestep_map", range(num_steps))
    shifter = diffusion.time_shifter(time_shift, ddim=use_ddim)

    def rows_of(tensor, i):
        return tensor[batches[i].start:batches[i].stop]

    def t_of(i, t):
        return torch.full((len(batches[i]),), t, dtype=torch.long, device=device)

    def noised(t, streams):
        return torch.cat([
            diffusion.q_sample(rows_of(data, i), t_of(i, t), noise=streams[i].randn(rows_of(data, i).shape, device))
            for i in range(len(batches))
        ])

    def network(x, i, t):
        recorder = _OutputRecorder(model)
        diffusion.p_mean_variance(recorder, rows_of(x, i), t_of(i, t), clip_denoised=clip_denoised,
                                  model_kwargs=kwargs[i], eps_scale=EpsScale())
        return recorder.output

    rows = []
    with torch.no_grad():
        x = noised(num_steps - 1, chain_noise)
        for t in tqdm(range(num_steps - 1, -1, -1), desc=label or "chains", disable=not progress, leave=False):
            abar = float(diffusion.alphas_cumprod[t])
            outputs = [network(x, i, t) for i in range(len(batches))]
            eps = torch.cat([out[:, :channels] for out in outputs])
            eps_norm_sampling = _mean_norm(eps)
            eps_norm_forward = marginal_forward = math.nan
            if forward_norms:
                probes = noised(t, probe_noise)
                eps_forward = torch.cat([network(probes, i, t)[:, :channels] for i in range(len(batches))])
                eps_norm_forward = _mean_norm(eps_forward)
                marginal_forward = _spread(probes)
            schedule = schedule_at(t, eps_norm_sampling, eps_norm_forward)
            std, target = stochastic_std(x, data, abar), math.sqrt(1.0 - abar)
            rows.append({
                "t": t,
                "timestep": int(timestep_map[t]),
                "alpha_bar": abar,
                "target_std": target,
                "std": std,
                "delta": (std - target) ** 2,  # exposure_delta, from the std already measured
                "marginal_std_sampling": _spread(x),
                "marginal_std_forward": marginal_forward,
                "lambda": schedule.value(t, num_steps),
                "eps_norm_sampling": eps_norm_sampling,
                "eps_norm_scaled": _mean_norm(scale_eps(eps, schedule, t, num_steps)),
                "eps_norm_forward": eps_norm_forward,
                "eps_norm_ratio": eps_norm_sampling / eps_norm_forward if eps_norm_forward else math.nan,
            })
            targets = [None if shifter is None else shifter.step(rows_of(x, i), t)[1] for i in range(len(batches))]
            x = torch.cat([
                _step(diffusion, outputs[i], rows_of(x, i), t_of(i, t), schedule, chain_noise[i], kwargs[i],
                      clip_denoised, use_ddim, targets[i])
                for i in range(len(batches))
            ])
    return ChainRun(label=label, eps_scale=eps_scale_text, rows=rows, samples=x.cpu(), data=data.cpu())


def measure_exposure_bias(diffusion, model, images, eps_scale=None, *, label: str = "", **kwargs) -> ChainRun:
    """``run_chains`` with one fixed lambda schedule (None: the baseline, lambda = 1)."""
    schedule = parse_eps_scale(eps_scale)
    schedule.validate(diffusion.num_timesteps)
    label = label or ("baseline" if schedule.is_identity else f"ES {schedule}")
    return run_chains(diffusion, model, images, lambda t, s, f: schedule, label=label,
                      eps_scale_text=str(schedule), **kwargs)


def _step(diffusion, output, x, t, schedule, noise, model_kwargs, clip_denoised, use_ddim, target=None):
    """One sampler step from x_t that reuses the network output already computed at x_t; ``target``
    (per image alpha_bar, or None) is a time shift's, taken by the loops' own shifted step."""

    def replay(*_args, **_kwargs):
        return output

    options = dict(clip_denoised=clip_denoised, model_kwargs=model_kwargs, eps_scale=schedule, generator=noise)
    if target is not None:
        step = diffusion._ddim_step if use_ddim else diffusion._ancestral_step
        extra = {"eta": 0.0} if use_ddim else {}
        return step(replay, x, t, denoised_fn=None, cond_fn=None, target_alpha_bar=target, **options, **extra)["sample"]
    if use_ddim:
        return diffusion.ddim_sample(replay, x, t, eta=0.0, **options)["sample"]
    return diffusion.p_sample(replay, x, t, **options)["sample"]


# ---------------------------------------------------------------------------------------------
# Output: CSV and JSON for machines, a PNG for people


def _finite_or_none(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def write_csv(runs: list[ChainRun], path) -> None:
    """One row per run and step: ``run``, ``eps_scale``, then STEP_COLUMNS."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(("run", "eps_scale", *STEP_COLUMNS))
    for run in runs:
        for row in run.rows:
            writer.writerow((run.label, run.eps_scale, *(row[c] for c in STEP_COLUMNS)))
    atomic_write_text(path, text.getvalue())


def runs_to_dict(runs: list[ChainRun]) -> list[dict]:
    return [
        {
            "label": run.label,
            "eps_scale": run.eps_scale,
            "summary": run.summary(),
            "steps": [{k: _finite_or_none(v) for k, v in row.items()} for row in run.rows],
        }
        for run in runs
    ]


def write_json(record: dict, path) -> None:
    """``record`` as strict JSON (NaN written as null), all or nothing."""
    atomic_write_text(path, json.dumps(record, indent=1, allow_nan=False) + "\n")


def write_plot(runs: list[ChainRun], path, title: str = "") -> None:
    """delta_t, the noise-prediction norms and lambda_t of every run, against the sampling step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    fig, (ax_delta, ax_norm, ax_lambda) = plt.subplots(1, 3, figsize=(16, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        t = run.column("t")
        shown = f"{run.label} (λ = {run.eps_scale})" if len(run.eps_scale) <= 24 else run.label
        ax_delta.plot(t, run.column("delta"), marker="o", ms=3, color=color, label=shown)
        ax_norm.plot(t, run.column("eps_norm_sampling"), marker="o", ms=3, color=color,
                     label=f"{run.label}: sampling")
        ax_lambda.plot(t, run.column("lambda"), marker="o", ms=3, color=color, label=run.label)
    forward = runs[0].column("eps_norm_forward")
    if np.isfinite(forward).all():
        ax_norm.plot(runs[0].column("t"), forward, color="black", linestyle="--",
                     label="forward-noised data (training)")
    ax_delta.set_ylabel(r"$\delta_t = (\mathrm{std}(x_t - \sqrt{\bar\alpha_t}\,x_0) - \sqrt{1-\bar\alpha_t})^2$")
    ax_delta.set_title(r"exposure bias $\delta_t$ (Ning et al.; 0 = forward-process spread)")
    ax_norm.set_ylabel(r"mean $\|\epsilon_\theta(x_t, t)\|_2$ (before scaling)")
    ax_norm.set_title("noise prediction norm: sampling vs training")
    ax_lambda.set_ylabel(r"$\lambda_t$ (predicted noise divided by it)")
    ax_lambda.set_title("Epsilon Scaling schedule")
    ax_lambda.axhline(1.0, color="gray", linewidth=0.8)
    for ax in (ax_delta, ax_norm, ax_lambda):
        ax.set_xlabel("sampling step t (left: first, noisiest; 0: last)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    atomic_write_figure(fig, path, dpi=110)

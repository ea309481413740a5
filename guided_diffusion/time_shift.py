"""Time-Shift sampling (Li et al., ICLR 2024, "Alleviating Exposure Bias in Diffusion Models through
Sampling with Shifted Time Steps"): the one place that decides which timestep a step moves to.

At a sampling step from scheduled time c to the next scheduled time j, the per-image variance of
the current sample is compared with the forward noise variance 1 - alpha_bar_k of candidate
timesteps k in a window around j; the step then moves each image to its best candidate instead of
to j. The network is still evaluated at the scheduled time c, and the next step starts from the
scheduled grid again: the shift only changes the noise level a step targets. Times, ``window`` and
``cutoff`` are in units of the original (unrespaced) chain, as in the authors' code.

Rules:

* ``"paper"`` (default), as the authors' TS-DPM code does it for DDIM (sampler/pnm_solver.py):
  candidates 1 - alpha_bar_k for k in [j - window//2, j + window//2], cut to [0, c - 1] (a step
  never moves an image to a noise level at or above the one it starts from; that cut is ours);
  the unbiased variance over C*H*W of each image, in float64; the first minimum wins (ties go to
  the less noisy k); only while j > cutoff; never on the first step (x_T) nor the last (to x_0).
* ``"tsdpm_adm"``: TS-DPM-ADM's released DDIM code (tingyu215/TS-DPM-ADM), quirks included, so
  its published command lines (``--do_time_shift --window --cutoff``) reproduce: candidate k has
  the value alpha_bar[T - 1 - k] (the flipped alpha_bar, not 1 - alpha_bar), the window is
  centred on the current c (slice [c - h, c + h], or [0, window] when c - h <= 0), the variance is
  torch.var of the float32 image, the cutoff is c > cutoff on the current c, and above it the
  step targets alpha_bar_prev[n - T // (N - 1)] = alpha_bar[n - T // (N - 1) - 1] of the
  original chain (N respaced steps; Python's negative index wraps, as there; cutoff 0 is not
  "off"). DDIM only: that code has no ancestral time shift.

Time shift is per image, so a batch gives each image what it gets alone. With Epsilon Scaling,
lambda stays indexed by the sampling step (the network runs at the scheduled time), not by the
shifted time. ``window`` 0 (or no TimeShift) is off: the samplers then run their plain code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["RULES", "TimeShift", "TimeShiftError", "parse_time_shift", "time_shift_from_flags", "StepShifter"]

RULES = ("paper", "tsdpm_adm")


class TimeShiftError(ValueError):
    """A time-shift setting that cannot be used; the message says what to pass instead."""


def _check_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TimeShiftError(f"time shift {what} must be a whole number of timesteps, got {value!r}")
    if value < 0:
        raise TimeShiftError(f"time shift {what} must be >= 0, got {value}")
    return int(value)


@dataclass(frozen=True)
class TimeShift:
    """Shift each step's target within ``window`` original timesteps while above ``cutoff``."""

    window: int
    cutoff: int
    rule: str = "paper"

    def __post_init__(self):
        object.__setattr__(self, "window", _check_int(self.window, "window"))
        object.__setattr__(self, "cutoff", _check_int(self.cutoff, "cutoff"))
        if self.rule not in RULES:
            raise TimeShiftError(f"time shift rule {self.rule!r} is not one of {', '.join(RULES)}")

    def validate(self, num_original_steps: int, num_steps: int, ddim: bool) -> None:
        """Raise ``TimeShiftError`` unless this setting fits a chain and sampler."""
        if self.window >= num_original_steps:
            raise TimeShiftError(
                f"time shift window {self.window} is not below the {num_original_steps} diffusion steps; use a smaller --window"
            )
        if self.cutoff >= num_original_steps:
            raise TimeShiftError(
                f"time shift cutoff {self.cutoff} is outside 0..{num_original_steps - 1}; use a smaller --cutoff"
            )
        if self.rule == "tsdpm_adm":
            if not ddim:
                raise TimeShiftError("time shift rule tsdpm_adm is TS-DPM-ADM's DDIM sampler; use DDIM or rule paper")
            if num_steps < 2:
                raise TimeShiftError("time shift rule tsdpm_adm needs at least 2 sampling steps")

    def __str__(self) -> str:
        return f"window={self.window},cutoff={self.cutoff},rule={self.rule}"


def parse_time_shift(spec) -> TimeShift | None:
    """None, a TimeShift or its string form ("window=80,cutoff=300[,rule=paper]"); None when off."""
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return None
    if isinstance(spec, str):
        fields = {}
        for part in spec.split(","):
            name, sep, value = (s.strip() for s in part.partition("="))
            if not sep or name not in ("window", "cutoff", "rule") or name in fields:
                raise TimeShiftError(f"cannot read time shift {spec!r}; use e.g. 'window=80,cutoff=300,rule=paper'")
            fields[name] = value
        if "window" not in fields or "cutoff" not in fields:
            raise TimeShiftError(f"time shift {spec!r} needs both window= and cutoff=, e.g. 'window=80,cutoff=300'")
        try:
            window, cutoff = int(fields["window"]), int(fields["cutoff"])
        except ValueError:
            raise TimeShiftError(f"time shift {spec!r}: window and cutoff must be whole numbers") from None
        spec = TimeShift(window, cutoff, fields.get("rule", "paper"))
    if not isinstance(spec, TimeShift):
        raise TimeShiftError(f"time_shift must be a TimeShift, its string form or None, got {spec!r}")
    return None if spec.window == 0 else spec


def time_shift_from_flags(do_time_shift: bool, window: int, cutoff: int, rule: str = "paper") -> TimeShift | None:
    """TS-DPM-ADM's flags (--do_time_shift, --window, --cutoff) plus our --time_shift_rule."""
    if not do_time_shift:
        return None
    return parse_time_shift(TimeShift(window, cutoff, rule))


def _per_image_variance(x: torch.Tensor, dtype) -> torch.Tensor:
    # one reduction per image, so the value does not depend on the batch it is in
    return torch.stack([row.to(dtype).reshape(-1).var() for row in x])


class StepShifter:
    """A TimeShift applied to one chain: ``step(x, i)`` for chain index i (N - 1 first, 0 last).

    ``timestep_map[i]``: original timestep of chain index i; ``original_alphas_cumprod``: the
    original chain's alpha_bar (float64); ``alphas_cumprod_prev``: the chain's own target
    alpha_bar per index, used where an image keeps its scheduled target (so its bytes are the
    plain sampler's).
    """

    def __init__(self, shift: TimeShift, timestep_map, original_alphas_cumprod, alphas_cumprod_prev):
        self.shift = shift
        self.timestep_map = [int(c) for c in timestep_map]
        self.abar = np.asarray(original_alphas_cumprod, dtype=np.float64)
        self.abar_prev = np.asarray(alphas_cumprod_prev, dtype=np.float64)
        self.num_original = len(self.abar)
        self.num_steps = len(self.timestep_map)

    def step(self, x: torch.Tensor, i: int):
        """(chosen, target): per image, the chosen original timestep (int64) and the alpha_bar the
        step moves it to (float64), or target None where the step is not shifted.

        ``chosen`` is, for "paper", the timestep the image moves to (the scheduled one, or -1 for
        x_0, where nothing shifts); for "tsdpm_adm", the window pick n of that code (c where it
        does not shift).
        """
        if self.shift.rule == "paper":
            return self._paper(x, i)
        return self._tsdpm_adm(x, i)

    def _fill(self, x, value):
        return torch.full((x.shape[0],), value, dtype=torch.long, device=x.device)

    def _paper(self, x, i):
        current = self.timestep_map[i]
        scheduled = self.timestep_map[i - 1] if i > 0 else -1
        half = self.shift.window // 2
        if i == self.num_steps - 1 or i == 0 or not scheduled > self.shift.cutoff or half == 0:
            return self._fill(x, scheduled), None
        low, high = max(0, scheduled - half), min(scheduled + half, current - 1)
        candidates = torch.from_numpy(1.0 - self.abar[low : high + 1]).to(x.device)
        variance = _per_image_variance(x, torch.float64)
        chosen = ((variance[:, None] - candidates[None, :]) ** 2).argmin(dim=1) + low
        abar = torch.from_numpy(self.abar).to(x.device)[chosen]
        target = torch.where(chosen == scheduled, torch.tensor(self.abar_prev[i], dtype=torch.float64, device=x.device), abar)
        return chosen, target

    def _tsdpm_adm(self, x, i):
        current = self.timestep_map[i]
        if i == self.num_steps - 1:
            return self._fill(x, current), None
        half, window, last = self.shift.window // 2, self.shift.window, self.num_original - 1
        low, high = (current - half, min(current + half, last)) if current - half > 0 else (0, min(window, last))
        flipped = self.abar[::-1]
        candidates = torch.from_numpy(flipped[low : high + 1].copy()).to(x.device)
        variance = _per_image_variance(x, x.dtype)
        picked = ((variance[:, None] - candidates[None, :]) ** 2).argmin(dim=1) + low
        cutoff = self.shift.cutoff
        chosen = picked if cutoff != 0 and current > cutoff else self._fill(x, current)
        if not current > cutoff:
            return chosen, None
        abar_prev_all = np.append(1.0, self.abar[:-1])
        index = chosen - self.num_original // (self.num_steps - 1)
        index = torch.where(index < 0, index + self.num_original, index)  # Python's wrap, as that code
        return chosen, torch.from_numpy(abar_prev_all).to(x.device)[index]

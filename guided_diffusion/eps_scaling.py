"""Epsilon Scaling (Ning et al., ICLR 2024): the one place that decides lambda_t.

Every sampler divides the network's predicted noise by lambda_t once per network evaluation,
where the noise enters the x0 prediction. lambda_t = k * t + b, where t is the index of the step
in the (respaced) sampling chain: t = T' - 1 at the first, noisiest step and t = 0 at the last.

String forms (the ``--eps_scale`` flag and the configs):

* ``1.017``                   constant (uniform) schedule, lambda_t = b
* ``linear:k=0.0025,b=1.0``   linear schedule, lambda_t = k * t + b
* ``table:1.01,1.02,...``     one value per step, listed in chain order t = 0, 1, ..., T' - 1

lambda = 1 is the baseline: ``scale_eps`` then returns its input unchanged, so unscaled
sampling is reproduced bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import torch

__all__ = [
    "EpsScale", "EpsScaleError", "parse_eps_scale", "adm_es_eps_scale", "resolve_eps_scale", "scale_eps",
    "sampling_order_t",
]


class EpsScaleError(ValueError):
    """A lambda schedule that cannot be used; the message says what to pass instead."""


def _check_value(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EpsScaleError(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise EpsScaleError(f"{what} must be finite, got {value}; use a value near 1.0 such as 1.017")
    return value


@dataclass(frozen=True)
class EpsScale:
    """A lambda_t schedule: ``b + k * t``, or an explicit ``table`` indexed by chain step t."""

    b: float = 1.0
    k: float = 0.0
    table: tuple[float, ...] | None = None

    def __post_init__(self):
        if self.table is not None:
            if len(self.table) == 0:
                raise EpsScaleError("eps_scale table is empty; give one value per sampling step")
            values = tuple(_check_value(v, "eps_scale table entry") for v in self.table)
            for i, v in enumerate(values):
                if v <= 0:
                    raise EpsScaleError(f"eps_scale table entry {i} is {v}; every lambda must be > 0")
            object.__setattr__(self, "table", values)
        else:
            object.__setattr__(self, "b", _check_value(self.b, "eps_scale b"))
            object.__setattr__(self, "k", _check_value(self.k, "eps_scale k"))
            if self.b <= 0:
                raise EpsScaleError(
                    f"eps_scale b = {self.b} would divide the noise by a non-positive number; "
                    "use 1.0 for no scaling or a value near 1.0 such as 1.017"
                )

    @property
    def is_identity(self) -> bool:
        if self.table is not None:
            return all(v == 1.0 for v in self.table)
        return self.b == 1.0 and self.k == 0.0

    def validate(self, num_steps: int) -> None:
        """Raise ``EpsScaleError`` unless this schedule gives a positive lambda at every step."""
        if num_steps < 1:
            raise EpsScaleError(f"a sampling chain needs at least one step, got {num_steps}")
        if self.table is not None:
            if len(self.table) != num_steps:
                raise EpsScaleError(
                    f"eps_scale table has {len(self.table)} values but the sampler takes "
                    f"{num_steps} steps; give exactly one value per step"
                )
            return
        last = self.b + self.k * (num_steps - 1)
        if last <= 0:
            raise EpsScaleError(
                f"eps_scale {self} gives lambda = {last:.6g} at step t = {num_steps - 1}; "
                "every lambda must be > 0"
            )

    def value(self, t: int, num_steps: int) -> float:
        """lambda_t for chain index t (num_steps - 1 = first sampling step, 0 = last)."""
        if not 0 <= t < num_steps:
            raise EpsScaleError(f"step index t = {t} is outside the chain 0..{num_steps - 1}")
        if self.table is not None:
            self.validate(num_steps)
            return self.table[t]
        return self.k * t + self.b

    def values(self, num_steps: int) -> list[float]:
        """lambda_t for t = 0 .. num_steps - 1, after checking the schedule fits the chain."""
        self.validate(num_steps)
        return [self.value(t, num_steps) for t in range(num_steps)]

    def __str__(self) -> str:
        if self.table is not None:
            return "table:" + ",".join(repr(v) for v in self.table)
        if self.k == 0.0:
            return repr(self.b)
        return f"linear:k={self.k!r},b={self.b!r}"


def parse_eps_scale(spec) -> EpsScale:
    """Turn a flag value (string, number, EpsScale or None) into an ``EpsScale``.

    ``None`` and ``""`` mean no scaling. ``0`` is refused: ADM-ES used it as "off", but it divides
    by zero.
    """
    if spec is None or (isinstance(spec, str) and spec.strip() == ""):
        return EpsScale()
    if isinstance(spec, EpsScale):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return EpsScale(b=spec)
    if not isinstance(spec, str):
        raise EpsScaleError(f"eps_scale must be a number or a string such as '1.017', got {spec!r}")
    text = spec.strip()
    try:
        if text.startswith("linear:"):
            fields = {}
            for part in text[len("linear:"):].split(","):
                name, sep, val = part.partition("=")
                name = name.strip()
                if not sep or name not in ("k", "b") or name in fields:
                    raise ValueError
                fields[name] = float(val)
            if "k" not in fields:
                raise ValueError
            return EpsScale(b=fields.get("b", 1.0), k=fields["k"])
        if text.startswith("table:"):
            return EpsScale(table=tuple(float(v) for v in text[len("table:"):].split(",")))
        return EpsScale(b=float(text))
    except EpsScaleError:
        raise
    except ValueError:
        raise EpsScaleError(
            f"cannot read eps_scale {spec!r}; use a number ('1.017'), "
            "'linear:k=0.0025,b=1.0' or 'table:v0,v1,...' (one value per step)"
        ) from None


def adm_es_eps_scale(eps_scaler) -> EpsScale | None:
    """ADM-ES's ``eps_scaler`` key (a number; ADM-ES's default 0.0) as a schedule, or None when off.

    ADM-ES's default 0.0 would divide the noise by zero; here it means "not given", so code written
    against ADM-ES's script_util keeps ADM's behaviour unless it sets a lambda.
    """
    if eps_scaler is None:
        return None
    value = _check_value(eps_scaler, "eps_scaler")
    if value < 0:
        raise EpsScaleError(f"eps_scaler must be >= 0 (0: off), got {value}")
    return None if value == 0 else EpsScale(b=value)


def resolve_eps_scale(call_value, default) -> EpsScale:
    """The schedule a sampling call uses: its own ``eps_scale=`` if given, else the default."""
    return parse_eps_scale(default if call_value is None else call_value)


def scale_eps(eps: torch.Tensor, schedule: EpsScale, t, num_steps: int) -> torch.Tensor:
    """Return eps / lambda_t. ``t`` is the chain index: an int or a per-sample tensor."""
    if schedule.is_identity:
        return eps
    if schedule.table is None and schedule.k == 0.0:
        # a Python scalar, as ADM-ES divides: the same bytes on every device (CUDA divides by a
        # scalar and by a tensor differently in the last bit)
        return eps / schedule.b
    if isinstance(t, torch.Tensor):
        schedule.validate(num_steps)
        # the range check reads t back; on a GPU that would stall every step (sampling loops only
        # pass indices of the chain they validated), so it runs where it is free
        if t.device.type == "cpu" and t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_steps):
            raise EpsScaleError(f"step index outside the chain 0..{num_steps - 1}")
        if schedule.table is not None:
            table = torch.tensor(schedule.table, dtype=torch.float64, device=t.device)
            lam = table[t.long()]
        else:
            lam = schedule.k * t.to(torch.float64) + schedule.b
        lam = lam.to(eps.dtype).reshape(-1, *([1] * (eps.dim() - 1)))
        return eps / lam
    return eps / schedule.value(int(t), num_steps)


def sampling_order_t(step: int, num_steps: int) -> int:
    """Chain index t for the ``step``-th evaluation in sampling order (0 = first, noisiest)."""
    return num_steps - 1 - step


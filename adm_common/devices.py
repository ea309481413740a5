"""The one check of a --device flag, shared by the samplers and the evaluator."""

from __future__ import annotations

import torch

from adm_common.errors import UsageError


def check_device(value: str, flag: str = "--device") -> None:
    """Refuse a device this machine does not have (a typo, a GPU that is not there), in one line.
    An empty value means "choose for me" and passes."""
    if not value:
        return
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown {flag} {value!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError(f"{flag} {value}: no CUDA GPU is visible on this machine; use {flag} cpu")
        if (device.index or 0) >= count:
            raise UsageError(f"{flag} {value}: only {count} CUDA GPU(s) are visible (cuda:0..cuda:{count - 1})")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"{flag} {value}: no Apple GPU (MPS) is available here; use {flag} cpu")
    elif device.type != "cpu":
        raise UsageError(f"{flag} {value}: use cpu, cuda or cuda:N")

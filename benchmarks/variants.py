"""What a benchmark compares: variants (plain eager float32, or switches of guided_diffusion/run/speed.py
joined by "+"), how each is built from a network, and the tolerance its output is checked to."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from guided_diffusion.run.speed import AUTOCAST_REL_TOL, FLOAT32_ATOL, optimize_for_sampling


SWITCHES = ("sdpa", "inference", "channels_last", "compile", "graphs", "bf16", "fp16", "adm_fp16", "tf32", "autotune")
CUDA_ONLY = {
    "graphs": "CUDA graphs need a GPU",
    "fp16": "this CPU has no float16 arithmetic units",
    "adm_fp16": "ADM's scripts run float16 convolutions on GPUs only",
    "tf32": "TF32 exists on NVIDIA GPUs only",
    "autotune": "cudnn.benchmark exists on NVIDIA GPUs only",
}
HALF_SWITCHES = ("bf16", "fp16", "adm_fp16")


# ---------------------------------------------------------------------------------------------
# Variants


@dataclass(frozen=True)
class Variant:
    name: str
    switches: frozenset

    @classmethod
    def parse(cls, name: str) -> "Variant":
        parts = [] if name == "eager" else name.split("+")
        unknown = [p for p in parts if p not in SWITCHES]
        if unknown:
            raise ValueError(f"unknown switch {unknown[0]!r} in variant {name!r}; use eager or +-joined {', '.join(SWITCHES)}")
        if sum(p in HALF_SWITCHES for p in parts) > 1:
            raise ValueError(f"variant {name!r} names more than one of {', '.join(HALF_SWITCHES)}; choose one")
        return cls(name, frozenset(parts))

    def skip_reason(self, device: torch.device, allow_compile: bool = True) -> str | None:
        if device.type != "cuda":
            for switch, reason in CUDA_ONLY.items():
                if switch in self.switches:
                    return reason
        if "compile" in self.switches and not allow_compile:
            return "torch.compile left out of this run (it takes minutes here)"
        return None

    @property
    def precision(self) -> str:
        if "bf16" in self.switches:
            return "bfloat16"
        if self.switches & {"fp16", "adm_fp16"}:
            return "float16"
        return "tf32" if "tf32" in self.switches else "float32"


def parse_variants(text: str) -> list[Variant]:
    variants = [Variant.parse(v.strip()) for v in text.split(",") if v.strip()]
    if not variants or variants[0].name != "eager":
        raise ValueError("the variant list must start with eager (the baseline every ratio refers to)")
    return variants


@contextlib.contextmanager
def backend_flags(variant: Variant, device: torch.device):
    """TF32 and cuDNN autotuning as the variant asks (CUDA), restored afterwards."""
    if device.type != "cuda":
        yield
        return
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = "tf32" in variant.switches
    torch.backends.cudnn.benchmark = "autotune" in variant.switches
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved


def build_variant(base_model: torch.nn.Module, variant: Variant):
    """The float32 network with the variant's switches. Switches that convert the network in place
    get a copy, so the base network stays as it is; the others share its weights."""
    s = variant.switches
    model = copy.deepcopy(base_model) if s & {"channels_last", "adm_fp16"} else base_model
    if "adm_fp16" in s:
        model.convert_to_fp16()
    autocast = "bfloat16" if "bf16" in s else "float16" if "fp16" in s else None
    return optimize_for_sampling(
        model,
        fused_attention="sdpa" in s,
        channels_last="channels_last" in s,
        inference_mode="inference" in s,
        autocast_dtype=autocast,
        compile="compile" in s,
        cuda_graphs="graphs" in s,
    )


def compare_outputs(out: torch.Tensor, ref: torch.Tensor, precision: str) -> dict:
    """Agreement with eager float32: max |diff| for float32 switches, relative L2 error otherwise."""
    diff = out.double() - ref.double()
    max_abs = diff.abs().max().item()
    rel_l2 = (diff.norm() / ref.double().norm().clamp_min(1e-30)).item()
    finite = bool(torch.isfinite(out).all())
    if precision == "float32":
        # 1e-4 is the reference tolerance for outputs of order 1; larger outputs scale it.
        tolerance = FLOAT32_ATOL * max(1.0, ref.abs().max().item())
        equal = finite and max_abs <= tolerance
        criterion = "max_abs"
    else:
        tolerance = AUTOCAST_REL_TOL[torch.bfloat16 if precision == "bfloat16" else torch.float16]
        equal = finite and rel_l2 <= tolerance
        criterion = "rel_l2"
    return dict(max_abs_diff=max_abs, rel_l2_error=rel_l2, criterion=criterion, tolerance=tolerance, equal=equal)

"""Safe checkpoint loading: tensors only, clear errors, and the flags a state_dict's shapes imply.

A checkpoint from the internet must not be able to run code, so files are read with
``torch.load(..., weights_only=True)`` or as safetensors, never with a plain pickle.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from adm_common.files import sha256_file
from adm_common.errors import UsageError, first_line

_WRAPPER_KEYS = ("state_dict", "model", "ema")

# Flags that a UNet checkpoint's shapes determine (see infer_unet_flags).
SHAPE_FLAGS = ("num_channels", "num_res_blocks", "channel_mult", "attention_resolutions", "learn_sigma",
               "class_cond", "num_classes", "use_scale_shift_norm", "resblock_updown")


def _describe_wrong_file(path: Path, obj) -> str | None:
    """Name what a loaded object is when it is not a model state_dict, and what to pass instead."""
    if isinstance(obj, dict) and "param_groups" in obj and "state" in obj:
        return (
            f"{path} is an optimizer state (ADM writes opt*.pt beside the weights); "
            "pass the model*.pt or ema_*.pt file from the same folder instead"
        )
    if not isinstance(obj, dict):
        return f"{path} holds a {type(obj).__name__}, not a state_dict of tensors; pass a model checkpoint"
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        return (
            f"{path} is not a model state_dict (entry {bad[0]!r} is a {type(obj[bad[0]]).__name__}, "
            "not a tensor); pass a model*.pt, ema_*.pt or .safetensors file"
        )
    if not obj:
        return f"{path} is an empty state_dict; pass a trained model checkpoint"
    return None


def load_state_dict(path, map_location="cpu") -> dict:
    """Load model weights from a .pt/.pth (tensors only) or .safetensors file.

    Raises UsageError with one line for a missing file, an optimizer file, a pickle that would need
    code to load (EDM .pkl, arbitrary objects), or anything else that is not a state_dict.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --model_path")
    if path.is_dir():
        raise UsageError(f"checkpoint {path} is a folder; pass the .pt or .safetensors file inside it")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as exc:
            raise UsageError(f"{path} is not a readable safetensors file ({first_line(exc, limit=160)})") from None
        return _checked(path, obj)
    if path.suffix == ".pkl":
        raise UsageError(
            f"{path} is a pickle (EDM's network format); convert it with "
            "scripts/convert_edm_pkl.py, which reads it without running its code"
        )
    if path.stat().st_size == 0:
        raise UsageError(f"{path} is empty (0 bytes): a copy or download cut short; fetch the checkpoint again")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = first_line(exc, "unsupported object", limit=160)
        if "truncated" in first or "ran out of input" in first.lower():
            raise UsageError(f"{path} is cut short ({first}); fetch the checkpoint again") from None
        raise UsageError(
            f"{path} contains pickled objects that safe loading refuses ({weights_only_refusal(exc)}); "
            "only files of tensors (model*.pt, ema_*.pt, .safetensors) are loaded"
        ) from None
    except Exception as exc:  # any other failure to parse (a cut-short file, a deep pickle): not a checkpoint
        raise UsageError(f"{path} is not a readable PyTorch checkpoint ({first_line(exc, limit=160)})") from None
    while isinstance(obj, dict) and len(obj) == 1 and next(iter(obj)) in _WRAPPER_KEYS:
        obj = next(iter(obj.values()))
    return _checked(path, obj)


def _checked(path: Path, obj) -> dict:
    """``obj`` if it is a non-empty state_dict of finite tensors, else one UsageError line."""
    problem = _describe_wrong_file(path, obj)
    if problem:
        raise UsageError(problem)
    bad = [k for k, v in obj.items() if (v.is_floating_point() or v.is_complex()) and not bool(torch.isfinite(v).all())]
    if bad:
        raise UsageError(
            f"{path} holds NaN or infinite weights in {len(bad)} tensor{'s' if len(bad) > 1 else ''} (first {bad[0]}): "
            "a damaged file or a diverged training run; use an earlier checkpoint"
        )
    return obj


def weights_only_refusal(exc: BaseException) -> str:
    """What torch's weights-only loader refused (e.g. 'Unsupported global: GLOBAL posix.system'),
    without its advice to load the file with weights_only=False, which would run the file's code."""
    advice = ("weights_only", "weights only", "torch.load", "trust", "still be loaded", "alternatively",
              "file an issue", "documentation", "safe_globals", "allowlist")
    text = str(exc).replace("WeightsUnpickler error:", "\n")
    for sentence in re.split(r"(?<=\.)\s+|\n+", text):
        sentence = " ".join(sentence.split()).rstrip(".")
        if sentence and not any(word in sentence.lower() for word in advice):
            return sentence[:160]
    return "an object that is not a tensor"


# ---------------------------------------------------------------------------------------------
# What the shapes say


def _block_indices(state_dict, prefix: str) -> list[int]:
    pattern = re.compile(rf"^{prefix}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state_dict if (m := pattern.match(k))})


def infer_unet_flags(state_dict, image_size: int | None = None) -> dict:
    """The UNet flags that a UNetModel/SuperResModel state_dict's keys and shapes determine.

    Head count/width, attention order, dropout, the noise schedule and timestep rescaling leave no
    trace in the shapes; they must come from flags or a config. ``attention_resolutions`` needs
    ``image_size`` (pixels = image_size / downsample rate); without it that flag is left out.
    """
    sd = state_dict
    if "time_embed.0.weight" not in sd or "out.2.weight" not in sd:
        raise UsageError("checkpoint is not an ADM UNet (no time_embed.0.weight / out.2.weight)")
    ch = sd["time_embed.0.weight"].shape[1]
    flags = {"num_channels": int(ch)}
    in_ch = sd["input_blocks.0.0.weight"].shape[1]
    out_ch = sd["out.2.weight"].shape[0]
    flags["in_channels"] = int(in_ch)
    flags["learn_sigma"] = bool(out_ch == 2 * (in_ch // 2 if in_ch == 6 else in_ch))
    flags["class_cond"] = "label_emb.weight" in sd
    if flags["class_cond"]:
        flags["num_classes"] = int(sd["label_emb.weight"].shape[0])

    outputs = _block_indices(sd, "output_blocks")
    first_up = next(
        (i for i in outputs if any(k.startswith((f"output_blocks.{i}.1.conv", f"output_blocks.{i}.2.conv",
                                                 f"output_blocks.{i}.1.in_layers", f"output_blocks.{i}.2.in_layers"))
                                   for k in sd)),
        None,
    )
    num_levels_guess = None
    if first_up is None:  # a single level has no upsampler
        num_res_blocks = len(outputs) - 1
        num_levels_guess = 1
    else:
        num_res_blocks = first_up
    flags["num_res_blocks"] = int(num_res_blocks)
    levels = num_levels_guess or len(outputs) // (num_res_blocks + 1)

    mult, attention_ds = [], []
    idx, ds = 1, 1
    for level in range(levels):
        out_w = sd[f"input_blocks.{idx}.0.out_layers.3.weight"].shape[0]
        mult.append(out_w / ch if out_w % ch else out_w // ch)
        if any(k.startswith(f"input_blocks.{idx}.1.qkv") for k in sd):
            attention_ds.append(ds)
        idx += num_res_blocks
        if level != levels - 1:
            flags["resblock_updown"] = any(k.startswith(f"input_blocks.{idx}.0.in_layers") for k in sd)
            idx += 1
            ds *= 2
    flags.setdefault("resblock_updown", False)
    flags["channel_mult"] = ",".join(str(m) for m in mult)
    emb_out = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
    flags["use_scale_shift_norm"] = bool(emb_out == 2 * sd["input_blocks.1.0.out_layers.3.weight"].shape[0])
    flags["attention_ds"] = tuple(attention_ds)
    if image_size:
        flags["attention_resolutions"] = ",".join(str(image_size // d) for d in attention_ds)
    return flags


def check_fits(model: torch.nn.Module, state_dict: dict, image_size: int | None = None) -> None:
    """Raise one clear line if ``state_dict`` does not fit ``model``: the first mismatching keys
    and, for a UNet, the flags whose values the checkpoint's shapes imply."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    wrong = [k for k in expected if k in state_dict and tuple(expected[k].shape) != tuple(state_dict[k].shape)]
    if not (missing or unexpected or wrong):
        return
    parts = []
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} shape mismatches (first {k}: checkpoint {tuple(state_dict[k].shape)}, "
            f"model {tuple(expected[k].shape)})"
        )
    if missing:
        parts.append(f"{len(missing)} keys missing from the checkpoint (first {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]})")
    hint = ""
    if "time_embed.0.weight" in state_dict and "time_embed.0.weight" in expected:
        try:
            implied = infer_unet_flags(state_dict, image_size)
            mine = infer_unet_flags(expected, image_size)
        except (KeyError, UsageError):
            implied = mine = {}
        diffs = [
            f"--{k} {_flag_text(implied[k])} (flags give {_flag_text(mine.get(k))})"
            for k in implied
            if k not in ("attention_ds", "in_channels") and implied[k] != mine.get(k)
        ]
        if not diffs and implied.get("attention_ds") != mine.get("attention_ds"):
            diffs = [f"--attention_resolutions (checkpoint attends at downsample rates {implied.get('attention_ds')})"]
        if diffs:
            hint = "; the checkpoint's shapes say " + ", ".join(diffs)
    raise UsageError("checkpoint does not fit the model flags: " + "; ".join(parts) + hint)


def _flag_text(value) -> str:
    return str(value) if not isinstance(value, bool) else ("True" if value else "False")


def load_model_weights(model: torch.nn.Module, path, image_size: int | None = None) -> str:
    """Load ``path`` into ``model`` after checking it fits; return the file's sha256."""
    state_dict = load_state_dict(path)
    check_fits(model, state_dict, image_size)
    model.load_state_dict(state_dict)
    return sha256_file(path)

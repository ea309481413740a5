"""Checkpoint configs: guided_diffusion/configs/NAME.yaml, the flags of a released checkpoint, as flag defaults.

``parse_args_with_config`` is how every script reads its command line: a config's flags fill in
what the user did not type, and the flags the user typed win.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from adm_common.errors import UsageError

# Package data (setup.py's package_data): found the same in a checkout and in an installed wheel.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def config_path(name_or_path: str) -> Path:
    """A config given by name (``imagenet64_cond``) or by path (``my_configs/imagenet64_cond.yaml``)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate
    by_name = CONFIG_DIR / f"{candidate.stem}.yaml"
    if by_name.exists():
        return by_name
    known = ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))) or "none"
    raise UsageError(f"config {name_or_path!r} not found; known configs: {known}")


def load_config(name_or_path: str) -> dict:
    """Read a checkpoint config; see guided_diffusion/configs/README.md for the fields."""
    import yaml

    path = config_path(name_or_path)
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UsageError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(config, dict) or not isinstance(config.get("flags"), dict):
        raise UsageError(f"config {path} has no 'flags' mapping; see guided_diffusion/configs/README.md")
    config["path"] = str(path)
    return config


def typed_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The destinations of the flags in ``argv`` as argparse resolves them, aliases (--eps_scaler)
    and unambiguous abbreviations (--num_sample) included."""
    options = {opt: action.dest for action in parser._actions for opt in action.option_strings}
    dests = set()
    for item in argv:
        if not item.startswith("--"):
            continue
        name = item.split("=", 1)[0]
        matches = {options[name]} if name in options else {d for o, d in options.items() if o.startswith(name)}
        if len(matches) == 1:
            dests |= matches
    return dests


def parse_args_with_config(parser: argparse.ArgumentParser, argv=None):
    """Parse flags where ``--config`` supplies defaults and flags given explicitly override them.

    Returns (args, config or None, set of flag names the user typed).
    """
    args = parser.parse_args(argv)
    explicit = typed_flags(parser, sys.argv[1:] if argv is None else list(argv))
    config = None
    if getattr(args, "config", None):
        config = load_config(args.config)
        layered = {**config["flags"], **(config.get("sample_flags") or {})}
        actions = {}
        for action in parser._actions:
            actions.setdefault(action.dest, action)  # the first flag of a destination converts its value
        for key, value in layered.items():
            if key in actions and key not in explicit:
                convert = actions[key].type
                setattr(args, key, convert(value) if convert and isinstance(value, str) else value)
        shipped = config.get("checkpoint_path")
        if shipped and hasattr(args, "model_path") and "model_path" not in explicit:
            args.model_path = str(CONFIG_DIR.parent / shipped)  # inside the package, wherever it is installed
    return args, config, explicit

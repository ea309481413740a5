"""The lambda a run samples with, decided once from the flags and the config (the paper's values).

``choose_eps_scale`` is called once per run; the ``EpsScale`` it holds is parsed and validated for
the run's step count and goes to the sampler as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from adm_common.errors import UsageError
from guided_diffusion.eps_scaling import EpsScale, adm_es_eps_scale, parse_eps_scale


def eps_scale_flag(args):
    """The lambda the user typed: ``--eps_scale``, else ADM-ES's numeric ``--eps_scaler`` (0, its
    default, means not given); None when neither. Both, disagreeing, is refused."""
    typed = getattr(args, "eps_scale", None)
    adm_es = adm_es_eps_scale(getattr(args, "eps_scaler", None))
    if adm_es is None:
        return typed
    if typed is not None and not str(typed).strip().startswith("paper") and parse_eps_scale(typed) == adm_es:
        return typed
    if typed is not None:
        raise UsageError(f"--eps_scale {typed} and --eps_scaler {adm_es.b} disagree; give one of them")
    return str(adm_es)


def sampling_eps_scale(flag_value, config: dict | None, num_steps: int, table: str | None = None):
    """The lambda schedule of a sampling run and where it came from.

    ``flag_value`` None means: the config's published lambda for ``num_steps`` (uniform), when the
    config has one, else no scaling. ``paper`` / ``paper:linear`` ask for the published value
    explicitly and fail when there is none. ``table`` names the config's table of uniform lambdas
    where it is not "uniform" (EDM's configs have one per solver: heun, euler).
    """
    if flag_value is not None and not str(flag_value).strip().startswith("paper"):
        schedule = parse_eps_scale(flag_value)
        schedule.validate(num_steps)
        return schedule, "--eps_scale"
    required = flag_value is not None  # "paper..." asks for a published value; None takes one if there is
    kind = (str(flag_value).partition(":")[2].strip() if required else "") or "uniform"
    if kind not in ("uniform", "linear"):
        raise UsageError(f"--eps_scale {flag_value}: use paper, paper:uniform or paper:linear")
    name = table if table and kind == "uniform" else kind
    published = ((config or {}).get("eps_scale") or {}).get(name) or {}
    value = published.get(num_steps, published.get(str(num_steps)))
    if value is None:
        if required:
            where = config["path"] if config else "no --config"
            raise UsageError(
                f"no published {name} lambda for {num_steps} steps in {where}; "
                f"published step counts: {sorted(int(k) for k in published) or 'none'}; pass --eps_scale VALUE"
            )
        return parse_eps_scale(None), "default (no scaling)"
    schedule = parse_eps_scale(value)
    schedule.validate(num_steps)
    return schedule, f"paper ({Path(config['path']).name}, {name}, {num_steps} steps)"


@dataclass(frozen=True)
class EpsChoice:
    """A run's lambda schedule, validated for ``num_steps``, and where it came from."""

    schedule: EpsScale
    source: str
    num_steps: int

    def settings(self) -> dict:
        """What the run's identity keeps: shards made with another lambda are refused."""
        return {"eps_scale": str(self.schedule)}

    def record(self) -> dict:
        """What the sidecar adds: where lambda came from and its value at every step."""
        return {"eps_scale_source": self.source, "eps_scale_values": self.schedule.values(self.num_steps)}


def choose_eps_scale(args, config: dict | None, num_steps: int, table: str | None = None) -> EpsChoice:
    """The run's lambda from ``--eps_scale`` / ``--eps_scaler`` and the config (``sampling_eps_scale``)."""
    schedule, source = sampling_eps_scale(eps_scale_flag(args), config, num_steps, table)
    return EpsChoice(schedule, source, num_steps)

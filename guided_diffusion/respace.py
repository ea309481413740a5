"""Sampling with fewer steps than training: a diffusion over a subset of the original timesteps."""

import numpy as np
import torch as th

from guided_diffusion.gaussian_diffusion import GaussianDiffusion


def space_timesteps(num_timesteps, section_counts):
    """Choose which of ``num_timesteps`` original steps a shorter chain keeps.

    :param section_counts: a list of counts, or a comma-separated string such as "10,15,20":
        the original steps are cut into equal sections and count i steps are spread evenly over
        section i. "ddimN" instead takes every k-th step, starting at 0, for the integer stride k
        that gives exactly N steps (DDIM's uniform striding).
    :return: a set of original step indices.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            try:
                desired = int(section_counts[len("ddim") :])
            except ValueError:
                raise ValueError(
                    f"cannot read timestep respacing {section_counts!r}; use e.g. ddim25"
                ) from None
            for stride in range(1, num_timesteps):
                steps = range(0, num_timesteps, stride)
                if len(steps) == desired:
                    return set(steps)
            raise ValueError(
                f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride; "
                f'use a section count such as "{desired}" instead of ddim{desired}'
            )
        try:
            section_counts = [int(c) for c in section_counts.split(",")]
        except ValueError:
            raise ValueError(
                f"cannot read timestep respacing {section_counts!r}; use counts such as "
                '"250" or "10,15,20", or ddimN'
            ) from None
    if not section_counts:
        raise ValueError("timestep respacing is empty; give at least one step count")

    size_per, extra = divmod(num_timesteps, len(section_counts))
    start = 0
    chosen = []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if count < 1 or count > size:
            raise ValueError(
                f"cannot take {count} steps from a section of {size} steps; "
                f"each count must be between 1 and {size}"
            )
        stride = 1 if count == 1 else (size - 1) / (count - 1)
        # The position is a running sum of the stride, as ADM computes it: j * stride rounds
        # differently for some counts (21 of 1000 steps: 500 where ADM takes 499).
        position = 0.0
        for _ in range(count):
            chosen.append(start + round(position))
            position += stride
        start += size
    return set(chosen)


class SpacedDiffusion(GaussianDiffusion):
    """A GaussianDiffusion that keeps only ``use_timesteps`` of the base process.

    Its betas are chosen so alpha_bar at each kept step equals the base process's. Indices t
    passed to its methods run over the shorter chain (0 .. len(use_timesteps) - 1); the model and
    cond_fn are wrapped so they see the original timesteps (``timestep_map[t]``). Epsilon Scaling
    indexes lambda by the shorter chain's t.

    :param kwargs: GaussianDiffusion's arguments for the base (unspaced) process.
    """

    def __init__(self, use_timesteps, **kwargs):
        self.use_timesteps = set(use_timesteps)
        self.timestep_map = []
        self._map_tensors = {}
        self.original_num_steps = len(kwargs["betas"])

        # eps_scale belongs to the spaced chain; a table of its length would not fit the base one.
        base_diffusion = GaussianDiffusion(**{**kwargs, "eps_scale": None, "eps_scaler": 0.0})
        last_alpha_cumprod = 1.0
        new_betas = []
        for i, alpha_cumprod in enumerate(base_diffusion.alphas_cumprod):
            if i in self.use_timesteps:
                new_betas.append(1 - alpha_cumprod / last_alpha_cumprod)
                last_alpha_cumprod = alpha_cumprod
                self.timestep_map.append(i)
        if len(self.timestep_map) != len(self.use_timesteps):
            outside = sorted(t for t in self.use_timesteps if t not in set(self.timestep_map))
            raise ValueError(
                f"timesteps {outside[:5]} are outside the base process 0..{self.original_num_steps - 1}"
            )
        super().__init__(**{**kwargs, "betas": np.array(new_betas)})
        self.original_alphas_cumprod = base_diffusion.alphas_cumprod

    def p_mean_variance(self, model, *args, **kwargs):
        return super().p_mean_variance(self._wrap_model(model), *args, **kwargs)

    def training_losses(self, model, *args, **kwargs):
        return super().training_losses(self._wrap_model(model), *args, **kwargs)

    def condition_mean(self, cond_fn, *args, **kwargs):
        return super().condition_mean(self._wrap_model(cond_fn), *args, **kwargs)

    def condition_score(self, cond_fn, *args, **kwargs):
        return super().condition_score(self._wrap_model(cond_fn), *args, **kwargs)

    def _original_chain(self):
        return self.timestep_map, self.original_alphas_cumprod

    def _wrap_model(self, model):
        if isinstance(model, _WrappedModel):
            return model
        return _WrappedModel(model, self.timestep_map, self.rescale_timesteps, self.original_num_steps,
                             self._map_tensors)

    def _scale_timesteps(self, t):
        # _WrappedModel maps and rescales.
        return t


class _WrappedModel:
    """Calls a model (or cond_fn) with original timesteps in place of the spaced chain's indices."""

    def __init__(self, model, timestep_map, rescale_timesteps, original_num_steps, map_tensors=None):
        self.model = model
        self.timestep_map = timestep_map
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = original_num_steps
        self.map_tensors = {} if map_tensors is None else map_tensors

    def __call__(self, x, ts, **kwargs):
        key = (str(ts.device), ts.dtype)
        if key not in self.map_tensors:  # uploaded once per diffusion and device, not every call
            self.map_tensors[key] = th.tensor(self.timestep_map, device=ts.device, dtype=ts.dtype)
        new_ts = self.map_tensors[key][ts]
        if self.rescale_timesteps:
            new_ts = new_ts.float() * (1000.0 / self.original_num_steps)
        return self.model(x, new_ts, **kwargs)

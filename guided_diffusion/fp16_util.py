"""Mixed-precision training as ADM does it, with ADM's function names.

The model's convolutions run in float16; the optimizer updates float32 "master" copies of all
parameters, flattened into two tensors (vectors and scalars in one, matrices in the other).
The loss is multiplied by 2**lg_loss_scale before backward so that small float16 gradients
do not underflow; a step whose gradients are not finite is skipped and the scale lowered by
one power of two, and every successful step raises lg_loss_scale by `fp16_scale_growth`.
"""

import math

import torch
import torch.nn as nn

from guided_diffusion import logger

INITIAL_LOG_LOSS_SCALE = 20.0

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _convert_conv(module, dtype):
    if isinstance(module, _CONV_TYPES):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f16(l):  # noqa: E741 (ADM's parameter name)
    """Convert a convolution's parameters to float16 (other modules are left alone); for Module.apply."""
    _convert_conv(l, torch.float16)


def convert_module_to_f32(l):  # noqa: E741 (ADM's parameter name)
    """Convert a convolution's parameters back to float32; for Module.apply."""
    _convert_conv(l, torch.float32)


def get_param_groups_and_shapes(named_model_params):
    """Split (name, param) pairs into [(scalars and vectors, (-1,)), (matrices, (1, -1))]; empty groups are dropped."""
    named_model_params = list(named_model_params)
    groups = [
        ([(n, p) for n, p in named_model_params if p.ndim <= 1], (-1,)),
        ([(n, p) for n, p in named_model_params if p.ndim > 1], (1, -1)),
    ]
    return [(group, shape) for group, shape in groups if group]


def _flatten(tensors):
    return torch.cat([t.reshape(-1).float() for t in tensors])


def make_master_params(param_groups_and_shapes):
    """One float32 master parameter per group: the group's parameters flattened and concatenated."""
    master_params = []
    for param_group, shape in param_groups_and_shapes:
        flat = _flatten([param.detach() for _, param in param_group]).view(shape)
        master_params.append(nn.Parameter(flat, requires_grad=True))
    return master_params


def param_grad_or_zeros(param):
    """The parameter's gradient, or zeros of its shape when it has none."""
    if param.grad is not None:
        return param.grad.detach()
    return torch.zeros_like(param)


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Copy the model's (float16) gradients into the master parameters' float32 .grad."""
    for master_param, (param_group, shape) in zip(master_params, param_groups_and_shapes):
        master_param.grad = _flatten([param_grad_or_zeros(param) for _, param in param_group]).view(shape)


def unflatten_master_params(param_group, master_param):
    """Views of a flat master tensor shaped like the group's parameters, in order."""
    params = [param for _, param in param_group]
    pieces = master_param.reshape(-1).split([p.numel() for p in params])
    return [piece.view(p.shape) for piece, p in zip(pieces, params)]


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the master values into the model's parameters (rounding to their dtype)."""
    with torch.no_grad():
        for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
            for (_, param), value in zip(param_group, unflatten_master_params(param_group, master_param)):
                param.copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """The model's state_dict with every parameter replaced by its float32 master value."""
    state_dict = model.state_dict()
    if use_fp16:
        for master_param, (param_group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(param_group, unflatten_master_params(param_group, master_param)):
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Master parameters (as `make_master_params` lays them out) holding the values of `state_dict`."""
    missing = [name for name, _ in model.named_parameters() if name not in state_dict]
    if missing:
        raise ValueError(f"state_dict lacks {len(missing)} of the model's parameters (first: {missing[0]})")
    named_values = [(name, state_dict[name]) for name, _ in model.named_parameters()]
    if use_fp16:
        return make_master_params(get_param_groups_and_shapes(named_values))
    return [value for _, value in named_values]


def zero_master_grads(master_params):
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """Zero the gradients in place (keeping their tensors), as ADM does."""
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def check_overflow(value):
    """True when `value` is inf or NaN."""
    return not math.isfinite(value)


class MixedPrecisionTrainer:
    """Backward and optimizer step with optional float16 training and dynamic loss scaling.

    With use_fp16, the optimizer must be built on `master_params` (float32); the model's
    convolutions are converted to float16 here.
    """

    def __init__(self, model, use_fp16=False, fp16_scale_growth=1e-3, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE):
        self.model = model
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        self.model_params = list(model.parameters())
        self.master_params = self.model_params
        self.param_groups_and_shapes = None
        self.lg_loss_scale = initial_lg_loss_scale
        if use_fp16:
            if not hasattr(model, "convert_to_fp16"):
                raise ValueError(f"use_fp16 needs a model with convert_to_fp16(); {type(model).__name__} has none")
            self.param_groups_and_shapes = get_param_groups_and_shapes(model.named_parameters())
            self.master_params = make_master_params(self.param_groups_and_shapes)
            model.convert_to_fp16()

    def zero_grad(self):
        zero_grad(self.model_params)

    def backward(self, loss):
        if self.use_fp16:
            loss = loss * 2**self.lg_loss_scale
        loss.backward()

    def optimize(self, opt):
        """Take one optimizer step; False when it was skipped because the gradients were not finite."""
        if self.use_fp16:
            return self._optimize_fp16(opt)
        return self._optimize_normal(opt)

    def _optimize_normal(self, opt):
        self._log_norms(*self.get_norms())
        opt.step()
        return True

    def _optimize_fp16(self, opt):
        logger.logkv_mean("lg_loss_scale", self.lg_loss_scale)
        model_grads_to_master_grads(self.param_groups_and_shapes, self.master_params)
        loss_scale = 2**self.lg_loss_scale
        grad_norm, param_norm = self.get_norms(grad_scale=loss_scale)
        if check_overflow(grad_norm):
            self.lg_loss_scale -= 1
            logger.log(f"gradients not finite: step skipped, lg_loss_scale lowered to {self.lg_loss_scale}")
            zero_master_grads(self.master_params)
            return False
        self._log_norms(grad_norm, param_norm)
        for param in self.master_params:
            param.grad.mul_(1.0 / loss_scale)
        opt.step()
        zero_master_grads(self.master_params)
        master_params_to_model_params(self.param_groups_and_shapes, self.master_params)
        self.lg_loss_scale += self.fp16_scale_growth
        return True

    def get_norms(self, grad_scale=1.0):
        """(L2 norm of the master gradients / grad_scale, L2 norm of the master parameters), as floats.

        One device-to-host transfer; the sums of squares are taken in Python floats, which do not
        overflow where float32 would.
        """
        params = self.master_params
        with torch.no_grad():
            norms = [torch.linalg.vector_norm(p, dtype=torch.float32) for p in params]
            norms += [torch.linalg.vector_norm(p.grad, dtype=torch.float32) for p in params if p.grad is not None]
            values = torch.stack(norms).tolist()
        param_norm = math.sqrt(math.fsum(v * v for v in values[: len(params)]))
        grad_norm = math.sqrt(math.fsum(v * v for v in values[len(params) :]))
        return grad_norm / grad_scale, param_norm

    def _compute_norms(self, grad_scale=1.0):
        """ADM's name for get_norms."""
        return self.get_norms(grad_scale=grad_scale)

    @staticmethod
    def _log_norms(grad_norm, param_norm):
        logger.logkv_mean("grad_norm", grad_norm)
        logger.logkv_mean("param_norm", param_norm)

    def master_params_to_state_dict(self, master_params):
        return master_params_to_state_dict(self.model, self.param_groups_and_shapes, master_params, self.use_fp16)

    def state_dict_to_master_params(self, state_dict):
        return state_dict_to_master_params(self.model, state_dict, self.use_fp16)


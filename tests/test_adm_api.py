"""ADM's public interface, as data: every function, class and method that guided-diffusion's twelve
modules define (the private ones too: forks override ``TrainLoop._anneal_lr``, call
``image_datasets._list_image_files_recursively`` or ``GaussianDiffusion._predict_xstart_from_eps``),
checked against this package with ``inspect.signature``.

ADM below is transcribed from openai/guided-diffusion at commit 22e0df8 (names, parameters,
defaults and kinds are facts of that interface; nothing is imported from it). A signature here is
compatible with ADM's when

* ADM's parameters come first, in ADM's order, with ADM's names, kinds and defaults; the one
  relaxation is that a parameter ADM makes keyword-only may also be accepted positionally here
  (every call ADM accepts is still accepted, with the same meaning);
* anything this package adds is optional (has a default, or is *args / **kwargs) and comes after
  ADM's parameters, except keyword-only additions with defaults, which may stand anywhere (no call
  can pass them by position);
* ADM-ES (forever208/ADM-ES) adds an Epsilon Scaling keyword to the diffusion factories and
  classes; ``eps_scaler`` / ``eps_scale`` are allowed there at any position (EPS_SCALING_EXTRAS).

A constant ("= value") must have ADM's value; an alias ("= name") must be the same object as the
module's ``name``; "class(bases)" must be a class deriving from those bases; "@staticmethod (...)"
must be a static method.
"""

import ast
import enum
import importlib
import inspect
from abc import ABC

import pytest
import torch
import torch.nn as nn
from torch.utils.data import Dataset

ADM = {
    'dist_util': {
        'GPUS_PER_NODE': '= 8',
        'SETUP_RETRY_COUNT': '= 3',
        'setup_dist': '()',
        'dev': '()',
        'load_state_dict': '(path, **kwargs)',
        'sync_params': '(params)',
        '_find_free_port': '()',
    },
    'fp16_util': {
        'INITIAL_LOG_LOSS_SCALE': '= 20.0',
        'convert_module_to_f16': '(l)',
        'convert_module_to_f32': '(l)',
        'make_master_params': '(param_groups_and_shapes)',
        'model_grads_to_master_grads': '(param_groups_and_shapes, master_params)',
        'master_params_to_model_params': '(param_groups_and_shapes, master_params)',
        'unflatten_master_params': '(param_group, master_param)',
        'get_param_groups_and_shapes': '(named_model_params)',
        'master_params_to_state_dict': '(model, param_groups_and_shapes, master_params, use_fp16)',
        'state_dict_to_master_params': '(model, state_dict, use_fp16)',
        'zero_master_grads': '(master_params)',
        'zero_grad': '(model_params)',
        'param_grad_or_zeros': '(param)',
        'MixedPrecisionTrainer': 'class()',
        'MixedPrecisionTrainer.__init__': '(self, *, model, use_fp16=False, fp16_scale_growth=0.001, initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE)',
        'MixedPrecisionTrainer.zero_grad': '(self)',
        'MixedPrecisionTrainer.backward': '(self, loss)',
        'MixedPrecisionTrainer.optimize': '(self, opt)',
        'MixedPrecisionTrainer._optimize_fp16': '(self, opt)',
        'MixedPrecisionTrainer._optimize_normal': '(self, opt)',
        'MixedPrecisionTrainer._compute_norms': '(self, grad_scale=1.0)',
        'MixedPrecisionTrainer.master_params_to_state_dict': '(self, master_params)',
        'MixedPrecisionTrainer.state_dict_to_master_params': '(self, state_dict)',
        'check_overflow': '(value)',
    },
    'gaussian_diffusion': {
        'get_named_beta_schedule': '(schedule_name, num_diffusion_timesteps)',
        'betas_for_alpha_bar': '(num_diffusion_timesteps, alpha_bar, max_beta=0.999)',
        'ModelMeanType': 'class(enum.Enum)',
        'ModelVarType': 'class(enum.Enum)',
        'LossType': 'class(enum.Enum)',
        'LossType.is_vb': '(self)',
        'GaussianDiffusion': 'class()',
        'GaussianDiffusion.__init__': '(self, *, betas, model_mean_type, model_var_type, loss_type, rescale_timesteps=False)',
        'GaussianDiffusion.q_mean_variance': '(self, x_start, t)',
        'GaussianDiffusion.q_sample': '(self, x_start, t, noise=None)',
        'GaussianDiffusion.q_posterior_mean_variance': '(self, x_start, x_t, t)',
        'GaussianDiffusion.p_mean_variance': '(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None)',
        'GaussianDiffusion._predict_xstart_from_eps': '(self, x_t, t, eps)',
        'GaussianDiffusion._predict_xstart_from_xprev': '(self, x_t, t, xprev)',
        'GaussianDiffusion._predict_eps_from_xstart': '(self, x_t, t, pred_xstart)',
        'GaussianDiffusion._scale_timesteps': '(self, t)',
        'GaussianDiffusion.condition_mean': '(self, cond_fn, p_mean_var, x, t, model_kwargs=None)',
        'GaussianDiffusion.condition_score': '(self, cond_fn, p_mean_var, x, t, model_kwargs=None)',
        'GaussianDiffusion.p_sample': '(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None)',
        'GaussianDiffusion.p_sample_loop': '(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, device=None, progress=False)',
        'GaussianDiffusion.p_sample_loop_progressive': '(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, device=None, progress=False)',
        'GaussianDiffusion.ddim_sample': '(self, model, x, t, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, eta=0.0)',
        'GaussianDiffusion.ddim_reverse_sample': '(self, model, x, t, clip_denoised=True, denoised_fn=None, model_kwargs=None, eta=0.0)',
        'GaussianDiffusion.ddim_sample_loop': '(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0)',
        'GaussianDiffusion.ddim_sample_loop_progressive': '(self, model, shape, noise=None, clip_denoised=True, denoised_fn=None, cond_fn=None, model_kwargs=None, device=None, progress=False, eta=0.0)',
        'GaussianDiffusion._vb_terms_bpd': '(self, model, x_start, x_t, t, clip_denoised=True, model_kwargs=None)',
        'GaussianDiffusion.training_losses': '(self, model, x_start, t, model_kwargs=None, noise=None)',
        'GaussianDiffusion._prior_bpd': '(self, x_start)',
        'GaussianDiffusion.calc_bpd_loop': '(self, model, x_start, clip_denoised=True, model_kwargs=None)',
        '_extract_into_tensor': '(arr, timesteps, broadcast_shape)',
    },
    'image_datasets': {
        'load_data': '(*, data_dir, batch_size, image_size, class_cond=False, deterministic=False, random_crop=False, random_flip=True)',
        '_list_image_files_recursively': '(data_dir)',
        'ImageDataset': 'class(Dataset)',
        'ImageDataset.__init__': '(self, resolution, image_paths, classes=None, shard=0, num_shards=1, random_crop=False, random_flip=True)',
        'ImageDataset.__len__': '(self)',
        'ImageDataset.__getitem__': '(self, idx)',
        'center_crop_arr': '(pil_image, image_size)',
        'random_crop_arr': '(pil_image, image_size, min_crop_frac=0.8, max_crop_frac=1.0)',
    },
    'logger': {
        'DEBUG': '= 10',
        'INFO': '= 20',
        'WARN': '= 30',
        'ERROR': '= 40',
        'DISABLED': '= 50',
        'KVWriter': 'class(object)',
        'KVWriter.writekvs': '(self, kvs)',
        'SeqWriter': 'class(object)',
        'SeqWriter.writeseq': '(self, seq)',
        'HumanOutputFormat': 'class(KVWriter, SeqWriter)',
        'HumanOutputFormat.__init__': '(self, filename_or_file)',
        'HumanOutputFormat.writekvs': '(self, kvs)',
        'HumanOutputFormat._truncate': '(self, s)',
        'HumanOutputFormat.writeseq': '(self, seq)',
        'HumanOutputFormat.close': '(self)',
        'JSONOutputFormat': 'class(KVWriter)',
        'JSONOutputFormat.__init__': '(self, filename)',
        'JSONOutputFormat.writekvs': '(self, kvs)',
        'JSONOutputFormat.close': '(self)',
        'CSVOutputFormat': 'class(KVWriter)',
        'CSVOutputFormat.__init__': '(self, filename)',
        'CSVOutputFormat.writekvs': '(self, kvs)',
        'CSVOutputFormat.close': '(self)',
        'TensorBoardOutputFormat': 'class(KVWriter)',
        'TensorBoardOutputFormat.__init__': '(self, dir)',
        'TensorBoardOutputFormat.writekvs': '(self, kvs)',
        'TensorBoardOutputFormat.close': '(self)',
        'make_output_format': "(format, ev_dir, log_suffix='')",
        'logkv': '(key, val)',
        'logkv_mean': '(key, val)',
        'logkvs': '(d)',
        'dumpkvs': '()',
        'getkvs': '()',
        'log': '(*args, level=INFO)',
        'debug': '(*args)',
        'info': '(*args)',
        'warn': '(*args)',
        'error': '(*args)',
        'set_level': '(level)',
        'set_comm': '(comm)',
        'get_dir': '()',
        'record_tabular': '= logkv',
        'dump_tabular': '= dumpkvs',
        'profile_kv': '(scopename)',
        'profile': '(n)',
        'get_current': '()',
        'Logger': 'class(object)',
        'Logger.__init__': '(self, dir, output_formats, comm=None)',
        'Logger.logkv': '(self, key, val)',
        'Logger.logkv_mean': '(self, key, val)',
        'Logger.dumpkvs': '(self)',
        'Logger.log': '(self, *args, level=INFO)',
        'Logger.set_level': '(self, level)',
        'Logger.set_comm': '(self, comm)',
        'Logger.get_dir': '(self)',
        'Logger.close': '(self)',
        'Logger._do_log': '(self, args)',
        'get_rank_without_mpi_import': '()',
        'mpi_weighted_mean': '(comm, local_name2valcount)',
        'configure': "(dir=None, format_strs=None, comm=None, log_suffix='')",
        '_configure_default_logger': '()',
        'reset': '()',
        'scoped_configure': '(dir=None, format_strs=None, comm=None)',
    },
    'losses': {
        'normal_kl': '(mean1, logvar1, mean2, logvar2)',
        'approx_standard_normal_cdf': '(x)',
        'discretized_gaussian_log_likelihood': '(x, *, means, log_scales)',
    },
    'nn': {
        'SiLU': 'class(nn.Module)',
        'SiLU.forward': '(self, x)',
        'GroupNorm32': 'class(nn.GroupNorm)',
        'GroupNorm32.forward': '(self, x)',
        'conv_nd': '(dims, *args, **kwargs)',
        'linear': '(*args, **kwargs)',
        'avg_pool_nd': '(dims, *args, **kwargs)',
        'update_ema': '(target_params, source_params, rate=0.99)',
        'zero_module': '(module)',
        'scale_module': '(module, scale)',
        'mean_flat': '(tensor)',
        'normalization': '(channels)',
        'timestep_embedding': '(timesteps, dim, max_period=10000)',
        'checkpoint': '(func, inputs, params, flag)',
        'CheckpointFunction': 'class(th.autograd.Function)',
        'CheckpointFunction.forward': '@staticmethod (ctx, run_function, length, *args)',
        'CheckpointFunction.backward': '@staticmethod (ctx, *output_grads)',
    },
    'resample': {
        'create_named_schedule_sampler': '(name, diffusion)',
        'ScheduleSampler': 'class(ABC)',
        'ScheduleSampler.weights': '(self)',
        'ScheduleSampler.sample': '(self, batch_size, device)',
        'UniformSampler': 'class(ScheduleSampler)',
        'UniformSampler.__init__': '(self, diffusion)',
        'UniformSampler.weights': '(self)',
        'LossAwareSampler': 'class(ScheduleSampler)',
        'LossAwareSampler.update_with_local_losses': '(self, local_ts, local_losses)',
        'LossAwareSampler.update_with_all_losses': '(self, ts, losses)',
        'LossSecondMomentResampler': 'class(LossAwareSampler)',
        'LossSecondMomentResampler.__init__': '(self, diffusion, history_per_term=10, uniform_prob=0.001)',
        'LossSecondMomentResampler.weights': '(self)',
        'LossSecondMomentResampler.update_with_all_losses': '(self, ts, losses)',
        'LossSecondMomentResampler._warmed_up': '(self)',
    },
    'respace': {
        'space_timesteps': '(num_timesteps, section_counts)',
        'SpacedDiffusion': 'class(GaussianDiffusion)',
        'SpacedDiffusion.__init__': '(self, use_timesteps, **kwargs)',
        'SpacedDiffusion.p_mean_variance': '(self, model, *args, **kwargs)',
        'SpacedDiffusion.training_losses': '(self, model, *args, **kwargs)',
        'SpacedDiffusion.condition_mean': '(self, cond_fn, *args, **kwargs)',
        'SpacedDiffusion.condition_score': '(self, cond_fn, *args, **kwargs)',
        'SpacedDiffusion._wrap_model': '(self, model)',
        'SpacedDiffusion._scale_timesteps': '(self, t)',
        '_WrappedModel': 'class()',
        '_WrappedModel.__init__': '(self, model, timestep_map, rescale_timesteps, original_num_steps)',
        '_WrappedModel.__call__': '(self, x, ts, **kwargs)',
    },
    'script_util': {
        'NUM_CLASSES': '= 1000',
        'diffusion_defaults': '()',
        'classifier_defaults': '()',
        'model_and_diffusion_defaults': '()',
        'classifier_and_diffusion_defaults': '()',
        'create_model_and_diffusion': '(image_size, class_cond, learn_sigma, num_channels, num_res_blocks, channel_mult, num_heads, num_head_channels, num_heads_upsample, attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16, use_new_attention_order)',
        'create_model': "(image_size, num_channels, num_res_blocks, channel_mult='', learn_sigma=False, class_cond=False, use_checkpoint=False, attention_resolutions='16', num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, dropout=0, resblock_updown=False, use_fp16=False, use_new_attention_order=False)",
        'create_classifier_and_diffusion': '(image_size, classifier_use_fp16, classifier_width, classifier_depth, classifier_attention_resolutions, classifier_use_scale_shift_norm, classifier_resblock_updown, classifier_pool, learn_sigma, diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas)',
        'create_classifier': '(image_size, classifier_use_fp16, classifier_width, classifier_depth, classifier_attention_resolutions, classifier_use_scale_shift_norm, classifier_resblock_updown, classifier_pool)',
        'sr_model_and_diffusion_defaults': '()',
        'sr_create_model_and_diffusion': '(large_size, small_size, class_cond, learn_sigma, num_channels, num_res_blocks, num_heads, num_head_channels, num_heads_upsample, attention_resolutions, dropout, diffusion_steps, noise_schedule, timestep_respacing, use_kl, predict_xstart, rescale_timesteps, rescale_learned_sigmas, use_checkpoint, use_scale_shift_norm, resblock_updown, use_fp16)',
        'sr_create_model': '(large_size, small_size, num_channels, num_res_blocks, learn_sigma, class_cond, use_checkpoint, attention_resolutions, num_heads, num_head_channels, num_heads_upsample, use_scale_shift_norm, dropout, resblock_updown, use_fp16)',
        'create_gaussian_diffusion': "(*, steps=1000, learn_sigma=False, sigma_small=False, noise_schedule='linear', use_kl=False, predict_xstart=False, rescale_timesteps=False, rescale_learned_sigmas=False, timestep_respacing='')",
        'add_dict_to_argparser': '(parser, default_dict)',
        'args_to_dict': '(args, keys)',
        'str2bool': '(v)',
    },
    'train_util': {
        'INITIAL_LOG_LOSS_SCALE': '= 20.0',
        'TrainLoop': 'class()',
        'TrainLoop.__init__': '(self, *, model, diffusion, data, batch_size, microbatch, lr, ema_rate, log_interval, save_interval, resume_checkpoint, use_fp16=False, fp16_scale_growth=0.001, schedule_sampler=None, weight_decay=0.0, lr_anneal_steps=0)',
        'TrainLoop._load_and_sync_parameters': '(self)',
        'TrainLoop._load_ema_parameters': '(self, rate)',
        'TrainLoop._load_optimizer_state': '(self)',
        'TrainLoop.run_loop': '(self)',
        'TrainLoop.run_step': '(self, batch, cond)',
        'TrainLoop.forward_backward': '(self, batch, cond)',
        'TrainLoop._update_ema': '(self)',
        'TrainLoop._anneal_lr': '(self)',
        'TrainLoop.log_step': '(self)',
        'TrainLoop.save': '(self)',
        'parse_resume_step_from_filename': '(filename)',
        'get_blob_logdir': '()',
        'find_resume_checkpoint': '()',
        'find_ema_checkpoint': '(main_checkpoint, step, rate)',
        'log_loss_dict': '(diffusion, ts, losses)',
    },
    'unet': {
        'AttentionPool2d': 'class(nn.Module)',
        'AttentionPool2d.__init__': '(self, spacial_dim, embed_dim, num_heads_channels, output_dim=None)',
        'AttentionPool2d.forward': '(self, x)',
        'TimestepBlock': 'class(nn.Module)',
        'TimestepBlock.forward': '(self, x, emb)',
        'TimestepEmbedSequential': 'class(nn.Sequential, TimestepBlock)',
        'TimestepEmbedSequential.forward': '(self, x, emb)',
        'Upsample': 'class(nn.Module)',
        'Upsample.__init__': '(self, channels, use_conv, dims=2, out_channels=None)',
        'Upsample.forward': '(self, x)',
        'Downsample': 'class(nn.Module)',
        'Downsample.__init__': '(self, channels, use_conv, dims=2, out_channels=None)',
        'Downsample.forward': '(self, x)',
        'ResBlock': 'class(TimestepBlock)',
        'ResBlock.__init__': '(self, channels, emb_channels, dropout, out_channels=None, use_conv=False, use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False)',
        'ResBlock.forward': '(self, x, emb)',
        'ResBlock._forward': '(self, x, emb)',
        'AttentionBlock': 'class(nn.Module)',
        'AttentionBlock.__init__': '(self, channels, num_heads=1, num_head_channels=-1, use_checkpoint=False, use_new_attention_order=False)',
        'AttentionBlock.forward': '(self, x)',
        'AttentionBlock._forward': '(self, x)',
        'count_flops_attn': '(model, _x, y)',
        'QKVAttentionLegacy': 'class(nn.Module)',
        'QKVAttentionLegacy.__init__': '(self, n_heads)',
        'QKVAttentionLegacy.forward': '(self, qkv)',
        'QKVAttentionLegacy.count_flops': '@staticmethod (model, _x, y)',
        'QKVAttention': 'class(nn.Module)',
        'QKVAttention.__init__': '(self, n_heads)',
        'QKVAttention.forward': '(self, qkv)',
        'QKVAttention.count_flops': '@staticmethod (model, _x, y)',
        'UNetModel': 'class(nn.Module)',
        'UNetModel.__init__': '(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, num_classes=None, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False)',
        'UNetModel.convert_to_fp16': '(self)',
        'UNetModel.convert_to_fp32': '(self)',
        'UNetModel.forward': '(self, x, timesteps, y=None)',
        'SuperResModel': 'class(UNetModel)',
        'SuperResModel.__init__': '(self, image_size, in_channels, *args, **kwargs)',
        'SuperResModel.forward': '(self, x, timesteps, low_res=None, **kwargs)',
        'EncoderUNetModel': 'class(nn.Module)',
        'EncoderUNetModel.__init__': "(self, image_size, in_channels, model_channels, out_channels, num_res_blocks, attention_resolutions, dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2, use_checkpoint=False, use_fp16=False, num_heads=1, num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False, resblock_updown=False, use_new_attention_order=False, pool='adaptive')",
        'EncoderUNetModel.convert_to_fp16': '(self)',
        'EncoderUNetModel.convert_to_fp32': '(self)',
        'EncoderUNetModel.forward': '(self, x, timesteps)',
    },
}

# ADM's enum members (names are what configs and forks spell).
ADM_ENUM_MEMBERS = {
    "ModelMeanType": ("PREVIOUS_X", "START_X", "EPSILON"),
    "ModelVarType": ("LEARNED", "FIXED_SMALL", "FIXED_LARGE", "LEARNED_RANGE"),
    "LossType": ("MSE", "RESCALED_MSE", "KL", "RESCALED_KL"),
}

# Where ADM-ES adds its Epsilon Scaling argument (and this package its own spelling of it).
EPS_SCALING_EXTRAS = {
    ("script_util", "create_model_and_diffusion"),
    ("script_util", "create_gaussian_diffusion"),
    ("script_util", "sr_create_model_and_diffusion"),
    ("gaussian_diffusion", "GaussianDiffusion.__init__"),
    ("respace", "SpacedDiffusion.__init__"),
}
EPS_SCALING_NAMES = {"eps_scaler", "eps_scale"}

# Names ADM's defaults refer to, with ADM's values.
DEFAULT_NAMES = {"INITIAL_LOG_LOSS_SCALE": 20.0, "INFO": 20}

EXTERNAL_BASES = {
    "object": object,
    "ABC": ABC,
    "Dataset": Dataset,
    "enum.Enum": enum.Enum,
    "nn.Module": nn.Module,
    "nn.GroupNorm": nn.GroupNorm,
    "nn.Sequential": nn.Sequential,
    "th.autograd.Function": torch.autograd.Function,
}

# Mismatches in modules this package's other owners are changing; each is expected to fail until
# fixed there (strict: a fixed entry fails here, so it gets removed).
KNOWN_ELSEWHERE = {}

_EMPTY = inspect.Parameter.empty


def _adm_parameters(spec: str) -> list[inspect.Parameter]:
    """inspect.Parameters of an ADM signature written as "(a, b=1, *, c)"."""
    function = ast.parse(f"def f{spec}: pass").body[0]
    args = function.args
    params = []
    positional = args.posonlyargs + args.args
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    for i, (arg, default) in enumerate(zip(positional, defaults)):
        positional_only = i < len(args.posonlyargs)
        kind = inspect.Parameter.POSITIONAL_ONLY if positional_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(arg.arg, kind, default=_value(default)))
    if args.vararg:
        params.append(inspect.Parameter(args.vararg.arg, inspect.Parameter.VAR_POSITIONAL))
    for arg, default in zip(args.kwonlyargs, args.kw_defaults):
        params.append(inspect.Parameter(arg.arg, inspect.Parameter.KEYWORD_ONLY, default=_value(default)))
    if args.kwarg:
        params.append(inspect.Parameter(args.kwarg.arg, inspect.Parameter.VAR_KEYWORD))
    return params


def _value(node):
    if node is None:
        return _EMPTY
    return eval(compile(ast.Expression(node), "<adm default>", "eval"), {}, dict(DEFAULT_NAMES))


def _is_optional(p: inspect.Parameter) -> bool:
    return p.default is not _EMPTY or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)


def _same_default(ours, adm) -> bool:
    if adm is _EMPTY or ours is _EMPTY:
        return ours is adm
    if isinstance(adm, bool) or adm is None:  # False == 0 and None are not interchangeable
        return type(ours) is type(adm) and ours == adm
    return ours == adm


def signature_problems(ours: list[inspect.Parameter], adm: list[inspect.Parameter], allow=frozenset()) -> list[str]:
    """What keeps ``ours`` from accepting every call ADM's signature accepts (empty: compatible)."""
    adm_names = {p.name for p in adm}
    extra_keywords = [p for p in ours if p.name not in adm_names and p.kind is p.KEYWORD_ONLY and _is_optional(p)]
    skipped = [p for p in ours if p.name in allow and p.name not in adm_names]
    for p in skipped:
        if not _is_optional(p):
            return [f"added parameter {p.name} has no default"]
    rest = [p for p in ours if p not in extra_keywords and p not in skipped]
    problems = []
    for i, want in enumerate(adm):
        if i >= len(rest):
            problems.append(f"lacks parameter {want.name!r} (position {i})")
            break
        have = rest[i]
        if have.name != want.name:
            problems.append(f"parameter {i} is {have.name!r}, ADM's is {want.name!r}")
            break
        relaxed = want.kind is want.KEYWORD_ONLY and have.kind is have.POSITIONAL_OR_KEYWORD
        if have.kind is not want.kind and not relaxed:
            problems.append(f"{want.name}: kind {have.kind.name}, ADM's is {want.kind.name}")
        if not _same_default(have.default, want.default):
            problems.append(f"{want.name}: default {have.default!r}, ADM's is {want.default!r}")
    for p in rest[len(adm):]:
        if not _is_optional(p):
            problems.append(f"added parameter {p.name!r} is required")
    return problems


def _lookup(module, dotted):
    """(the class or module holding the last name, the object), or (owner, None) when absent."""
    owner, obj = None, module
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return obj, None
        owner, obj = obj, getattr(obj, part)
    return owner, obj


CASES = [(m, name) for m, names in ADM.items() for name in names]


def _marks(module_name, name):
    reason = KNOWN_ELSEWHERE.get((module_name, name))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


@pytest.mark.parametrize(
    "module_name,name", [pytest.param(m, n, marks=_marks(m, n), id=f"{m}.{n}") for m, n in CASES]
)
def test_adm_name_is_here_and_compatible(module_name, name):
    spec = ADM[module_name][name]
    module = importlib.import_module(f"guided_diffusion.{module_name}")
    owner, obj = _lookup(module, name)
    assert obj is not None, f"guided_diffusion.{module_name}.{name} is missing"
    if spec.startswith("= "):
        text = spec[2:]
        if text.isidentifier():
            assert obj is getattr(module, text), f"{name} should be the same object as {text}"
        else:
            assert obj == ast.literal_eval(text) and type(obj) is type(ast.literal_eval(text)), (name, obj)
        return
    if spec.startswith("class("):
        assert inspect.isclass(obj), f"{name} is not a class"
        for base in filter(None, (b.strip() for b in spec[6:-1].split(","))):
            base_class = EXTERNAL_BASES.get(base) or getattr(module, base, None)
            if base_class is None:  # a base from another ADM module (SpacedDiffusion(GaussianDiffusion))
                base_class = getattr(importlib.import_module("guided_diffusion.gaussian_diffusion"), base)
            assert issubclass(obj, base_class), f"{name} does not derive from {base}"
        return
    static = spec.startswith("@staticmethod ")
    if static:
        spec = spec[len("@staticmethod "):]
        raw = inspect.getattr_static(owner, name.split(".")[-1])
        assert isinstance(raw, staticmethod), f"{name} should be a staticmethod, as in ADM"
    assert callable(obj), f"{name} is not callable"
    ours = list(inspect.signature(obj).parameters.values())
    allow = EPS_SCALING_NAMES if (module_name, name) in EPS_SCALING_EXTRAS else frozenset()
    problems = signature_problems(ours, _adm_parameters(spec), allow)
    assert not problems, f"guided_diffusion.{module_name}.{name}{inspect.signature(obj)} vs ADM's {spec}: " + "; ".join(problems)


@pytest.mark.parametrize("enum_name", sorted(ADM_ENUM_MEMBERS))
def test_adm_enum_members(enum_name):
    from guided_diffusion import gaussian_diffusion

    members = getattr(gaussian_diffusion, enum_name).__members__
    assert tuple(members) == ADM_ENUM_MEMBERS[enum_name]


# -- the rule itself must be able to fail ---------------------------------------------------------


def _params(spec):
    return _adm_parameters(spec)


@pytest.mark.parametrize(
    "ours,adm,compatible",
    [
        ("(a, b=1)", "(a, b=1)", True),
        ("(a, b=1, c=2)", "(a, b=1)", True),  # trailing optional addition
        ("(a, b=1, *, seed=None)", "(a, b=1)", True),
        ("(*, model, x=1, extra=0)", "(*, model, x=1)", True),
        ("(model, x=1)", "(*, model, x=1)", True),  # keyword-only in ADM, also positional here
        ("(a, b=2)", "(a, b=1)", False),  # default changed
        ("(b, a)", "(a, b)", False),  # order changed
        ("(a, c, b=1)", "(a, b=1)", False),  # inserted before ADM's
        ("(a, b=1, *, c)", "(a, b=1)", False),  # required addition
        ("(a, *, b=1)", "(a, b=1)", False),  # positional in ADM, keyword-only here
        ("(a)", "(a, b=1)", False),  # missing
        ("(a, b=None)", "(a, b=False)", False),
    ],
)
def test_compatibility_rule(ours, adm, compatible):
    assert (not signature_problems(_params(ours), _params(adm))) is compatible

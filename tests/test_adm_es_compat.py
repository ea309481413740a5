"""ADM-ES (forever208/ADM-ES) code and command lines on this package.

ADM-ES adds one key, ``eps_scaler``, to ADM's script_util: the sampling lambda (a constant), which
its training reuses as the input perturbation gamma; its default 0.0 is "off" here. Its scripts
draw every random number from torch's global RNG. The ADM-ES-style script below is the way ADM-ES's
image_sample.py uses ADM's API; its images are compared, byte for byte, with ADM-ES's sampling
loop written out here from the formulas (float64 schedule, float32 arithmetic in ADM's order).
"""

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from guided_diffusion import script_util as su
from guided_diffusion.eps_scaling import EpsScale, EpsScaleError
from sample_scripts import run_in_process

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
            num_head_channels=16, noise_schedule="cosine", learn_sigma=True, use_new_attention_order=True,
            resblock_updown=True)
STEPS, NUM, BATCH, SEED = 10, 5, 3, 7

# What ADM-ES's image_sample.py does with ADM's API: flags from model_and_diffusion_defaults(),
# create_model_and_diffusion(**args_to_dict(...)), the samplers without noise (torch's global RNG),
# ADM's quantization; batches until num_samples are made, the last one cut.
ADM_ES_STYLE_SCRIPT = textwrap.dedent("""
    import argparse, sys
    import numpy as np
    import torch
    from guided_diffusion import script_util as su

    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(su.model_and_diffusion_defaults(), model_path="", num_samples=1,
                                          batch_size=1, use_ddim=False, clip_denoised=True, seed=0, out=""))
    args = parser.parse_args()
    model, diffusion = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults().keys()))
    model.load_state_dict(torch.load(args.model_path, weights_only=True))
    model.eval()
    torch.manual_seed(args.seed)
    loop = diffusion.ddim_sample_loop if args.use_ddim else diffusion.p_sample_loop
    batches = []
    while len(batches) * args.batch_size < args.num_samples:
        with torch.no_grad():
            x = loop(model, (args.batch_size, 3, args.image_size, args.image_size), clip_denoised=args.clip_denoised)
        batches.append(((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    np.save(args.out, np.concatenate(batches)[: args.num_samples])
""")


def cosine_betas(steps=1000, max_beta=0.999):
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array([min(1 - f((i + 1) / steps) / f(i / steps), max_beta) for i in range(steps)])


def kept_steps(steps: int, count: int, ddim: bool):
    """The respaced steps: DDIM's even stride, else ADM's fractional stride summed step by step."""
    if ddim:
        return list(range(0, steps, steps // count))
    stride, position, kept = (steps - 1) / (count - 1), 0.0, []
    for _ in range(count):
        kept.append(round(position))
        position += stride
    return kept


def adm_es_loop(model, shape, lam: float, ddim: bool, respace: int):
    """ADM-ES's ancestral / DDIM (eta 0) loop, learned-range variance, clipped x0, global RNG."""
    kept = kept_steps(1000, respace, ddim)
    abar_base = np.cumprod(1 - cosine_betas())
    abar = abar_base[kept]
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1 - abar / abar_prev
    post_var = betas * (1 - abar_prev) / (1 - abar)
    post_log_var = np.log(np.append(post_var[1], post_var[1:]))
    coef1 = betas * np.sqrt(abar_prev) / (1 - abar)
    coef2 = (1 - abar_prev) * np.sqrt(1 - betas) / (1 - abar)

    def at(arr, i):  # float64 schedule, gathered and cast to float32 as ADM does
        return torch.from_numpy(arr)[torch.full((shape[0],), i)].float().view(-1, 1, 1, 1)

    x = torch.randn(*shape)
    for i in reversed(range(len(kept))):
        out = model(x, torch.full((shape[0],), kept[i]))
        eps, var_values = torch.split(out, shape[1], dim=1)
        x0 = at(np.sqrt(1 / abar), i) * x - at(np.sqrt(1 / abar - 1), i) * (eps / lam)
        x0 = x0.clamp(-1, 1)
        frac = (var_values + 1) / 2
        log_var = frac * at(np.log(betas), i) + (1 - frac) * at(post_log_var, i)
        noise = torch.randn_like(x)
        keep = float(i != 0)
        if ddim:
            eps_back = (at(np.sqrt(1 / abar), i) * x - x0) / at(np.sqrt(1 / abar - 1), i)
            a_prev = at(abar_prev, i)
            sigma = 0.0 * torch.sqrt((1 - a_prev) / (1 - at(abar, i))) * torch.sqrt(1 - at(abar, i) / a_prev)
            x = x0 * torch.sqrt(a_prev) + torch.sqrt(1 - a_prev - sigma**2) * eps_back + keep * sigma * noise
        else:
            mean = at(coef1, i) * x0 + at(coef2, i) * x
            x = mean + keep * torch.exp(0.5 * log_var) * noise
    return x


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    torch.manual_seed(1)
    model, _ = su.create_model_and_diffusion(**dict(su.model_and_diffusion_defaults(), **TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("adm_es") / "model.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_the_factories_take_adm_es_key_with_its_default_off():
    defaults = su.model_and_diffusion_defaults()
    assert defaults["eps_scaler"] == 0.0
    flags = dict(defaults, **TINY, timestep_respacing="10")
    _, off = su.create_model_and_diffusion(**flags)
    assert off.eps_scale.is_identity and off.eps_scaler == 0.0
    _, on = su.create_model_and_diffusion(**dict(flags, eps_scaler=1.017))
    assert on.eps_scale == EpsScale(b=1.017) and on.eps_scaler == 1.017
    assert su.create_gaussian_diffusion(steps=100, eps_scaler=0.99).eps_scale == EpsScale(b=0.99)
    with pytest.raises(EpsScaleError, match="eps_scaler must be >= 0"):
        su.create_gaussian_diffusion(steps=100, eps_scaler=-1.0)
    with pytest.raises(ValueError, match="disagree"):
        su.create_gaussian_diffusion(steps=100, eps_scaler=1.01, eps_scale="1.02")


@pytest.mark.parametrize("ddim,lam", [(False, 1.017), (True, 1.017), (False, 1.0)])
def test_an_adm_es_style_script_gives_adm_es_bytes(tmp_path, tiny_model, ddim, lam):
    model, path = tiny_model
    script = tmp_path / "adm_es_sample.py"
    script.write_text(ADM_ES_STYLE_SCRIPT)
    out = tmp_path / "images.npy"
    flags = [f"--{k}={v}" for k, v in TINY.items()]
    respacing = f"ddim{STEPS}" if ddim else str(STEPS)
    argv = [*flags, f"--model_path={path}", f"--timestep_respacing={respacing}", f"--use_ddim={ddim}",
            f"--eps_scaler={lam}", f"--num_samples={NUM}", f"--batch_size={BATCH}", f"--seed={SEED}", f"--out={out}"]
    if (ddim, lam) == (False, 1.0):  # once as a user runs it: a child process
        subprocess.run([sys.executable, str(script), *argv], check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                       capture_output=True, timeout=300)
    else:  # the script's bytes, computed in this process (an absolute name is taken as it is)
        run_in_process(str(script), *argv)
    torch.manual_seed(SEED)
    expected = []
    with torch.no_grad():
        while len(expected) * BATCH < NUM:
            x = adm_es_loop(model, (BATCH, 3, 8, 8), lam, ddim, STEPS)
            expected.append(((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy())
    expected = np.concatenate(expected)[:NUM]
    got = np.load(out)
    assert got.dtype == np.uint8 and got.shape == (NUM, 8, 8, 3)
    assert np.array_equal(got, expected), f"{(got != expected).sum()} of {got.size} values differ"


def test_adm_es_training_perturbs_the_input_as_adm_es_does(tiny_model):
    """ADM-ES's training_losses: noise, then gamma * a second draw added to make x_t; target the
    first noise. Written out here with the same global-RNG draws."""
    model, _ = tiny_model
    gamma = 0.1
    flags = dict(su.model_and_diffusion_defaults(), **dict(TINY, learn_sigma=False), eps_scaler=gamma)
    _, diffusion = su.create_model_and_diffusion(**flags)
    model3 = lambda x, t: model(x, t)[:, :3]  # noqa: E731  (an epsilon-only model)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    t = torch.tensor([0, 10, 500, 999])
    torch.manual_seed(3)
    with torch.no_grad():
        losses = diffusion.training_losses(model3, x0, t)
    torch.manual_seed(3)
    noise = torch.randn_like(x0)
    perturbed = noise + gamma * torch.randn_like(noise)
    abar = torch.from_numpy(np.cumprod(1 - cosine_betas()))[t].float().view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * perturbed
    with torch.no_grad():
        expected = ((noise - model3(x_t, t)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(losses["mse"], expected, rtol=1e-5, atol=1e-6)
    # gamma 0 (ADM-ES's default) is ADM's loss: no second draw
    _, plain = su.create_model_and_diffusion(**dict(flags, eps_scaler=0.0))
    torch.manual_seed(3)
    with torch.no_grad():
        unperturbed = plain.training_losses(model3, x0, t)["mse"]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        torch.testing.assert_close(unperturbed, ((noise - model3(x_t, t)) ** 2).mean(dim=(1, 2, 3)),
                                   rtol=1e-5, atol=1e-6)


def test_the_sample_scripts_take_adm_es_command_line(tmp_path, tiny_model):
    """ADM-ES's --eps_scaler on image_sample.py: the same images as --eps_scale; both at once must agree."""
    _, path = tiny_model
    common = [*[f"--{k}={v}" for k, v in TINY.items()], f"--model_path={path}", "--timestep_respacing=6",
              "--num_samples=2", "--progress=False"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("OPENAI_LOGDIR", None)
    for name, flag in (("scaler", "--eps_scaler=1.017"), ("scale", "--eps_scale=1.017")):
        run_in_process("image_sample.py", *common, flag, f"--output_dir={tmp_path / name}")
    a = np.load(tmp_path / "scaler" / "samples_2x8x8x3.npz")["arr_0"]
    b = np.load(tmp_path / "scale" / "samples_2x8x8x3.npz")["arr_0"]
    assert np.array_equal(a, b)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "image_sample.py"), *common, "--eps_scaler=1.017",
                           "--eps_scale=1.02", f"--output_dir={tmp_path / 'both'}"],  # as a user runs it: a child
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: --eps_scale 1.02 and --eps_scaler 1.017 disagree; give one of them"]


def adm_attention(qkv, heads, legacy):
    """ADM's QKVAttentionLegacy / QKVAttention arithmetic, written out: q and k each times C^-1/4,
    einsum, float32 softmax, einsum."""
    n, width, length = qkv.shape
    ch = width // (3 * heads)
    s = 1 / math.sqrt(math.sqrt(ch))
    if legacy:
        q, k, v = qkv.reshape(n * heads, 3 * ch, length).split(ch, dim=1)
        w = torch.einsum("bct,bcs->bts", q * s, k * s)
    else:
        q, k, v = qkv.chunk(3, dim=1)
        w = torch.einsum("bct,bcs->bts", (q * s).view(n * heads, ch, length), (k * s).view(n * heads, ch, length))
        v = v.reshape(n * heads, ch, length)
    w = torch.softmax(w.float(), dim=-1).type(w.dtype)
    return torch.einsum("bts,bcs->bct", w, v).reshape(n, -1, length)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_is_adm_arithmetic_bit_for_bit_outside_fused_attention(legacy):
    """ADM's attention arithmetic is the default, so ADM's and ADM-ES's scripts get ADM's bytes;
    scaled_dot_product_attention, inside fused_attention(), rounds differently but stays close."""
    from guided_diffusion import unet

    attention = unet.QKVAttentionLegacy(4) if legacy else unet.QKVAttention(4)
    qkv = torch.randn(3, 3 * 4 * 16, 64, generator=torch.Generator().manual_seed(0))
    expected = adm_attention(qkv, 4, legacy)
    assert torch.equal(attention(qkv), expected)
    with unet.fused_attention():
        fused = attention(qkv)
    assert not torch.equal(fused, expected)  # really the other kernel
    torch.testing.assert_close(fused, expected, atol=1e-5, rtol=0)
    assert not unet._FUSED_ATTENTION  # the context restored the default


# What ADM-ES's image_train.py does with ADM's API: load_data without a seed (ADM's loader, torch's
# global RNG), TrainLoop with ADM's arguments, run until lr_anneal_steps, checkpoints in the log folder.
ADM_ES_STYLE_TRAIN = textwrap.dedent("""
    import argparse
    import numpy as np, random, torch
    from guided_diffusion import logger, script_util as su
    from guided_diffusion.image_datasets import load_data
    from guided_diffusion.resample import create_named_schedule_sampler
    from guided_diffusion.train_util import TrainLoop

    parser = argparse.ArgumentParser()
    su.add_dict_to_argparser(parser, dict(su.model_and_diffusion_defaults(), data_dir="", lr=1e-4, batch_size=1,
                                          lr_anneal_steps=0, log_dir="", seed=0))
    args = parser.parse_args()
    random.seed(args.seed); np.random.seed(args.seed); torch.manual_seed(args.seed)
    logger.configure(dir=args.log_dir)
    model, diffusion = su.create_model_and_diffusion(**su.args_to_dict(args, su.model_and_diffusion_defaults().keys()))
    data = load_data(data_dir=args.data_dir, batch_size=args.batch_size, image_size=args.image_size)
    TrainLoop(model=model, diffusion=diffusion, data=data, batch_size=args.batch_size, microbatch=-1, lr=args.lr,
              ema_rate="0.9999", log_interval=10, save_interval=10000, resume_checkpoint="", use_fp16=False,
              fp16_scale_growth=1e-3, schedule_sampler=create_named_schedule_sampler("uniform", diffusion),
              weight_decay=0.0, lr_anneal_steps=args.lr_anneal_steps).run_loop()
""")


class _FlippedImages(torch.utils.data.Dataset):
    """8x8 PNGs as ADM's dataset gives them at image size 8: [-1, 1], mirrored when Python's RNG
    (seeded per worker by torch) says so."""

    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import random

        from PIL import Image

        arr = np.asarray(Image.open(self.paths[i]).convert("RGB"))
        if random.random() < 0.5:
            arr = arr[:, ::-1]
        return np.transpose(arr.astype(np.float32) / 127.5 - 1, [2, 0, 1]), {}


def adm_es_training(paths, steps, gamma, lr=1e-4, batch=4, rate=0.9999, seed=0):
    """ADM-ES's training, written out: the seeds, the network's initialisation (drawn from torch's
    RNG), one loader worker, a fresh order every epoch, t uniform (numpy), noise then the
    perturbation (torch), MSE on epsilon, AdamW, the learning rate set after each step from that
    step (lr * (1 - step / N)), EMA. Returns the initial weights, the trained ones and the EMA."""
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    model, _ = su.create_model_and_diffusion(**dict(su.model_and_diffusion_defaults(), **dict(TINY, learn_sigma=False)))
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    abar = torch.from_numpy(np.cumprod(1 - cosine_betas()))
    opt = torch.optim.AdamW(list(model.parameters()), lr=lr, weight_decay=0.0)
    ema = [p.detach().clone() for p in model.parameters()]
    loader = torch.utils.data.DataLoader(_FlippedImages(paths), batch_size=batch, shuffle=True, num_workers=1,
                                         drop_last=True)
    batches = (b for _ in iter(int, 1) for b in loader)
    for step in range(steps):
        x0, _ = next(batches)
        t = torch.from_numpy(np.random.choice(1000, size=(batch,), p=np.full(1000, 1 / 1000))).long()
        weights = torch.from_numpy(1 / (1000 * np.full(1000, 1 / 1000)[t.numpy()])).float()
        noise = torch.randn_like(x0)
        noisy = noise + gamma * torch.randn_like(noise)
        x_t = (abar.sqrt()[t].float().view(-1, 1, 1, 1) * x0
               + (1 - abar).sqrt()[t].float().view(-1, 1, 1, 1) * noisy)
        loss = (((noise - model(x_t, t)) ** 2).mean(dim=(1, 2, 3)) * weights).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(rate).add_(p, alpha=1 - rate)
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
    return initial, model.state_dict(), ema


def test_an_adm_es_style_training_gives_adm_es_bytes(tmp_path):
    from PIL import Image

    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"img_{i}.png"))
        Image.fromarray(image).save(paths[-1])
    script = tmp_path / "adm_es_train.py"
    script.write_text(ADM_ES_STYLE_TRAIN)
    steps, gamma = 5, 0.1
    flags = [f"--{k}={v}" for k, v in dict(TINY, learn_sigma=False).items()]
    subprocess.run([sys.executable, str(script), *flags, f"--data_dir={tmp_path}", "--batch_size=4",
                    f"--lr_anneal_steps={steps}", f"--eps_scaler={gamma}", f"--log_dir={tmp_path / 'log'}"],
                   check=True, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, timeout=300)
    initial, expected, ema = adm_es_training(paths, steps, gamma)
    saved = torch.load(tmp_path / "log" / f"model{steps:06d}.pt", weights_only=True)
    saved_ema = torch.load(tmp_path / "log" / f"ema_0.9999_{steps:06d}.pt", weights_only=True)
    assert any(not torch.equal(initial[k], expected[k]) for k in expected)  # it trained
    for k in expected:
        assert torch.equal(saved[k], expected[k]), f"model {k} differs"
    for (k, _), e in zip(expected.items(), ema):
        assert torch.equal(saved_ema[k], e), f"EMA {k} differs"
    opt = torch.load(tmp_path / "log" / f"opt{steps:06d}.pt", weights_only=True)
    assert opt["param_groups"][0]["lr"] == 1e-4 * (1 - (steps - 1) / steps)

"""EDM's generate.py mode (--seeds): EDM's per-seed randomness, batches, rounding and output.

The comparisons are against EDM's generator semantics written out here (``edm_by_hand``): a
torch.Generator per seed (seed mod 2^32); the float32 latent; one class index per generator,
one-hot; at every step, churning or not, one float64 draw per generator; Heun with the
correction on all steps but the last; images as x * 127.5 + 128 clipped and truncated."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import REFERENCE_DIR
from sample_scripts import run_in_process, run_script
from guided_diffusion.edm.generate import parse_seeds, quantize_edm, sample_seeds, seed_batches
from adm_common.errors import UsageError
from guided_diffusion.edm.samplers import EDMSeedNoise
from guided_diffusion.run.output import quantize


def edm_by_hand(net, seeds, num_steps, S_churn=0.0, S_min=0.0, S_max=math.inf, S_noise=1.0, class_idx=None,
                sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """One batch of EDM's generate.py with its edm_sampler, on ``net``: (float64 images, one-hot labels)."""
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    c, r = net.img_channels, net.img_resolution
    latents = torch.stack([torch.randn(c, r, r, generator=g) for g in gens])
    labels = None
    if net.label_dim:
        index = torch.stack([torch.randint(net.label_dim, (), generator=g) for g in gens])
        if class_idx is not None:
            index = torch.full_like(index, class_idx)
        labels = torch.eye(net.label_dim)[index]
    lo, hi = max(sigma_min, net.sigma_min), min(sigma_max, net.sigma_max)
    ramp = torch.arange(num_steps, dtype=torch.float64) / (num_steps - 1)
    t = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    t = torch.cat([torch.as_tensor(net.round_sigma(t)).double(), torch.zeros(1, dtype=torch.float64)])
    x = latents.double() * t[0]
    for k in range(num_steps):
        cur, nxt = t[k], t[k + 1]
        noise = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=torch.float64) for g in gens])
        gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= cur <= S_max else 0.0
        hat = torch.as_tensor(net.round_sigma(cur + gamma * cur)).double()
        x_hat = x + (hat**2 - cur**2).sqrt() * S_noise * noise
        d = (x_hat - net(x_hat, hat, labels).double()) / hat
        x = x_hat + (nxt - hat) * d
        if k < num_steps - 1:
            d_next = (x - net(x, nxt, labels).double()) / nxt
            x = x_hat + (nxt - hat) * (0.5 * d + 0.5 * d_next)
    return x, labels


def edm_pixels(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ToyNet:
    """A smooth, nonlinear, class-dependent denoiser with a network's range and a level grid."""

    img_channels, img_resolution, label_dim = 2, 3, 4
    sigma_min, sigma_max = 0.01, 50.0

    def round_sigma(self, sigma):
        return torch.round(torch.as_tensor(sigma) * 1000) / 1000

    def __call__(self, x, sigma, labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1, 1)
        classes = torch.arange(4.0, dtype=torch.float64)
        shift = 0.0 if labels is None else (labels.double() @ classes).reshape(-1, 1, 1, 1)
        return (0.5 * torch.tanh(x.double() / (1 + sigma)) + 0.01 * shift).float()


# ---------------------------------------------------------------------------------------------
# The randomness and the sampler


def test_seed_noise_is_one_generator_per_seed_mod_2_32():
    seeds = [5, 7, (1 << 32) + 5]
    noise = EDMSeedNoise(seeds)
    draws = noise.randn((3, 2, 4))
    by_hand = torch.stack([torch.randn(2, 4, generator=torch.Generator().manual_seed(s % (1 << 32))) for s in seeds])
    assert draws.dtype == torch.float32 and torch.equal(draws, by_hand)
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])
    x = torch.zeros(3, 5, dtype=torch.float64)
    gens = [torch.Generator().manual_seed(s % (1 << 32)) for s in seeds]
    for g in gens:
        torch.randn(2, 4, generator=g)
    labels = torch.stack([torch.randint(10, (), generator=g) for g in gens])
    step = torch.stack([torch.randn(5, generator=g, dtype=torch.float64) for g in gens])
    assert torch.equal(noise.one_hot_labels(10), torch.eye(10)[labels])
    got = noise.randn_like(x)
    assert got.dtype == torch.float64 and torch.equal(got, step)
    with pytest.raises(ValueError, match="batch 2"):
        noise.randn((2, 4))


@pytest.mark.parametrize("class_idx", [None, 2])
def test_sampler_with_seed_noise_is_edms_algorithm(class_idx):
    """Churn on some steps only (S_min..S_max): EDM still draws on every step, so the noise of a
    churning step is the draw of its own step, not the next unused one."""
    net = ToyNet()
    seeds = [3, 11, 12]
    kw = dict(num_steps=7, S_churn=20.0, S_min=0.3, S_max=10.0, S_noise=1.007)
    images, labels = sample_seeds(net, seeds, (2, 3, 3), net.label_dim, class_idx, **kw)
    expected, onehot = edm_by_hand(net, seeds, class_idx=class_idx, **kw)
    assert images.dtype == torch.float64 and torch.equal(images, expected)
    assert torch.equal(labels, onehot.argmax(1))
    if class_idx is not None:
        assert labels.tolist() == [class_idx] * 3
    # the same generators asked only on the steps that churn (as the per-image streams are) give
    # other images: the first step (sigma 50) does not churn, yet EDM spends a draw on it
    generators = EDMSeedNoise(seeds)
    latents = generators.randn((3, 2, 3, 3))
    generators.one_hot_labels(4)

    class OnlyWhenChurning:
        randn = generators.randn

    from guided_diffusion.edm.samplers import karras_sample

    only_churning = karras_sample(net, latents.shape, noise=latents, class_labels=onehot,
                                  churn_generator=OnlyWhenChurning(), **kw)
    assert not torch.allclose(only_churning, expected)


def test_seed_batches_follow_edms_rule():
    sizes = lambda n, b, w=1: [len(p) for p in seed_batches(n, b, w)]  # noqa: E731
    assert sizes(10, 3) == [3, 3, 2, 2]  # 4 batches of at most 3, longer first
    assert sizes(10, 4, 2) == [3, 3, 2, 2]  # a multiple of the 2 ranks
    assert sizes(100, 64) == [50, 50]
    assert seed_batches(3, 64, 2) == [[0, 1], [2]]
    assert seed_batches(1, 8, 2) == [[0], []]
    assert sum(seed_batches(50000, 64, 8), []) == list(range(50000))


def test_seed_lists_as_edm_writes_them():
    assert parse_seeds("1,2,5-10") == [1, 2, 5, 6, 7, 8, 9, 10]
    assert parse_seeds("0-49999") == list(range(50000))
    assert parse_seeds("7") == [7]
    bad_lists = [("5-3", "empty"), ("a", "not a seed"), ("1,1", "twice"), ("", "not a seed"), ("1-", "not a seed")]
    for bad, match in bad_lists:
        with pytest.raises(UsageError, match=match):
            parse_seeds(bad)


def test_edm_rounds_where_adm_floors():
    """EDM: nearest level of x * 127.5 + 127.5 (halves up); ADM: floor of (x + 1) * 127.5.
    On smooth values the two differ by one level on half of the pixels."""
    x = torch.rand(1, 3, 200, 200, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2.4 - 1.2
    level = (x * 127.5 + 127.5).clamp(0, 255)
    edm = torch.from_numpy(quantize_edm(x)).permute(0, 3, 1, 2).double()
    adm = torch.from_numpy(quantize(x)).permute(0, 3, 1, 2).double()
    assert ((edm - level).abs() <= 0.5).all() and (adm <= level).all() and (level < adm + 1).all()
    inside = (x > -1) & (x < 1)
    differ = float(((edm - adm) == 1)[inside].double().mean())
    assert 0.49 < differ < 0.51 and ((edm - adm)[inside] >= 0).all() and ((edm - adm) <= 1).all()
    values = torch.tensor([-1.0, -0.995, 0.0, 0.004, 1.0], dtype=torch.float64).reshape(1, 5, 1, 1)
    assert quantize_edm(values).ravel().tolist() == [0, 1, 128, 128, 255]
    assert quantize(values).ravel().tolist() == [0, 0, 127, 128, 255]


# ---------------------------------------------------------------------------------------------
# scripts/edm_sample.py --seeds on EDM's real pickles


def reference_pickle(name):
    path = REFERENCE_DIR / "edm" / name
    if not path.exists():
        pytest.skip(f"EDM reference pickle not found at {path} (it lives in ../shared/reference/edm)")
    return path


def run(*args, child=False):
    """scripts/edm_sample.py ARGS in this process (run_in_process), or with ``child`` in a child process."""
    return (run_script if child else run_in_process)("edm_sample.py", *args, "--progress", "False", check=False)


def png_pixels(path):
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


CHURN = ["--steps", "5", "--S_churn", "10", "--S_min", "0.5", "--S_max", "30"]
CHURN_KW = dict(num_steps=5, S_churn=10.0, S_min=0.5, S_max=30.0)


def test_png_folder_is_edms_images_of_those_seeds(tmp_path):
    from guided_diffusion.edm.pickles import load_edm_network

    pkl = reference_pickle("vp-ddpmpp-uncond-16.pkl")
    out = tmp_path / "out"
    r = run("--network", str(pkl), "--outdir", str(out), "--seeds", "998-1001", "--batch", "3", "--subdirs", *CHURN)
    assert r.returncode == 0, r.stderr
    names = sorted(str(p.relative_to(out)) for p in out.rglob("*.png"))
    assert names == ["000000/000998.png", "000000/000999.png", "001000/001000.png", "001000/001001.png"]
    net, _ = load_edm_network(pkl)
    expected = {}
    for batch in ([998, 999], [1000, 1001]):  # EDM's batches of 4 seeds, --batch 3
        images, _ = edm_by_hand(net, batch, **CHURN_KW)
        expected.update(zip(batch, edm_pixels(images)))
    for seed, pixels in expected.items():
        got = png_pixels(out / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png")
        assert got.dtype == np.uint8 and np.array_equal(got, pixels), seed
    # the random network saturates most pixels; enough are not for the comparison to mean something
    values = np.stack(list(expected.values()))
    assert ((values > 0) & (values < 255)).sum() >= 30
    sidecar = json.loads((out / "edm_sample.json").read_text())
    assert sidecar["complete"] and sidecar["quantization"] == "edm" and sidecar["seeds"] == "998-1001"
    assert sidecar["network_sigma_min"] == 0.0009765625

    # a killed run resumes: the missing image comes back with the same bytes
    first = out / "000000" / "000998.png"
    before = first.read_bytes()
    first.unlink()
    r = run("--network", str(pkl), "--outdir", str(out), "--seeds", "998-1001", "--batch", "3", "--subdirs", *CHURN)
    assert r.returncode == 0, r.stderr
    assert first.read_bytes() == before
    # other settings into the same folder are refused, and nothing is written
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}
    r = run("--network", str(pkl), "--outdir", str(out), "--seeds", "998-1001", "--batch", "3", "--subdirs",
            "--steps", "4")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "other settings" in r.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.png")} == stamps


@pytest.mark.parametrize("quantization", ["edm", "adm"])
def test_npz_output_of_a_seed_list(tmp_path, quantization):
    from guided_diffusion.edm.pickles import load_edm_network

    pkl = reference_pickle("edm-ddpmpp-cond-16.pkl")
    out = tmp_path / "npz"
    r = run("--network", str(pkl), "--outdir", str(out), "--seeds", "4,9,2", "--batch", "2", "--class", "3",
            "--output_format", "npz", "--quantization", quantization, *CHURN)
    assert r.returncode == 0, r.stderr
    npz = np.load(out / "samples_3x16x16x3.npz")
    net, _ = load_edm_network(pkl)
    first, _ = edm_by_hand(net, [4, 9], class_idx=3, **CHURN_KW)  # EDM's batches: 3 seeds, --batch 2
    last, _ = edm_by_hand(net, [2], class_idx=3, **CHURN_KW)
    images = torch.cat([first, last])
    pixels = edm_pixels(images) if quantization == "edm" else quantize(images.float())
    assert np.array_equal(npz["arr_0"], pixels) and npz["arr_1"].tolist() == [3, 3, 3]
    sidecar = json.loads((out / "samples_3x16x16x3.json").read_text())
    assert sidecar["quantization"] == quantization and sidecar["class_idx"] == 3


def test_quantization_default_is_stated_and_recorded(tmp_path):
    r = run("--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "Default: edm with --seeds, adm without" in text and "floor((x + 1) * 127.5)" in text
    pkl = reference_pickle("vp-ddpmpp-uncond-16.pkl")
    # the one child process here: edm_sample.py as the user runs it
    r = run("--network", str(pkl), "--output_dir", str(tmp_path / "adm"), "--num_samples", "1", "--num_steps", "2",
            child=True)
    assert r.returncode == 0, r.stderr
    sidecar = json.loads((tmp_path / "adm" / "samples_1x16x16x3.json").read_text())
    assert sidecar["quantization"] == "adm" and sidecar["randomness"].startswith("per image")


def test_seed_mode_errors_are_one_line_and_write_nothing(tmp_path):
    pkl = reference_pickle("edm-ddpmpp-cond-16.pkl")
    cases = [
        (["--seeds", "5-3"], "empty"),
        (["--seeds", "0-3", "--num_samples", "4"], "--num_samples"),
        (["--subdirs"], "needs --seeds"),
        (["--output_format", "png"], "needs --seeds"),
        (["--seeds", "0-3", "--subdirs", "--output_format", "npz"], "--subdirs"),
    ]
    for args, match in cases:
        out = tmp_path / "never"
        r = run("--network", str(pkl), "--outdir", str(out), *args)
        assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and match in r.stderr, (args, r.stderr)
        assert not out.exists()
    out = tmp_path / "class"
    r = run("--network", str(pkl), "--outdir", str(out), "--seeds", "0-1", "--class", "10")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "classes 0..9" in r.stderr
    assert not list(out.rglob("*.png"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "000001.png").write_bytes(b"not ours")
    r = run("--network", str(pkl), "--outdir", str(foreign), "--seeds", "0-1", "--steps", "2")
    assert r.returncode == 2 and "000001.png" in r.stderr and len(r.stderr.splitlines()) == 1
    assert (foreign / "000001.png").read_bytes() == b"not ours" and not (foreign / "000000.png").exists()


def test_a_wrapped_network_keeps_its_range_and_levels():
    """edm_sample wraps the network (speed switches, index-aligned chunks): the sampler must still
    clip to its range and snap to its levels, as EDM's sampler does with the network itself."""
    from guided_diffusion.edm.networks import build_edm_network
    from guided_diffusion.edm.samplers import BoundDenoiser, karras_sample

    net = build_edm_network("iDDPMPrecond", dict(img_resolution=8, img_channels=3, model_channels=16,
                                                 channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]))
    levels = set(net.u.double().tolist())

    def visited(denoiser):
        seen = []

        def call(x, sigma, labels):
            seen.append(float(sigma))
            return torch.zeros_like(x)

        wrapped = BoundDenoiser(call, denoiser) if denoiser is not None else call
        karras_sample(wrapped, (1, 3, 8, 8), noise=torch.zeros(1, 3, 8, 8), num_steps=6, S_churn=3.0)
        return seen

    seen = visited(net)
    assert set(seen) <= levels and min(seen) == net.sigma_min  # u_999, not the default 0.002
    bare = visited(None)
    assert min(bare) == pytest.approx(0.002) and not set(bare) <= levels

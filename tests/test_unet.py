"""Networks: ADM's state_dict layouts, outputs against the reference vectors, attention head
orders, half precision, gradient checkpointing, input errors, and the nn.py helpers."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from guided_diffusion import nn as gnn
from guided_diffusion.unet import (
    AttentionBlock,
    EncoderUNetModel,
    QKVAttention,
    QKVAttentionLegacy,
    ResBlock,
    SuperResModel,
    UNetModel,
    fused_attention,
)

KINDS = {"UNetModel": UNetModel, "SuperResModel": SuperResModel, "EncoderUNetModel": EncoderUNetModel}
GOLDEN_CASES = ["u32_new_order", "c32_legacy_heads", "u32_plain", "classifier_attention", "superres"]

# ADM's default channel multipliers by image size (create_model / create_classifier, and the upsamplers).
UNET_CHANNEL_MULT = {512: (0.5, 1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
SR_CHANNEL_MULT = {512: (1, 1, 2, 2, 4, 4), 256: (1, 1, 2, 2, 4, 4), 64: (1, 2, 3, 4)}


def _mult(flag, image_size, table):
    return table[image_size] if flag == "" else tuple(int(m) for m in flag.split(","))


def _ds(pixels, image_size):
    return tuple(image_size // int(p) for p in pixels.split(","))


def build_from_flags(flags):
    """The network a released command line builds (ADM's create_model / create_classifier / sr_create_model)."""
    if "classifier_width" in flags:
        size = flags["image_size"]
        return EncoderUNetModel(
            image_size=size,
            in_channels=3,
            model_channels=flags["classifier_width"],
            out_channels=1000,
            num_res_blocks=flags["classifier_depth"],
            attention_resolutions=_ds(flags["classifier_attention_resolutions"], size),
            channel_mult=UNET_CHANNEL_MULT[size],
            use_fp16=flags["classifier_use_fp16"],
            num_head_channels=64,
            use_scale_shift_norm=flags["classifier_use_scale_shift_norm"],
            resblock_updown=flags["classifier_resblock_updown"],
            pool=flags["classifier_pool"],
        )
    common = dict(
        in_channels=3,
        model_channels=flags["num_channels"],
        out_channels=6 if flags["learn_sigma"] else 3,
        num_res_blocks=flags["num_res_blocks"],
        dropout=flags["dropout"],
        num_classes=1000 if flags["class_cond"] else None,
        use_checkpoint=flags["use_checkpoint"],
        use_fp16=flags["use_fp16"],
        num_heads=flags["num_heads"],
        num_head_channels=flags["num_head_channels"],
        num_heads_upsample=flags["num_heads_upsample"],
        use_scale_shift_norm=flags["use_scale_shift_norm"],
        resblock_updown=flags["resblock_updown"],
    )
    if "large_size" in flags:
        size = flags["large_size"]
        return SuperResModel(
            image_size=size,
            attention_resolutions=_ds(flags["attention_resolutions"], size),
            channel_mult=SR_CHANNEL_MULT[size],
            **common,
        )
    size = flags["image_size"]
    return UNetModel(
        image_size=size,
        attention_resolutions=_ds(flags["attention_resolutions"], size),
        channel_mult=_mult(flags["channel_mult"], size, UNET_CHANNEL_MULT),
        use_new_attention_order=flags["use_new_attention_order"],
        **common,
    )


def test_released_layouts_have_adm_keys_shapes_and_parameter_counts(checkpoint_layouts):
    assert len(checkpoint_layouts) >= 14
    for name, layout in checkpoint_layouts.items():
        with torch.device("meta"):
            model = build_from_flags(layout["flags"])
        shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
        expected = {key: list(shape) for key, shape in layout["keys"].items()}
        assert shapes.keys() == expected.keys(), (
            f"{name}: missing {sorted(expected.keys() - shapes.keys())[:5]}, "
            f"extra {sorted(shapes.keys() - expected.keys())[:5]}"
        )
        wrong = {k: (shapes[k], expected[k]) for k in expected if shapes[k] != expected[k]}
        assert not wrong, f"{name}: shapes differ: {dict(list(wrong.items())[:5])}"
        assert sum(p.numel() for p in model.parameters()) == layout["num_params"], name


def load_golden_model(case):
    model = KINDS[case["kind"]](**case["kwargs"])
    model.load_state_dict({k: v.float() for k, v in case["state_dict"].items()}, strict=True)
    return model.eval()


def golden_inputs(case):
    extra = {k: case[k] for k in ("y", "low_res") if case.get(k) is not None}
    return (case["x"], case["t"]), extra


@pytest.mark.parametrize("name", GOLDEN_CASES)
def test_outputs_match_adm(adm_golden, name):
    case = adm_golden["unets"][name]
    model = load_golden_model(case)
    args, extra = golden_inputs(case)
    with torch.no_grad():
        out = model(*args, **extra)
    assert out.shape == case["out"].shape
    torch.testing.assert_close(out, case["out"], atol=1e-4, rtol=0)


def test_fused_attention_goes_through_scaled_dot_product_attention_only_when_asked(adm_golden, monkeypatch):
    calls = []
    fused = F.scaled_dot_product_attention

    def counting(query, *args, **kwargs):
        calls.append((name, tuple(query.shape)))
        return fused(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    attention_blocks = {}
    for name in ("u32_new_order", "c32_legacy_heads"):
        case = adm_golden["unets"][name]
        model = load_golden_model(case)
        attention_blocks[name] = sum(isinstance(m, AttentionBlock) for m in model.modules())
        args, extra = golden_inputs(case)
        with torch.no_grad():
            before = len(calls)
            torch.testing.assert_close(model(*args, **extra), case["out"], atol=1e-4, rtol=0)
            assert len(calls) == before  # ADM's own arithmetic by default
            with fused_attention():
                torch.testing.assert_close(model(*args, **extra), case["out"], atol=1e-4, rtol=0)
    # One call per attention block, with [batch, heads, tokens, head channels] queries:
    # heads of 16 channels in the new-order model, 4 heads in the legacy one.
    assert [n for n, _ in calls].count("u32_new_order") == attention_blocks["u32_new_order"] > 0
    assert [n for n, _ in calls].count("c32_legacy_heads") == attention_blocks["c32_legacy_heads"] > 0
    assert all(shape[-1] == 16 for n, shape in calls if n == "u32_new_order")
    assert all(shape[1] == 4 for n, shape in calls if n == "c32_legacy_heads")


def _reference_attention(qkv, heads, legacy):
    """Attention with explicit einsums over ADM's two qkv channel layouts."""
    n, width, t = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        per_head = qkv.double().reshape(n, heads, 3, ch, t)
        q, k, v = per_head[:, :, 0], per_head[:, :, 1], per_head[:, :, 2]
    else:
        q, k, v = (part.reshape(n, heads, ch, t) for part in qkv.double().chunk(3, dim=1))
    weights = torch.softmax(torch.einsum("nhct,nhcs->nhts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("nhts,nhcs->nhct", weights, v).reshape(n, heads * ch, t).float()


@pytest.mark.parametrize("heads", [1, 3])
def test_qkv_head_orders_match_an_explicit_computation(heads):
    torch.manual_seed(0)
    qkv = torch.randn(2, 3 * heads * 8, 10)
    legacy = QKVAttentionLegacy(heads)(qkv)
    new = QKVAttention(heads)(qkv)
    torch.testing.assert_close(legacy, _reference_attention(qkv, heads, legacy=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new, _reference_attention(qkv, heads, legacy=False), atol=1e-5, rtol=1e-5)
    assert torch.allclose(legacy, new) == (heads == 1)  # one head: the two layouts coincide


def test_qkv_width_must_split_into_heads():
    with pytest.raises(ValueError, match="multiple of 3"):
        QKVAttention(4)(torch.randn(1, 3 * 10, 5))


def tiny_unet(**overrides):
    kwargs = dict(
        image_size=16,
        in_channels=3,
        model_channels=32,
        out_channels=3,
        num_res_blocks=1,
        attention_resolutions=(2,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_scale_shift_norm=True,
        resblock_updown=True,
    )
    kwargs.update(overrides)
    return UNetModel(**kwargs)


# Parameters ADM keeps in float32 inside the body: the normalizations and the embedding projections.
FLOAT32_IN_BODY = re.compile(r"\.(in_layers\.0|out_layers\.0|emb_layers\.1|norm)\.(weight|bias)$")


def test_convert_to_fp16_halves_exactly_the_body_convolutions(adm_golden):
    case = adm_golden["unets"]["c32_legacy_heads"]
    model = load_golden_model(case)
    model.convert_to_fp16()
    assert model.dtype == torch.float16
    half = {name for name, p in model.named_parameters() if p.dtype == torch.float16}
    single = {name for name, p in model.named_parameters() if p.dtype == torch.float32}
    assert half | single == set(dict(model.named_parameters()))
    body = {n for n in half | single if n.split(".")[0] in ("input_blocks", "middle_block", "output_blocks")}
    assert half == {n for n in body if not FLOAT32_IN_BODY.search(n)}
    assert {"input_blocks.0.0.weight", "middle_block.1.qkv.bias", "output_blocks.0.0.skip_connection.weight"} <= half
    assert {"time_embed.0.weight", "label_emb.weight", "out.2.weight", "out.0.weight"} <= single


def test_fp16_model_output_is_close_to_float32_and_conversion_round_trips(adm_golden):
    case = adm_golden["unets"]["u32_new_order"]
    model = load_golden_model(case)
    args, extra = golden_inputs(case)
    model.convert_to_fp16()
    with torch.no_grad():
        half_out = model(*args, **extra)
    assert half_out.dtype == torch.float32
    scale = case["out"].abs().max()
    error = (half_out - case["out"]).abs().max()
    # float16 keeps 11 significant bits (relative step 1e-3): measured 2.5e-4 of the output's scale;
    # an error of 0 would mean the convolutions never ran in half precision
    assert 1e-6 * scale < error < 2e-3 * scale
    # The reference weights are float16 values, so going back to float32 is exact.
    model.convert_to_fp32()
    assert model.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model(*args, **extra), case["out"], atol=1e-4, rtol=0)


def test_use_fp16_flag_alone_keeps_float32_until_converted():
    model = tiny_unet(use_fp16=True)
    assert model.dtype == torch.float32
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([5])
    assert model(x, t).dtype == torch.float32
    model.convert_to_fp16()
    assert model.input_blocks[0][0].weight.dtype == torch.float16


def _randomize(model, seed):
    """Non-zero weights everywhere (ADM zero-initializes the last conv of every branch)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def _gradients(model, x, t, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    model(x, t).square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_checkpointing_recomputes_with_the_same_dropout_masks(monkeypatch):
    plain = _randomize(tiny_unet(dropout=0.5), seed=1).train()
    checkpointed = tiny_unet(dropout=0.5, use_checkpoint=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2)), torch.tensor([10, 700])

    forward_runs = []
    original = ResBlock._forward
    monkeypatch.setattr(ResBlock, "_forward", lambda self, *a: forward_runs.append(1) or original(self, *a))
    expected = _gradients(plain, x, t, seed=3)
    runs_plain = len(forward_runs)
    got = _gradients(checkpointed, x, t, seed=3)
    assert len(forward_runs) - runs_plain == 2 * runs_plain  # every ResBlock ran again in backward

    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=1e-5, msg=name)
    # Dropout is live: another seed gives other gradients.
    other = _gradients(plain, x, t, seed=4)
    assert not torch.allclose(other["input_blocks.0.0.weight"], expected["input_blocks.0.0.weight"])


def test_bad_inputs_raise_clear_errors():
    model = tiny_unet()
    t = torch.tensor([1, 2])
    with pytest.raises(ValueError, match="has 4 channels but the model takes 3"):
        model(torch.randn(2, 4, 16, 16), t)
    with pytest.raises(ValueError, match="not divisible by 2"):
        model(torch.randn(2, 3, 15, 16), t)
    with pytest.raises(ValueError, match=r"shape \[N, C, H, W\]"):
        model(torch.randn(2, 3, 16), t)
    with pytest.raises(ValueError, match="timesteps must have shape"):
        model(torch.randn(2, 3, 16, 16), torch.tensor(3))
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 3, 16, 16), t, y=torch.tensor([0, 1]))

    conditional = tiny_unet(num_classes=10)
    with pytest.raises(ValueError, match="class-conditional .*pass labels y"):
        conditional(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match="one label per image"):
        conditional(torch.randn(2, 3, 16, 16), t, y=torch.tensor([1]))

    sr = SuperResModel(16, 3, 32, 3, 1, (), channel_mult=(1, 2))
    with pytest.raises(ValueError, match="low_res"):
        sr(torch.randn(2, 3, 16, 16), t)
    with pytest.raises(ValueError, match=r"both have shape \[N, 3, H, W\]"):
        sr(torch.randn(2, 3, 16, 16), t, low_res=torch.randn(2, 1, 8, 8))
    assert sr(torch.randn(2, 3, 16, 16), t, low_res=torch.randn(2, 3, 8, 8)).shape == (2, 3, 16, 16)

    classifier = EncoderUNetModel(16, 3, 32, 5, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool="attention")
    with pytest.raises(ValueError, match="must be 16x16"):
        classifier(torch.randn(2, 3, 32, 32), t)


def test_bad_constructor_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="heads of 24 channels"):
        AttentionBlock(64, num_head_channels=24)
    with pytest.raises(ValueError, match="into 3 heads"):
        AttentionBlock(64, num_heads=3)
    with pytest.raises(ValueError, match="unknown pool"):
        EncoderUNetModel(16, 3, 32, 5, 1, (), pool="max")
    with pytest.raises(ValueError, match="needs num_head_channels"):
        EncoderUNetModel(16, 3, 32, 5, 1, (), pool="attention")
    with pytest.raises(ValueError, match="unsupported dims 4"):
        gnn.conv_nd(4, 3, 3, 1)


@pytest.mark.parametrize("pool", ["adaptive", "spatial", "spatial_v2"])
def test_encoder_pools_have_adm_heads(pool):
    torch.manual_seed(0)
    model = EncoderUNetModel(16, 3, 32, 5, 1, (2,), channel_mult=(1, 2), num_head_channels=16, pool=pool)
    keys = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("out.")}
    if pool == "adaptive":
        assert keys == {"out.0.weight": (64,), "out.0.bias": (64,), "out.3.weight": (5, 64, 1, 1), "out.3.bias": (5,)}
    else:
        # Spatial means of conv (32) + resblock (32) + downsample (32) + resblock (64) + middle (64).
        first = {"out.0.weight": (2048, 224), "out.0.bias": (2048,)}
        last = "out.2" if pool == "spatial" else "out.3"
        assert first.items() <= keys.items()
        assert keys[f"{last}.weight"] == (5, 2048)
    _randomize(model, seed=5).eval()
    x = torch.randn(2, 3, 16, 16)
    out = model(x, torch.tensor([3, 900]))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert not torch.allclose(out[0], out[1])


def test_timestep_embedding_is_the_sinusoidal_closed_form():
    t = torch.tensor([0.0, 1.0, 37.5, 999.0])
    emb = gnn.timestep_embedding(t, 7, max_period=10000)
    assert emb.shape == (4, 7)
    for i in range(3):
        freq = 10000 ** (-i / 3)
        torch.testing.assert_close(emb[:, i], torch.cos(t * freq))
        torch.testing.assert_close(emb[:, 3 + i], torch.sin(t * freq))
    assert torch.equal(emb[:, 6], torch.zeros(4))


def test_group_norm_computes_in_float32_and_returns_the_input_dtype():
    x = (torch.randn(2, 64, 4, 4) * 100 + 300).half()
    norm = gnn.normalization(64)
    out = norm(x)
    assert out.dtype == torch.float16 and norm.num_groups == 32
    groups = x.float().reshape(2, 32, -1)
    variance = groups.var(-1, unbiased=False, keepdim=True)
    expected = (groups - groups.mean(-1, keepdim=True)) / torch.sqrt(variance + 1e-5)
    torch.testing.assert_close(out.float(), expected.reshape(x.shape), atol=2e-3, rtol=2e-3)


def test_small_helpers():
    target, source = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    gnn.update_ema(target, source, rate=0.75)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 1.0]))

    x = torch.arange(24.0).reshape(2, 3, 4)
    torch.testing.assert_close(gnn.mean_flat(x), torch.tensor([5.5, 17.5]))

    conv = gnn.conv_nd(1, 2, 3, 1)
    assert all(p.abs().sum() == 0 for p in gnn.zero_module(conv).parameters())
    layer = gnn.linear(2, 2)
    before = layer.weight.detach().clone()
    torch.testing.assert_close(gnn.scale_module(layer, 0.5).weight.detach(), before * 0.5)
    assert isinstance(gnn.avg_pool_nd(2, 2), torch.nn.AvgPool2d)

"""Safe checkpoint loading and the flags a checkpoint's shapes imply."""

import os

import pytest
import torch

from guided_diffusion.run.checkpoints import check_fits, infer_unet_flags, load_model_weights, load_state_dict
from adm_common.errors import UsageError

UNET_LAYOUTS = [
    "imagenet64_cond", "imagenet128_cond", "imagenet256_cond", "imagenet256_uncond", "imagenet512_cond",
    "lsun256", "cifar10_uncond_admes", "lsun_tower64_admes", "ffhq128_admes", "upsampler64_256",
    "upsampler128_512",
]
DEFAULT_MULT = {512: "0.5,1,1,2,2,4,4", 256: "1,1,2,2,4,4", 128: "1,1,2,3,4", 64: "1,2,3,4"}


def _meta_state_dict(layout):
    return {k: torch.empty(shape, device="meta") for k, shape in layout["keys"].items()}


@pytest.mark.parametrize("name", UNET_LAYOUTS)
def test_inferred_flags_match_released_checkpoint_flags(checkpoint_layouts, name):
    layout = checkpoint_layouts[name]
    flags = layout["flags"]
    size = flags.get("image_size", flags.get("large_size"))
    inferred = infer_unet_flags(_meta_state_dict(layout), image_size=size)
    assert inferred["num_channels"] == flags["num_channels"]
    assert inferred["num_res_blocks"] == flags["num_res_blocks"]
    assert inferred["learn_sigma"] == flags["learn_sigma"]
    assert inferred["class_cond"] == flags["class_cond"]
    assert inferred["use_scale_shift_norm"] == flags["use_scale_shift_norm"]
    assert inferred["resblock_updown"] == flags["resblock_updown"]
    want_mult = flags.get("channel_mult") or ("1,1,2,2,4,4" if "large_size" in flags else DEFAULT_MULT[size])
    assert [float(m) for m in inferred["channel_mult"].split(",")] == [float(m) for m in want_mult.split(",")]
    assert sorted(map(int, inferred["attention_resolutions"].split(","))) == sorted(
        map(int, flags["attention_resolutions"].split(","))
    )
    if flags["class_cond"]:
        assert inferred["num_classes"] == 1000


def test_optimizer_file_is_named_as_such(tmp_path):
    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param])
    param.grad = torch.ones(2)
    opt.step()
    path = tmp_path / "opt001000.pt"
    torch.save(opt.state_dict(), path)
    with pytest.raises(UsageError, match="optimizer state.*model\\*.pt or ema_\\*.pt"):
        load_state_dict(path)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PAYLOAD_RAN",))


def test_pickle_with_code_is_refused_and_never_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.ones(1), "x": _Payload()}, path)
    with pytest.raises(UsageError, match="safe loading refuses"):
        load_state_dict(path)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_missing_file_and_wrong_kinds(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(UsageError, match="is a folder"):
        load_state_dict(tmp_path)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(UsageError, match="not a readable PyTorch checkpoint"):
        load_state_dict(junk)
    listy = tmp_path / "list.pt"
    torch.save([torch.ones(1)], listy)
    with pytest.raises(UsageError, match="holds a list"):
        load_state_dict(listy)
    pkl = tmp_path / "edm.pkl"
    pkl.write_bytes(b"x")
    with pytest.raises(UsageError, match="convert_edm_pkl"):
        load_state_dict(pkl)


def test_safetensors_and_wrapped_state_dicts_load(tmp_path):
    from safetensors.torch import save_file

    sd = {"a": torch.arange(6.0).view(2, 3), "b": torch.ones(4)}
    save_file(sd, tmp_path / "m.safetensors")
    torch.save({"state_dict": sd}, tmp_path / "wrapped.pt")
    for name in ("m.safetensors", "wrapped.pt"):
        loaded = load_state_dict(tmp_path / name)
        assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], sd[k]) for k in sd)


def _tiny_unet(**overrides):
    from guided_diffusion import script_util as su

    flags = dict(su.model_and_diffusion_defaults(), image_size=8, num_channels=32, num_res_blocks=1,
                 channel_mult="1,2", attention_resolutions="4", num_head_channels=16, learn_sigma=True)
    flags.update(overrides)
    return su.create_model_and_diffusion(**flags)[0]


def test_mismatch_names_the_first_keys_and_the_flag_that_explains_them(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(_tiny_unet(class_cond=True, num_classes=10).state_dict(), path)
    with pytest.raises(UsageError) as info:
        check_fits(_tiny_unet(), load_state_dict(path), image_size=8)
    message = str(info.value)
    assert "unexpected keys (first label_emb.weight)" in message and "--class_cond True" in message
    torch.save(_tiny_unet(learn_sigma=False).state_dict(), path)
    with pytest.raises(UsageError, match="--learn_sigma False"):
        load_model_weights(_tiny_unet(), path, image_size=8)


def test_matching_checkpoint_loads_exactly_and_reports_its_hash(tmp_path):
    from adm_common.files import sha256_file

    source = _tiny_unet()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p))
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save(source.state_dict(), path)
    target = _tiny_unet()
    assert load_model_weights(target, path, image_size=8) == sha256_file(path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))


# ---------------------------------------------------------------------------------------------
# Damaged and hostile files: one UsageError line each, never a traceback or a loaded garbage model


def _saved(tmp_path, name="model.pt"):
    path = tmp_path / name
    torch.save(_tiny_unet().state_dict(), path)
    return path


def _one_line(path, match):
    with pytest.raises(UsageError) as info:
        load_state_dict(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert match in str(info.value), str(info.value)


def test_nan_or_infinite_weights_are_refused_at_load(tmp_path):
    sd = _tiny_unet().state_dict()
    sd["out.2.weight"][0, 0, 0, 0] = float("nan")
    sd["input_blocks.0.0.bias"][1] = float("inf")
    torch.save(sd, tmp_path / "diverged.pt")
    _one_line(tmp_path / "diverged.pt", "NaN or infinite weights in 2 tensors (first input_blocks.0.0.bias)")
    from safetensors.torch import save_file

    save_file({"w": torch.tensor([1.0, float("-inf")])}, tmp_path / "diverged.safetensors")
    _one_line(tmp_path / "diverged.safetensors", "NaN or infinite weights in 1 tensor (first w)")


def test_empty_and_truncated_checkpoints_are_one_line(tmp_path):
    raw = _saved(tmp_path).read_bytes()
    (tmp_path / "empty.pt").write_bytes(b"")
    _one_line(tmp_path / "empty.pt", "is empty (0 bytes)")
    for cut in (10, len(raw) // 2, len(raw) - 20):
        (tmp_path / "cut.pt").write_bytes(raw[:cut])
        _one_line(tmp_path / "cut.pt", "not a readable PyTorch checkpoint")
    torch.save({"a": torch.ones(100)}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "legacy.pt").read_bytes()
    (tmp_path / "legacy.pt").write_bytes(legacy[: len(legacy) // 2])
    _one_line(tmp_path / "legacy.pt", "not a readable PyTorch checkpoint")


def test_empty_and_truncated_safetensors_are_one_line(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(100)}, tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-50])
    _one_line(tmp_path / "cut.safetensors", "not a readable safetensors file")
    (tmp_path / "zero.safetensors").write_bytes(b"")
    _one_line(tmp_path / "zero.safetensors", "not a readable safetensors file")
    save_file({}, tmp_path / "none.safetensors")
    _one_line(tmp_path / "none.safetensors", "empty state_dict")


def test_deeply_nested_pickles_are_one_line(tmp_path):
    import io
    import zipfile

    deep = b"\x80\x02" + b"]" * 100000 + b"a" * 99999 + b"."  # 100,000 nested lists
    (tmp_path / "raw.pt").write_bytes(deep)
    _one_line(tmp_path / "raw.pt", "not a readable PyTorch checkpoint")
    buffer = io.BytesIO()
    torch.save({"a": torch.ones(1)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    with zipfile.ZipFile(tmp_path / "deep.pt", "w") as target:
        for info in source.infolist():
            target.writestr(info, deep if info.filename.endswith("data.pkl") else source.read(info.filename))
    _one_line(tmp_path / "deep.pt", "holds a list, not a state_dict")

"""EDM pickles (edm/pickles.py): files written here in EDM's format (torch_utils.persistence records,
source code embedded) load without running anything, planted payloads are refused, and the
networks that come out compute what went in. Also scripts/convert_edm_pkl.py and edm_sample.py."""

import io
import json
import math
import os
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from sample_scripts import run_in_process, run_script

from guided_diffusion.edm import networks as en
from guided_diffusion.edm.pickles import (
    EDMPickleError,
    PersistentRecord,
    convert_edm_pickle,
    load_edm_network,
    load_edm_pickle,
    record_state_dict,
)

NET_KWARGS = dict(img_resolution=8, img_channels=3, label_dim=4, use_fp16=False, model_type="SongUNet",
                  embedding_type="positional", encoder_type="standard", decoder_type="standard",
                  channel_mult_noise=1, resample_filter=[1, 1], model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[4], augment_dim=9, dropout=0.13)


def _reconstruct_persistent_obj(meta):  # stands in for EDM's; the safe loader must never call it
    raise AssertionError("the restricted unpickler called the pickle's own reconstructor")


class _EDMStylePickler(pickle.Pickler):
    """Writes objects the way torch_utils.persistence does: every network module becomes a call
    _reconstruct_persistent_obj({type, version, module_src, class_name, state})."""

    def __init__(self, file, protocol, module_src, init_kwargs):
        super().__init__(file, protocol=protocol)
        self.module_src = module_src
        self.init_kwargs = init_kwargs  # id(module) -> constructor kwargs

    def reducer_override(self, obj):
        if isinstance(obj, torch.nn.Module) and type(obj).__module__ == en.__name__ or isinstance(obj, FakeLoss):
            state = dict(obj.__dict__)
            state.update(_init_args=(), _init_kwargs=self.init_kwargs.get(id(obj), {}))
            meta = dict(type="class", version=6, module_src=self.module_src, class_name=type(obj).__name__,
                        state=state)
            return _reconstruct_persistent_obj, (meta,)
        return NotImplemented


class FakeLoss:
    """Plays EDM's loss object (a persistent class with a few floats)."""

    def __init__(self):
        self.P_mean, self.P_std = -1.2, 1.2


@pytest.fixture
def persistence_module(monkeypatch):
    """A module named torch_utils.persistence so that pickle can name the reconstructor."""
    pkg, mod = types.ModuleType("torch_utils"), types.ModuleType("torch_utils.persistence")
    mod._reconstruct_persistent_obj = _reconstruct_persistent_obj
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    pkg.persistence = mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return mod


def make_network(seed=0, **overrides):
    kwargs = {**NET_KWARGS, **overrides}
    torch.manual_seed(seed)
    net = en.build_edm_network("VPPrecond", kwargs)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    net.model.enc["4x4_block0"].skip_scale = np.float64(math.sqrt(0.5))  # EDM stores numpy scalars
    return net.eval(), kwargs


def write_edm_pickle(path, net, kwargs, module_src="class VPPrecond: pass\n", extra=None, protocol=4):
    data = dict(ema=net, loss_fn=FakeLoss(), augment_pipe=None,
                dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", resolution=np.int64(8),
                                    channel_mean=np.arange(3, dtype=np.float32)))
    data.update(extra or {})
    with open(path, "wb") as f:
        _EDMStylePickler(f, protocol, module_src, {id(net): kwargs}).dump(data)
    return path


def outputs(net):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 3, 8, 8, generator=gen)
    return net(x, torch.tensor([0.01, 1.0, 50.0]), torch.tensor([0, 3, 1]))


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("protocol", [2, 4])
def test_pickle_in_edm_format_loads_without_running_its_source(persistence_module, tmp_path, protocol):
    marker = tmp_path / "source-was-executed"
    source = f"open({str(marker)!r}, 'w').write('pwned')\nclass VPPrecond: pass\n"
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "net.pkl", net, kwargs, module_src=source, protocol=protocol)

    data = load_edm_pickle(pkl)
    assert not marker.exists()
    assert isinstance(data["ema"], PersistentRecord) and data["ema"].class_name == "VPPrecond"
    assert data["ema"].init_kwargs == kwargs
    assert data["loss_fn"].class_name == "FakeLoss" and data["loss_fn"].state["P_mean"] == -1.2
    assert data["dataset_kwargs"]["resolution"] == 8 and isinstance(data["dataset_kwargs"]["resolution"], np.int64)
    np.testing.assert_array_equal(data["dataset_kwargs"]["channel_mean"], np.arange(3, dtype=np.float32))
    block = data["ema"].state["_modules"]["model"].state["_modules"]["enc"].state["_modules"]["4x4_block0"]
    assert block.state["skip_scale"] == np.float64(math.sqrt(0.5))

    state = record_state_dict(data["ema"])
    assert state.keys() == net.state_dict().keys()
    for key, value in net.state_dict().items():
        assert torch.equal(state[key], value), key

    loaded, config = load_edm_network(pkl)
    assert config["class_name"] == "VPPrecond" and config["init_kwargs"]["channel_mult"] == [1, 2]
    torch.testing.assert_close(outputs(loaded), outputs(net), rtol=0, atol=0)
    assert not marker.exists()


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _EvalPayload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return eval, (f"open({self.marker!r}, 'w')",)


@pytest.mark.parametrize("payload", [_Payload, _EvalPayload])
def test_planted_payloads_are_refused_before_they_run(persistence_module, tmp_path, payload):
    marker = tmp_path / "payload-ran"
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "evil.pkl", net, kwargs, extra={"dataset_kwargs": {"x": payload(marker)}})
    with pytest.raises(EDMPickleError, match=r"refusing to load (posix|os|nt|builtins)\.(system|eval)"):
        load_edm_pickle(pkl)
    with pytest.raises(EDMPickleError):
        load_edm_network(pkl)
    assert not marker.exists()


class _EvilStorage:
    """A tensor storage whose bytes are a pickle that would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return torch.storage._load_from_bytes, (pickle.dumps(_Payload(self.marker)),)


@pytest.mark.parametrize("protocol", [2, 4])
def test_payload_inside_storage_bytes_is_refused_in_one_line(tmp_path, protocol):
    """Code where a tensor's bytes belong: refused by torch's weights-only reader, reported in one
    line naming the file, without torch's advice to retry with weights_only=False."""
    marker = tmp_path / "payload-ran"
    blob = pickle.dumps({"ema": _EvilStorage(marker)}, protocol=protocol)
    with pytest.raises(EDMPickleError, match="the bytes of a tensor hold something else"):
        load_edm_pickle(io.BytesIO(blob))
    path = tmp_path / "evil.pkl"
    path.write_bytes(blob)
    with pytest.raises(EDMPickleError) as refused:
        load_edm_network(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: the bytes of a tensor hold something else") and "\n" not in message
    assert "weights_only" not in message and "nothing from it was run" in message
    assert not marker.exists()
    r = run("convert_edm_pkl.py", str(path))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {path}: ") and len(r.stderr.splitlines()) == 1
    assert "weights_only" not in r.stderr and not marker.exists() and not path.with_suffix(".safetensors").exists()


def test_unknown_containers_and_garbage_are_refused(tmp_path):
    with pytest.raises(EDMPickleError, match="torch.nn.modules.linear.Linear"):
        load_edm_pickle(io.BytesIO(pickle.dumps({"ema": torch.nn.Linear(2, 2)})))
    with pytest.raises(EDMPickleError, match="cannot read"):
        load_edm_pickle(io.BytesIO(b"\x80\x04not a pickle at all"))
    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps({"ema": {"weights": torch.zeros(2)}}))
    with pytest.raises(EDMPickleError, match="not a pickled EDM network"):
        load_edm_network(bad)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_edm_network(tmp_path / "missing.pkl")


def test_wrong_key_and_foreign_class(persistence_module, tmp_path):
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "net.pkl", net, kwargs)
    with pytest.raises(EDMPickleError, match="no 'generator' entry"):
        load_edm_network(pkl, key="generator")
    with pytest.raises(ValueError, match="not one of EDM's denoisers"):
        load_edm_network(pkl, key="loss_fn")


def test_tensors_that_do_not_fit_the_recorded_network_are_refused(persistence_module, tmp_path):
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "net.pkl", net, {**kwargs, "model_channels": 32})
    with pytest.raises(EDMPickleError, match="shape"):
        load_edm_network(pkl)


# ---------------------------------------------------------------------------------------------
# Conversion to safetensors + JSON


def test_convert_writes_safetensors_and_config(persistence_module, tmp_path):
    net, kwargs = make_network(seed=3)
    pkl = write_edm_pickle(tmp_path / "edm-test.pkl", net, kwargs)
    out = convert_edm_pickle(pkl, tmp_path / "out" / "edm-test.safetensors")
    config = json.loads(out.with_suffix(".json").read_text())
    assert config["class_name"] == "VPPrecond" and config["init_kwargs"] == json.loads(json.dumps(kwargs))
    assert config["source"] == "edm-test.pkl" and len(config["source_sha256"]) == 64
    loaded, _ = load_edm_network(out)
    torch.testing.assert_close(outputs(loaded), outputs(net), rtol=0, atol=0)
    assert sorted(p.name for p in out.parent.iterdir()) == ["edm-test.json", "edm-test.safetensors"]

    out.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="JSON"):
        load_edm_network(out)
    with pytest.raises(ValueError, match="safetensors"):
        convert_edm_pickle(pkl, tmp_path / "x.pt")


def run(script, *args):
    """scripts/SCRIPT ARGS in this process (run_in_process): what it writes or refuses."""
    return run_in_process(script, *args, check=False)


def test_convert_script(persistence_module, tmp_path):
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "good.pkl", net, kwargs)
    r = run_script("convert_edm_pkl.py", str(pkl), check=False)  # the one child process: as the user runs it
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "good.safetensors").exists() and (tmp_path / "good.json").exists()
    marker = tmp_path / "payload-ran"
    evil = write_edm_pickle(tmp_path / "evil.pkl", net, kwargs, extra={"augment_pipe": _Payload(marker)})
    r = run("convert_edm_pkl.py", str(evil))
    assert r.returncode == 2 and r.stderr.startswith(f"error: {evil}: refusing to load posix.system")
    assert len(r.stderr.splitlines()) == 1 and "EDM released" in r.stderr
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()


def _one_line(r):
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    return lines[0]


def test_convert_script_refuses_bad_inputs_and_outputs_in_one_line_writing_nothing(persistence_module, tmp_path):
    net, kwargs = make_network()
    good = write_edm_pickle(tmp_path / "good.pkl", net, kwargs)
    (tmp_path / "empty.pkl").write_bytes(b"")
    (tmp_path / "cut.pkl").write_bytes(good.read_bytes()[:3000])
    (tmp_path / "folder.pkl").mkdir()
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "taken.safetensors").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        ([str(tmp_path / "missing.pkl")], f"error: EDM pickle {tmp_path / 'missing.pkl'} does not exist"),
        ([str(tmp_path / "folder.pkl")], f"error: EDM pickle {tmp_path / 'folder.pkl'} is a folder"),
        ([str(tmp_path / "empty.pkl")], f"error: EDM pickle {tmp_path / 'empty.pkl'} is empty (0 bytes)"),
        ([str(tmp_path / "cut.pkl")], f"error: {tmp_path / 'cut.pkl'}: cannot read the file as an EDM pickle"),
        ([str(good), "--output", str(tmp_path / "taken.safetensors")],
         f"error: output {tmp_path / 'taken.safetensors'} is a folder"),
        ([str(good), "--output", str(tmp_path / "a_file" / "x.safetensors")],
         f"error: cannot create the folder {tmp_path / 'a_file'} ({tmp_path / 'a_file'} is a file)"),
        ([str(good), "--output", "/proc/x.safetensors"], "error: cannot write /proc/x.safetensors"),
        ([str(good), "--key", "nope", "--output", str(tmp_path / "k.safetensors")], "error: the pickle has no 'nope'"),
    ]
    for argv, expected in cases:
        line = _one_line(run("convert_edm_pkl.py", *argv))
        assert line.startswith(expected), line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no config, no tensors, no temporary file
    assert not list((tmp_path / "taken.safetensors").iterdir())


@pytest.mark.parametrize("damage,expected", [
    ("empty json", "net.json is empty (0 bytes): a write or copy cut short; convert the pickle again"),
    ("cut json", "net.json is not complete JSON"),
    ("json without class_name", "net.json lacks class_name or init_kwargs"),
    ("empty safetensors", "net.safetensors is not a readable safetensors file"),
    ("cut safetensors", "net.safetensors is not a readable safetensors file"),
])
def test_a_damaged_converted_network_is_one_line(persistence_module, tmp_path, damage, expected):
    from adm_common.errors import UsageError

    net, kwargs = make_network()
    out = convert_edm_pickle(write_edm_pickle(tmp_path / "net.pkl", net, kwargs), tmp_path / "c" / "net.safetensors")
    target = out.with_suffix(".json") if "json" in damage else out
    data = target.read_bytes()
    if damage == "json without class_name":
        target.write_text(json.dumps({"format": "edm-network-v1"}))
    else:
        target.write_bytes(b"" if damage.startswith("empty") else data[: len(data) // 2])
    with pytest.raises((EDMPickleError, UsageError)) as refused:
        load_edm_network(out)
    assert expected in str(refused.value) and "\n" not in str(refused.value)


# ---------------------------------------------------------------------------------------------
# scripts/edm_sample.py on an EDM pickle


def test_edm_sample_script_on_an_edm_pickle(persistence_module, tmp_path):
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "net.pkl", net, kwargs)
    common = ["--network", str(pkl), "--num_samples", "3", "--num_steps", "3", "--S_churn", "2",
              "--sigma_max", "1.5", "--progress", "False", "--config", "edm_cifar10_32x32_cond_vp",
              "--eps_scale", "0.998"]
    a = run("edm_sample.py", *common, "--batch_size", "2", "--output_dir", str(tmp_path / "a"))
    assert a.returncode == 0, a.stderr
    npz = np.load(tmp_path / "a" / "samples_3x8x8x3.npz")
    assert npz["arr_0"].shape == (3, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
    assert npz["arr_1"].dtype == np.int64 and set(npz["arr_1"].tolist()) <= {0, 1, 2, 3}
    sidecar = json.loads((tmp_path / "a" / "samples_3x8x8x3.json").read_text())
    assert sidecar["network_config"]["class_name"] == "VPPrecond" and sidecar["network_evaluations"] == 5
    assert sidecar["eps_scale_values"] == [0.998] * 3 and sidecar["solver"] == "heun"
    assert len(sidecar["sigmas"]) == 4 and sidecar["sigmas"][-1] == 0.0

    # the same images one at a time (up to float32 rounding of batched convolutions: a pixel may
    # cross a quantization step)
    b = run("edm_sample.py", *common, "--batch_size", "1", "--output_dir", str(tmp_path / "b"))
    assert b.returncode == 0, b.stderr
    one_by_one = np.load(tmp_path / "b" / "samples_3x8x8x3.npz")
    assert np.array_equal(one_by_one["arr_1"], npz["arr_1"])
    diff = np.abs(one_by_one["arr_0"].astype(int) - npz["arr_0"].astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.02
    assert len(np.unique(npz["arr_0"])) > 20  # not saturated: the comparison means something


def test_edm_sample_script_uses_the_papers_lambda(persistence_module, tmp_path):
    net, kwargs = make_network()
    pkl = write_edm_pickle(tmp_path / "net.pkl", net, kwargs)
    common = ["--network", str(pkl), "--num_samples", "1", "--progress", "False", "--config",
              "edm_cifar10_32x32_cond_vp", "--solver", "euler"]
    # the one child process of edm_sample.py here: as the user runs it
    r = run_script("edm_sample.py", *common, "--num_steps", "13", "--eps_scale", "paper", "--output_dir",
                   str(tmp_path / "a"), check=False)
    assert r.returncode == 0, r.stderr
    sidecar = json.loads((tmp_path / "a" / "samples_1x8x8x3.json").read_text())
    assert sidecar["eps_scale"] == "1.0051"  # the ES paper, cond CIFAR-10, Euler at 13 steps
    r = run("edm_sample.py", *common, "--num_steps", "5", "--eps_scale", "paper", "--output_dir", str(tmp_path / "b"))
    assert r.returncode == 2 and "no published" in r.stderr and "13, 21, 35" in r.stderr


def test_checkpoint_with_code_is_refused_without_the_unsafe_advice(tmp_path):
    """checkpoints.load_state_dict shares the refusal text: what torch refused, never its advice."""
    from guided_diffusion.run.checkpoints import load_state_dict
    from adm_common.errors import UsageError

    marker = tmp_path / "payload-ran"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2), "x": _Payload(marker)}, path)
    with pytest.raises(UsageError) as refused:
        load_state_dict(path)
    message = str(refused.value)
    assert "\n" not in message and "weights_only" not in message and "posix.system" in message
    assert not marker.exists()

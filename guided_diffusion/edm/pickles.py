"""Read EDM's released network pickles without running the code inside them; convert them.

EDM (NVlabs/edm) saves ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...}``
with plain ``pickle``. Every network class is wrapped by ``torch_utils.persistence``, which
pickles an instance as a call ``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the
Python source of the class's module (executed by EDM's loader), the class name and the instance
state (``_parameters``, ``_buffers``, ``_modules``, ``_init_kwargs``, ...). Tensors arrive through
torch's rebuild functions, each storage as legacy ``torch.save`` bytes.

``RestrictedUnpickler`` resolves only the handful of names such a file needs, to harmless
stand-ins: a persistent object becomes a ``PersistentRecord`` (class name, state, constructor
arguments; the embedded source is kept as text and never executed), tensors are rebuilt with
torch's own functions from storages read by ``torch.load(weights_only=True)``, and numpy
scalars / arrays of plain numbers are rebuilt from their bytes. Any other name in the file
(``os.system``, ``builtins.eval``, an arbitrary class) stops the load with ``EDMPickleError``
before anything is called.

``load_edm_network`` turns the record into an ``edm.networks`` module; ``convert_edm_pickle``
writes it as ``NAME.safetensors`` plus ``NAME.json`` (class name and constructor arguments),
which ``load_edm_network`` also reads.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import torch

from guided_diffusion.run.checkpoints import load_state_dict, weights_only_refusal
from guided_diffusion.edm.networks import build_edm_network
from adm_common.errors import UsageError
from adm_common.files import atomic_write_text, sha256_file, temp_path_for, writing

__all__ = [
    "EDMPickleError", "PersistentRecord", "ModuleRecord", "RestrictedUnpickler", "load_edm_pickle",
    "record_state_dict", "network_record", "load_edm_network", "convert_edm_pickle",
]

CONFIG_FORMAT = "edm-network-v1"
# Attributes of EDM's network objects that samplers read, taken from the pickled state as EDM's
# loader takes them (its objects are restored from their state, not rebuilt): VP's float32
# sigma_min 0.0009765625, for one, where the exact value is 0.0010005.
RECORDED_ATTRIBUTES = ("sigma_min", "sigma_max")


class EDMPickleError(ValueError):
    """The file is not an EDM network pickle this loader can read safely."""


class PersistentRecord:
    """What ``torch_utils.persistence`` stored for one object; its source is text, never run."""

    def __init__(self, meta):
        if not isinstance(meta, dict) or meta.get("type") != "class":
            raise EDMPickleError("a persistent-object record without type 'class'; not an EDM pickle")
        class_name, state, source = meta.get("class_name"), meta.get("state"), meta.get("module_src")
        if not isinstance(class_name, str) or not class_name.isidentifier():
            raise EDMPickleError(f"persistent-object record with class name {class_name!r}")
        if not isinstance(state, dict) or not isinstance(source, str):
            raise EDMPickleError(f"persistent-object record for {class_name} without state or source")
        self.class_name = class_name
        self.version = meta.get("version")
        self.state = state
        self.source_sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest()

    @property
    def init_args(self) -> tuple:
        return tuple(self.state.get("_init_args") or ())

    @property
    def init_kwargs(self) -> dict:
        return dict(self.state.get("_init_kwargs") or {})

    def __repr__(self):
        return f"PersistentRecord({self.class_name}, source sha256 {self.source_sha256[:12]})"


class ModuleRecord:
    """A plain torch container (ModuleDict, ModuleList, Sequential) as pickled: its state only."""

    class_name = "Module"

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise EDMPickleError(f"{self.class_name} with a state that is not a dict")
        self.state = state

    def __repr__(self):
        return f"ModuleRecord({self.class_name})"


def _container(name):
    return type(name + "Record", (ModuleRecord,), {"class_name": name})


class _EasyDict(dict):
    """dnnlib.EasyDict, read as a plain dict (EDM keeps some settings in one)."""


class _PendingArray:
    """An ndarray while the unpickler fills it in (numpy pickles arrays as create-then-set-state)."""

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise EDMPickleError("a numpy array with an unknown state layout")
        _version, shape, dtype, fortran, data = state
        if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, bytearray)):
            raise EDMPickleError("only numpy arrays of plain numbers can be read from an EDM pickle")
        flat = np.frombuffer(bytes(data), dtype=dtype)
        self.array = flat.reshape(tuple(shape), order="F" if fortran else "C").copy()


def _numpy_dtype(spec, align=False, copy=False):
    if not isinstance(spec, str):
        raise EDMPickleError(f"numpy dtype {spec!r} is not a plain type code")
    dtype = np.dtype(spec)
    if dtype.kind not in "biufc":
        raise EDMPickleError(f"numpy dtype {spec!r} is not a plain number type")
    return dtype


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc" or not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError("only numpy scalars of plain numbers can be read from an EDM pickle")
    return np.frombuffer(bytes(data), dtype=dtype)[0]


def _numpy_array(cls, shape, code):
    if cls is not np.ndarray:
        raise EDMPickleError("only plain numpy arrays can be read from an EDM pickle")
    return _PendingArray()


def _load_storage(data):
    """A storage saved as legacy torch.save bytes, read back with torch's weights-only loader."""
    if not isinstance(data, (bytes, bytearray)):
        raise EDMPickleError("a tensor storage that is not raw bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage deprecation notices
            storage = torch.load(io.BytesIO(bytes(data)), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's refusal ends in advice to load unsafely: keep only what it refused
        raise EDMPickleError(
            f"the bytes of a tensor hold something else ({weights_only_refusal(exc)}), "
            "which could run code if it were loaded"
        ) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise EDMPickleError("a tensor storage entry holds something else")
    return storage


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise EDMPickleError("a tensor without a storage")
    if not all(isinstance(v, int) for v in (offset, *size, *stride)) or len(size) != len(stride):
        raise EDMPickleError("a tensor with a malformed shape")
    if backward_hooks:
        raise EDMPickleError("a tensor with backward hooks; EDM's networks have none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False,
                                               collections.OrderedDict())


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
    """Parameters come back as plain tensors: only their values are needed."""
    if not isinstance(data, torch.Tensor):
        raise EDMPickleError("a parameter without a tensor")
    return data


def _encode_latin1(text, encoding="latin1"):
    """How protocol-2 pickles store bytes; the only encoding they use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise EDMPickleError("an unexpected text encoding call")
    return text.encode("latin1")


_CONTAINERS = {name: _container(name) for name in ("ModuleDict", "ModuleList", "Sequential")}

_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): PersistentRecord,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{(m, "set"): set for m in ("builtins", "__builtin__")},  # __builtin__: protocol-2 pickles
    **{(m, "frozenset"): frozenset for m in ("builtins", "__builtin__")},
    ("_codecs", "encode"): _encode_latin1,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy", "ndarray"): np.ndarray,
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_reconstruct"): _numpy_array for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{("torch.nn.modules.container", name): cls for name, cls in _CONTAINERS.items()},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that knows only the names an EDM network pickle uses (see the module doc)."""

    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise EDMPickleError(
                f"refusing to load {module}.{name}: an EDM network pickle holds only tensors, numbers "
                "and network records, and calling anything else could run code from the file"
            ) from None

    def persistent_load(self, pid):
        raise EDMPickleError("unexpected persistent id in the pickle; not an EDM network pickle")


def _finish(obj, seen=None):
    """Replace the filled-in numpy placeholders by their arrays, everywhere in the loaded tree."""
    seen = set() if seen is None else seen
    if isinstance(obj, _PendingArray):
        if not hasattr(obj, "array"):
            raise EDMPickleError("a numpy array without data")
        return obj.array
    if id(obj) in seen:
        return obj
    if isinstance(obj, dict):
        seen.add(id(obj))
        for key, value in obj.items():
            obj[key] = _finish(value, seen)
    elif isinstance(obj, list):
        seen.add(id(obj))
        obj[:] = [_finish(v, seen) for v in obj]
    elif isinstance(obj, tuple):
        return tuple(_finish(v, seen) for v in obj)
    elif isinstance(obj, (PersistentRecord, ModuleRecord)):
        seen.add(id(obj))
        _finish(obj.state, seen)
    return obj


def load_edm_pickle(source):
    """Unpickle an EDM ``.pkl`` (path or binary file) with ``RestrictedUnpickler``; nothing is executed.

    A refusal is one EDMPickleError line; for a path it names the file and what to do.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise EDMPickleError(f"EDM pickle {path} is a folder; pass the network .pkl file")
        if not path.is_file():
            raise FileNotFoundError(f"EDM pickle {path} does not exist; download it or check the path")
        if path.stat().st_size == 0:
            raise EDMPickleError(f"EDM pickle {path} is empty (0 bytes): a download cut short; fetch it again")
        try:
            with open(path, "rb") as f:
                return load_edm_pickle(f)
        except EDMPickleError as exc:
            raise EDMPickleError(
                f"{path}: {exc}; nothing from it was run. Use the network pickle as EDM released it "
                "(or the .safetensors that scripts/convert_edm_pkl.py writes from it)"
            ) from None
    try:
        obj = RestrictedUnpickler(source).load()
    except EDMPickleError:
        raise
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, IndexError, KeyError, RuntimeError,
            ValueError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise EDMPickleError(f"cannot read the file as an EDM pickle ({type(exc).__name__}: {detail})") from None
    return _finish(obj)


def record_state_dict(record, prefix: str = "") -> dict[str, torch.Tensor]:
    """The ``state_dict`` of a pickled module: its parameters, persistent buffers and submodules."""
    state = getattr(record, "state", None)
    if not isinstance(record, (PersistentRecord, ModuleRecord)) or not isinstance(state, dict):
        where = prefix or "the top"
        raise EDMPickleError(f"expected a pickled network module at {where}, found {type(record).__name__}")
    out = {}
    non_persistent = set(state.get("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in non_persistent):
                continue
            if not isinstance(value, torch.Tensor):
                raise EDMPickleError(f"{prefix}{name} is not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(record_state_dict(child, f"{prefix}{name}."))
    return out


def _plain(value, where):
    """Constructor arguments as JSON-ready Python values (numpy scalars become numbers)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise EDMPickleError(f"constructor argument {where} is a {type(value).__name__}, not a plain value")


def network_record(obj, key: str = "ema") -> PersistentRecord:
    """The network inside a loaded EDM pickle: ``obj[key]``, or ``obj`` itself when it is one."""
    if isinstance(obj, dict):
        if key not in obj:
            raise EDMPickleError(f"the pickle has no {key!r} entry (it has {', '.join(map(str, obj))})")
        obj = obj[key]
    if not isinstance(obj, PersistentRecord):
        raise EDMPickleError(f"entry {key!r} is not a pickled EDM network")
    if obj.init_args:
        raise EDMPickleError(f"{obj.class_name} was built with positional arguments; EDM uses keywords only")
    return obj


def _network_from_config(config: dict, state_dict: dict, where: str) -> torch.nn.Module:
    net = build_edm_network(config["class_name"], config["init_kwargs"])
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise EDMPickleError(
            f"{where} does not fit {config['class_name']}: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])})"
        )
    for name, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise EDMPickleError(
                f"{where}: {name} has shape {tuple(tensor.shape)}, the network expects {tuple(expected[name].shape)}"
            )
    net.load_state_dict({k: v.to(torch.float32) for k, v in state_dict.items()})
    for name, value in (config.get("attributes") or {}).items():
        # what EDM's object reports is its recorded state; iDDPM's range is read from its loaded u
        if name in RECORDED_ATTRIBUTES and not isinstance(getattr(type(net), name, None), property):
            setattr(net, name, value)
    return net.eval().requires_grad_(False)


def _pickle_config(record: PersistentRecord) -> dict:
    attributes = {
        name: _plain(record.state[name], f"{record.class_name}.{name}")
        for name in RECORDED_ATTRIBUTES
        if isinstance(record.state.get(name), (int, float, np.number)) and not isinstance(record.state[name], bool)
    }
    return {
        "format": CONFIG_FORMAT,
        "class_name": record.class_name,
        "init_kwargs": _plain(record.init_kwargs, record.class_name),
        "attributes": attributes,
    }


def _config_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def read_network_config(config_file) -> dict:
    """The JSON config written beside a converted network; an empty, cut or foreign file is one line."""
    config_file = Path(config_file)
    redo = "convert the pickle again with scripts/convert_edm_pkl.py"
    try:
        text = config_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EDMPickleError(f"cannot read {config_file} ({getattr(exc, 'strerror', None) or exc}); {redo}") from None
    if not text.strip():
        raise EDMPickleError(f"{config_file} is empty (0 bytes): a write or copy cut short; {redo}")
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise EDMPickleError(f"{config_file} is not complete JSON ({exc}): a write or copy cut short; {redo}") from None
    if not isinstance(config, dict) or config.get("format") != CONFIG_FORMAT:
        raise EDMPickleError(f"{config_file} is not an EDM network config ({CONFIG_FORMAT})")
    if not isinstance(config.get("class_name"), str) or not isinstance(config.get("init_kwargs"), dict):
        raise EDMPickleError(f"{config_file} lacks class_name or init_kwargs; {redo}")
    if not isinstance(config.get("attributes", {}), dict):
        raise EDMPickleError(f"{config_file} has attributes that are not a mapping; {redo}")
    return config


def load_edm_network(path, key: str = "ema") -> tuple[torch.nn.Module, dict]:
    """An EDM denoiser from a released ``.pkl`` or a converted ``.safetensors`` (+ ``.json``).

    Returns (network in eval mode, config): config has ``class_name``, ``init_kwargs`` and
    ``attributes`` (``sigma_min`` / ``sigma_max`` as EDM's object recorded them; the network
    reports those).
    """
    path = Path(path)
    if path.is_dir():
        raise EDMPickleError(f"EDM network {path} is a folder; pass the .pkl or the converted .safetensors")
    if not path.is_file():
        raise FileNotFoundError(f"EDM network {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        config_file = _config_path(path)
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{config_file} is missing: a converted EDM network needs the JSON written beside it"
            )
        config = read_network_config(config_file)
        return _network_from_config(config, load_state_dict(path), str(path)), config
    record = network_record(load_edm_pickle(path), key)
    config = _pickle_config(record)
    return _network_from_config(config, record_state_dict(record), str(path)), config


def convert_edm_pickle(pkl_path, out_path, key: str = "ema") -> Path:
    """Write the network of an EDM pickle as ``out_path`` (.safetensors) plus its ``.json`` config.

    The tensors are checked against the network they belong to before anything is written.
    Returns the safetensors path.
    """
    from safetensors.torch import save_file

    pkl_path, out_path = Path(pkl_path), Path(out_path)
    if out_path.suffix != ".safetensors":
        raise ValueError(f"output {out_path} must end in .safetensors")
    if out_path.is_dir():
        raise UsageError(f"output {out_path} is a folder; name the .safetensors file to write")
    record = network_record(load_edm_pickle(pkl_path), key)
    config = _pickle_config(record)
    state = record_state_dict(record)
    _network_from_config(config, state, str(pkl_path))  # refuse a file our networks cannot run
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        in_the_way = next((p for p in (out_path.parent, *out_path.parent.parents) if p.is_file()), None)
        why = f"{in_the_way} is a file" if in_the_way is not None else (exc.strerror or str(exc))
        raise UsageError(f"cannot create the folder {out_path.parent} ({why}); choose another --output") from None
    config.update(source=pkl_path.name, source_sha256=sha256_file(pkl_path), source_key=key)
    # The tensors to a temporary file first, then the config, then the rename: a .safetensors on
    # disk always has its config beside it, and a failure leaves the earlier pair (or nothing).
    tmp = temp_path_for(out_path)
    config_file = _config_path(out_path)
    had_config = config_file.exists()
    try:
        with writing(out_path):
            try:
                save_file({k: v.contiguous().clone() for k, v in state.items()}, str(tmp))
            except OSError:
                raise
            except Exception as exc:  # safetensors reports an OS refusal as its own error
                raise OSError(getattr(exc, "errno", None), str(exc).splitlines()[0] if str(exc) else repr(exc)) from None
            atomic_write_text(config_file, json.dumps(config, indent=1, sort_keys=True))
            os.replace(tmp, out_path)
    except OSError as exc:
        if not had_config and not out_path.exists():
            config_file.unlink(missing_ok=True)
        raise UsageError(f"cannot write {out_path} ({exc.strerror or exc}); choose another --output") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out_path

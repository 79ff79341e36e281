"""Unpickling Lightning checkpoints without omegaconf / transformers / Lightning installed.

A Lightning `.ckpt` pickles the hydra config (omegaconf objects) and, for MDLM / MDM-Prime v1, the HF tokenizer object
in `hyper_parameters`. `stub_pickle` is a `pickle_module` for `torch.load(weights_only=False)` whose unpickler rebuilds
tensors and plain containers and turns every other class into an inert `_Stub`: no code from the checkpoint runs.
`plain` then recovers the hydra config as plain dicts.
"""
from __future__ import annotations

import pickle
import types
from collections.abc import Mapping

import torch

class _Stub:
    """Inert stand-in for a class the checkpoint names but the loader will not import (omegaconf, tokenizers, ...).

    It records constructor arguments, pickled state and container items so that `plain` can recover a hydra
    config as plain dicts; it never runs code from the checkpoint.
    """

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        self.__dict__["_args"] = args

    def __setstate__(self, state):
        self.__dict__["_state"] = state

    def __setitem__(self, key, value):
        self.__dict__.setdefault("_items", {})[key] = value

    def append(self, value):
        self.__dict__.setdefault("_list", []).append(value)

    def extend(self, values):
        self.__dict__.setdefault("_list", []).extend(values)

    def __repr__(self):
        return f"<stub {type(self).__qualname__}>"


_BUILTINS_OK = {"set", "frozenset", "list", "dict", "tuple", "slice", "range", "complex", "bytearray", "bytes",
                "int", "float", "str", "bool"}


class _StubUnpickler(pickle.Unpickler):
    """Resolves only tensor-rebuilding and plain-container globals; every other global becomes a `_Stub` subclass."""

    _stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module, name):
        root = module.split(".")[0]
        allowed = (
            (module == "builtins" and name in _BUILTINS_OK)
            or (module == "collections" and name in {"OrderedDict", "defaultdict", "deque", "Counter"})
            or (module == "_codecs" and name == "encode")
            or (module == "copyreg" and name == "_reconstructor")
            or (module == "torch._utils" and name.startswith("_rebuild"))
            or (module == "torch._tensor" and name.startswith("_rebuild"))
            or (module == "torch.nn.parameter" and name == "Parameter")
            or (module == "torch" and (name in {"Size", "device", "Tensor"} or name.endswith("Storage")
                                       or isinstance(getattr(torch, name, None), torch.dtype)))
            or (root == "numpy" and (name in {"_reconstruct", "scalar", "ndarray", "dtype"} or name.endswith("DType")))
        )
        if allowed:
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                pass
        key = (module, name)
        if key not in self._stubs:
            self._stubs[key] = type(name, (_Stub,), {"__module__": "prime_eval.checkpoints.unpickle._stubbed." + module,
                                                     "__qualname__": f"{module}.{name}"})
        return self._stubs[key]


stub_pickle = types.ModuleType("prime_eval_stub_pickle")
stub_pickle.Unpickler = _StubUnpickler
stub_pickle.load = lambda f, **kw: _StubUnpickler(f, **kw).load()
stub_pickle.loads = pickle.loads
stub_pickle.__name__ = "pickle"


def plain(obj, depth: int = 0):
    """Hydra / omegaconf config (real or stubbed) -> plain dicts, lists and scalars; opaque objects -> None."""
    if depth > 64:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    if isinstance(obj, _Stub):
        d = obj.__dict__
        st = d.get("_state")
        if isinstance(st, tuple) and len(st) == 2 and isinstance(st[1], dict):  # (state, slotstate)
            st = {**(st[0] or {}), **st[1]}
        if isinstance(st, dict):
            if "_content" in st:
                return plain(st["_content"], depth + 1)
            if "_val" in st:
                return plain(st["_val"], depth + 1)
        if "_items" in d:
            return plain(d["_items"], depth + 1)
        if "_list" in d:
            return plain(d["_list"], depth + 1)
        return None
    if isinstance(obj, Mapping) or hasattr(obj, "items"):
        try:
            return {str(k): plain(v, depth + 1) for k, v in obj.items()}
        except Exception:  # noqa: BLE001 - an unresolvable interpolation in a real omegaconf object
            return None
    if isinstance(obj, (list, tuple)):
        return [plain(v, depth + 1) for v in obj]
    return None


def get(d, *path, default=None):
    for k in path:
        if not isinstance(d, Mapping) or k not in d:
            return default
        d = d[k]
    return d


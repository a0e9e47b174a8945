"""Server checkpoints: the whole state of a `ServerHalf` (and its sampler) as one file.

A server half's state is whatever its attributes hold between two rounds: the central model
w, the downlink memory H and server residual e_s, the uplink memory h (PP2) or the per-client
h_i (PP1, a `TensorStore`), Rand-MCM's H_i, the broadcast log Ω_1..Ω_k, the model version,
the per-client books, the statistics. Rather than list them (and forget the next one a
change adds), `capture` walks the object's attributes and encodes every value it finds:

- tensors, numpy arrays, bytes, numbers, strings, None;
- lists, tuples, dicts (any keys), deques;
- dataclasses and plain objects of the project's `strategies` package (ClientBook, Wire,
  RoundStats, BroadcastLog, ...), field by field;
- a `TensorStore` as its rows (keys and one d-vector per key);
- numpy and torch random generators as their state.

Anything else raises `CheckpointError` naming the attribute, so new state of an unknown
kind is noticed by the round-trip tests instead of being silently lost. Not saved, because
the run config rebuilds them (`REBUILT`, and any attribute holding a compressor of the
`compression` package): the settings and the compressors; nor the per-round scratch that
`begin_round` clears (`SCRATCH`), nor the replies still in flight (`IN_FLIGHT`: dropped on
resume, as timed out), nor caches (attributes ending in ``_cache``) which are
recomputed on demand. A family may add names to exclude in a class attribute
``checkpoint_exclude``.

`restore` writes the decoded values back onto a server half freshly built from the same run
config (same settings, w0, store directory), so that it continues bit for bit as the
original would have. The file holds only dicts, lists, strings, numbers and tensors and is
read with ``torch.load(weights_only=True)``: loading it runs no pickled code.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import tempfile
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch

from strategies.memory_store import TensorStore
from strategies.server_half import ServerHalf
from strategies.server_opt import ServerOptSettings
from strategies.settings import AlgorithmSettings

#: 2: the server optimiser's state (`opt_state`, a NamedTuple of `strategies.server_opt`)
#: and NamedTuples in the file; format-1 files (written before server optimisers) still
#: restore: their runs used server-opt=sgd, whose state is empty
FORMAT = 2
READABLE_FORMATS = (1, 2)

#: attributes rebuilt from the run config when the server half is constructed
REBUILT = frozenset(
    {"settings", "up_compressor", "down_compressor", "_store_dir", "dim", "optimizer"}
)

#: settings fields added after format 1, with the value every format-1 run had: left out of
#: the fingerprint while they hold it, so that older checkpoints keep matching
_LATER_SETTINGS: dict[str, Any] = {
    "client_momentum": 0.0,
    "server_opt": dataclasses.asdict(ServerOptSettings()),
    "preset.client_momentum": False,
    "max_staleness": 0,
}
#: per-round scratch, cleared by `ServerHalf.begin_round` (empty or stale between rounds),
#: and the scratch d-vector of `aggregation.add_uplink` (no state between two calls)
SCRATCH = frozenset({"pending", "_sum", "_scratch"})
#: replies in flight (max-staleness τ > 0: `ServerHalf.outstanding`): dropped on resume, as
#: if they had timed out, since a resumed run is a new Flower run that cannot pull the old
#: run's replies; the clients roll back (the next downlink acks an older round)
IN_FLIGHT = frozenset({"outstanding"})
#: set by the Flower glue, which asks the nodes again (a resumed run's nodes have new ids):
#: the node → partition map (`strategies.partitions`)
GLUE = frozenset({"seed_keys"})

#: plain objects and dataclasses are rebuilt only from classes of these packages
_TRUSTED_PACKAGES = ("strategies.",)

#: where the classes that checkpoints written before the split of `strategies.common`
#: name now live (so that those checkpoints still restore)
_MOVED = {
    "strategies.common:ClientBook": "strategies.server_half:ClientBook",
    "strategies.common:PendingReply": "strategies.server_half:PendingReply",
    "strategies.common:RoundStats": "strategies.server_half:RoundStats",
    "strategies.common:BroadcastLog": "strategies.catchup:BroadcastLog",
    "strategies.common:Wire": "strategies.encoding:Wire",
}


class CheckpointError(ValueError):
    """A state that cannot be saved, or a checkpoint that does not fit the server half."""


def excluded(server: ServerHalf) -> frozenset[str]:
    """The attribute names `capture` leaves out for this server half."""
    extra = getattr(type(server), "checkpoint_exclude", ())
    return REBUILT | SCRATCH | IN_FLIGHT | GLUE | frozenset(extra)


def _keep(server: ServerHalf, name: str) -> bool:
    if name in excluded(server) or name.endswith("_cache"):
        return False
    # compressors are built from their specs (`get_compressor` shares one instance per
    # spec, so they hold no state of a run): any attribute holding one is rebuilt too
    return not type(getattr(server, name, None)).__module__.startswith("compression.")


def settings_fingerprint(settings: AlgorithmSettings) -> dict[str, Any]:
    """The resolved settings as plain data: a checkpoint only restores into equal settings.
    Fields added later are left out while they hold the value older runs had."""
    plain = json.loads(json.dumps(dataclasses.asdict(settings), default=str))
    for path, old in _LATER_SETTINGS.items():
        *parents, name = path.split(".")
        node = plain
        for parent in parents:
            node = node.get(parent, {})
        if name in node and node[name] == old:
            del node[name]
    return plain


# ----------------------------------------------------------------------------- encoding
def _class_path(obj: Any) -> str:
    cls = type(obj)
    return f"{cls.__module__}:{cls.__qualname__}"


def _trusted_class(path: str, where: str) -> type:
    path = _MOVED.get(path, path)
    module, _, qualname = path.partition(":")
    if not module.startswith(_TRUSTED_PACKAGES) or not qualname or "." in qualname:
        raise CheckpointError(f"{where}: class {path!r} is not one of the project's strategies")
    cls = getattr(importlib.import_module(module), qualname, None)
    if not isinstance(cls, type):
        raise CheckpointError(f"{where}: no class {path!r}")
    return cls


def encode(value: Any, where: str) -> Any:
    """`value` as a tree of dicts, lists, str, int, float, bool, None and tensors."""
    if value is None or isinstance(value, bool | str | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**63 else {"__bigint__": str(value)}
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, np.ndarray):
        return {"__ndarray__": torch.from_numpy(np.array(value))}
    if isinstance(value, np.generic):
        return encode(value.item(), where)
    if isinstance(value, bytes | bytearray):
        raw = torch.tensor(list(value), dtype=torch.uint8) if not value else None
        data = raw if raw is not None else torch.frombuffer(bytearray(value), dtype=torch.uint8)
        return {"__bytes__": data.clone()}
    if isinstance(value, list):
        return [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, tuple) and hasattr(type(value), "_fields"):  # a NamedTuple
        if not type(value).__module__.startswith(_TRUSTED_PACKAGES):
            raise CheckpointError(f"{where}: cannot save a {_class_path(value)}")
        names: tuple[str, ...] = type(value)._fields  # type: ignore[attr-defined]
        fields = {k: encode(v, f"{where}.{k}") for k, v in zip(names, value, strict=True)}
        return {"__namedtuple__": _class_path(value), "fields": fields}
    if isinstance(value, tuple):
        return {"__tuple__": [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, deque):
        items = [encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"__deque__": items, "maxlen": value.maxlen}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [encode(k, f"{where} key"), encode(v, f"{where}[{k!r}]")] for k, v in value.items()
            ]
        }
    if isinstance(value, TensorStore):
        keys, rows = value.export()
        return {"__tensorstore__": {"keys": keys, "rows": rows}}
    if isinstance(value, np.random.Generator):
        state = json.dumps(value.bit_generator.state)
        return {"__np_generator__": state, "bit_generator": type(value.bit_generator).__name__}
    if isinstance(value, torch.Generator):
        return {"__torch_generator__": value.get_state()}
    path = _class_path(value)
    if type(value).__module__.startswith(_TRUSTED_PACKAGES):
        if dataclasses.is_dataclass(value):
            fields = {
                f.name: encode(getattr(value, f.name), f"{where}.{f.name}")
                for f in dataclasses.fields(value)
            }
        elif hasattr(value, "__dict__"):
            fields = {k: encode(v, f"{where}.{k}") for k, v in vars(value).items()}
        else:
            raise CheckpointError(f"{where}: cannot save a {path} (no attributes)")
        return {"__object__": path, "fields": fields}
    raise CheckpointError(
        f"{where}: cannot save a value of type {path}; add it to the checkpoint's encoder "
        "or to the class's checkpoint_exclude if the run config rebuilds it"
    )


def decode(tree: Any, where: str, current: Any = None) -> Any:
    """The value `encode` turned into `tree`. `current` is the fresh server's value of the
    same attribute: a `TensorStore` is filled in place (it keeps its directory and initial
    vector), a generator gets its state set."""
    if tree is None or isinstance(tree, bool | str | int | float | torch.Tensor):
        return tree
    if isinstance(tree, list):
        return [decode(v, f"{where}[{i}]") for i, v in enumerate(tree)]
    if not isinstance(tree, dict) or len(tree) == 0:
        raise CheckpointError(f"{where}: unexpected {type(tree).__name__} in the checkpoint")
    if "__bigint__" in tree:
        return int(tree["__bigint__"])
    if "__ndarray__" in tree:
        return tree["__ndarray__"].numpy().copy()
    if "__bytes__" in tree:
        return tree["__bytes__"].numpy().tobytes()
    if "__tuple__" in tree:
        return tuple(decode(v, f"{where}[{i}]") for i, v in enumerate(tree["__tuple__"]))
    if "__deque__" in tree:
        items = [decode(v, f"{where}[{i}]") for i, v in enumerate(tree["__deque__"])]
        return deque(items, maxlen=tree["maxlen"])
    if "__dict__" in tree:
        return {
            decode(k, f"{where} key"): decode(v, f"{where}[{k!r}]") for k, v in tree["__dict__"]
        }
    if "__tensorstore__" in tree:
        if not isinstance(current, TensorStore):
            raise CheckpointError(
                f"{where}: the checkpoint holds a per-client store, the server has "
                f"{type(current).__name__} (different settings?)"
            )
        data = tree["__tensorstore__"]
        current.load(list(data["keys"]), data["rows"])
        return current
    if "__np_generator__" in tree:
        bit_generator = getattr(np.random, str(tree["bit_generator"]))
        np_generator = np.random.Generator(bit_generator())
        np_generator.bit_generator.state = json.loads(tree["__np_generator__"])
        return np_generator
    if "__torch_generator__" in tree:
        generator = current if isinstance(current, torch.Generator) else torch.Generator()
        generator.set_state(tree["__torch_generator__"])
        return generator
    if "__namedtuple__" in tree:
        cls = _trusted_class(str(tree["__namedtuple__"]), where)
        fields = {k: decode(v, f"{where}.{k}") for k, v in tree["fields"].items()}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise CheckpointError(f"{where}: {exc}") from None
    if "__object__" in tree:
        cls = _trusted_class(str(tree["__object__"]), where)
        fields = {k: decode(v, f"{where}.{k}") for k, v in tree["fields"].items()}
        obj: Any = object.__new__(cls)
        for key, value in fields.items():
            object.__setattr__(obj, key, value)  # also for frozen dataclasses
        return obj
    raise CheckpointError(f"{where}: unknown entry {sorted(tree)[:3]} in the checkpoint")


# ----------------------------------------------------------------------------- the state
def capture(server: ServerHalf, **extra: Any) -> dict[str, Any]:
    """The server half's state (every attribute but the excluded ones) plus `extra` entries
    (e.g. the round and the sampler's generator), as a tree `save` can write."""
    attributes = {
        name: encode(value, name) for name, value in vars(server).items() if _keep(server, name)
    }
    return {
        "format": FORMAT,
        "class": _class_path(server),
        "settings": json.dumps(settings_fingerprint(server.settings), sort_keys=True),
        "attributes": attributes,
        "extra": {name: encode(value, name) for name, value in extra.items()},
    }


def restore(server: ServerHalf, state: dict[str, Any]) -> dict[str, Any]:
    """Put a captured state back onto `server` (built from the same run config); return the
    decoded `extra` entries. Raises `CheckpointError` when the checkpoint does not fit."""
    if state.get("format") not in READABLE_FORMATS:
        raise CheckpointError(
            f"checkpoint format {state.get('format')!r}, expected one of {READABLE_FORMATS}"
        )
    if state.get("class") != _class_path(server):
        raise CheckpointError(
            f"checkpoint of a {state.get('class')}, the run config builds a {_class_path(server)}"
        )
    mine = json.dumps(settings_fingerprint(server.settings), sort_keys=True)
    if state.get("settings") != mine:
        raise CheckpointError("the checkpoint was written with other algorithm settings")
    attributes = state["attributes"]
    unknown = sorted(set(attributes) - {n for n in vars(server) if _keep(server, n)})
    if unknown:
        raise CheckpointError(f"checkpoint attributes {unknown} are not on {_class_path(server)}")
    for name, tree in attributes.items():
        setattr(server, name, decode(tree, name, getattr(server, name, None)))
    for name in (SCRATCH | IN_FLIGHT) & set(vars(server)):
        value = getattr(server, name)
        if hasattr(value, "clear"):
            value.clear()
    return {name: decode(tree, name) for name, tree in state.get("extra", {}).items()}


# ----------------------------------------------------------------------------- files
def save(state: dict[str, Any], path: str | os.PathLike[str]) -> int:
    """Write `state` to `path` atomically; return its size in bytes.

    Written to a temporary file in the same folder, fsync'ed, then `os.replace`d over
    `path` (and the folder fsync'ed): a crash leaves the previous checkpoint or the new one,
    never a torn file. The folder is made 0700, the file is 0600.
    """
    target = Path(path)
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:  # mkstemp creates the file 0600
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by `save` (tensors and plain data only)."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or "attributes" not in state:
        raise CheckpointError(f"{path}: not a fedsqueeze server checkpoint")
    return state

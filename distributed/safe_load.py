"""Loading a checkpoint file without trusting it: torch's weights-only unpickler, within bounds.

torch's weights-only unpickler (``torch.load(weights_only=True)``) builds only tensors, plain data and
the globals registered as safe, and refuses BUILD on anything else. What it allows can still be made
to allocate: ``bytearray(2**31)``, numpy's ``_reconstruct`` with a huge shape, a tensor whose sizes
exceed its storage. So before it runs, :func:`check_bounds` reads the file without running it: the
archive (torch's zip format, every record stored uncompressed, so none is larger than the file) and
its pickle's opcodes, where no integer argument of a call, no tensor's element count and no storage's
byte count may exceed what the file holds. Every file is loaded by :func:`safe_load`: DeepSpeed's
(through its checkpoint engine, ``deepspeed_compat.load_files_with``), the expert files and each
rank's own state. Anything refused or malformed is a one-line :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import math
import pickle
import pickletools
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be saved or loaded here; the message (one line) says which and why.
    The base of every checkpoint failure (``sigma_moe.launch.checkpoint`` subclasses it too): the CLI
    prints it and exits with status 2."""


# Callables whose argument at this index is a shape: its element count must fit the file too.
_SHAPE_ARGUMENT = {"torch._utils._rebuild_tensor_v2": 2, "numpy.core.multiarray._reconstruct": 1}
_SHAPE_ARGUMENT["numpy._core.multiarray._reconstruct"] = 1


def numpy_array_globals() -> list:
    """What unpickling a numpy array (the numpy RNG state) needs beyond tensors and plain data."""
    reconstruct = np.zeros(1).__reduce__()[0]
    return [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path: str | Path, map_location: Any = "cpu", *, safe_globals: Iterable = ()) -> Any:
    """``torch.load`` of ``path`` with the weights-only unpickler (numpy arrays and ``safe_globals``
    allowed too), after :func:`check_bounds`."""
    path = Path(path)
    try:
        check_bounds(path)
        with torch.serialization.safe_globals([*numpy_array_globals(), *safe_globals]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        text = str(e)
        named = re.search(r"GLOBAL ([\w.]+)", text)
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)  # what it refused
        why = (
            f"its pickle would build {named.group(1)}"
            if named
            else f"its pickle does what weights-only loading refuses ({' '.join(reason.group(1).split())[:160]})"
            if reason
            else _first_line(text)
        )
        raise CheckpointError(
            f"refusing to load {path}: {why}, which a checkpoint holds no reason to (it may run code); load only "
            "checkpoints you trust, as saved by sigma-moe"
        ) from None
    except (RuntimeError, ValueError, TypeError, KeyError, IndexError, EOFError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"cannot load {path}: a malformed record ({type(e).__name__}: {_first_line(str(e))})"
        ) from None
    except (OSError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read {path}: {_first_line(str(e))}") from None


def check_bounds(path: Path) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a torch zip archive of stored records whose
    pickle allocates no more than the file's size justifies (see the module docstring)."""
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"cannot load {path}: it is not a torch zip archive (truncated, or another format)")
    with zipfile.ZipFile(path) as archive:
        records = {}
        for info in archive.infolist():
            if info.compress_type != zipfile.ZIP_STORED or info.file_size > size:
                raise CheckpointError(
                    f"refusing to load {path}: its record {info.filename} claims {info.file_size:,} bytes "
                    f"({'compressed' if info.compress_type != zipfile.ZIP_STORED else 'more than the file'}); "
                    "torch stores records as they are"
                )
            records[info.filename] = info.file_size
        pickles = [name for name in records if name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"cannot load {path}: it holds {len(pickles)} data.pkl records, not one")
        prefix = pickles[0][: -len("data.pkl")] + "data/"
        data = archive.read(pickles[0])
    storages = {name[len(prefix) :]: n for name, n in records.items() if name.startswith(prefix)}
    problem = _pickle_problem(data, size, storages)
    if problem:
        raise CheckpointError(f"refusing to load {path}: {problem}")


class _Global(str):
    """A global the pickle names (``module.name``)."""


class _Call:
    def __init__(self, func: Any, args: Any):
        self.func, self.args = func, args


_MARK = object()
_OPAQUE = object()


def _pickle_problem(data: bytes, limit: int, storages: dict[str, int]) -> str | None:
    """Walk the pickle's opcodes with a stack of known values (constants, tuples, globals, calls), not
    running anything; the first allocation past ``limit`` bytes, or None."""
    stack: list[Any] = []
    memo: dict[int, Any] = {}

    def pop_mark() -> list:
        for i in range(len(stack) - 1, -1, -1):
            if stack[i] is _MARK:
                items = stack[i + 1 :]
                del stack[i:]
                return items
        raise ValueError("MARK missing")

    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in ("PROTO", "FRAME", "STOP"):
                continue
            if name == "MARK":
                stack.append(_MARK)
            elif name == "GLOBAL":  # protocol 2 names builtins by their Python 2 module
                stack.append(_Global(re.sub(r"^__builtin__ ", "builtins ", arg).replace(" ", ".")))
            elif name == "STACK_GLOBAL":
                attr, module = stack.pop(), stack.pop()
                stack.append(_Global(f"{module}.{attr}"))
            elif name in ("REDUCE", "NEWOBJ"):
                args, func = stack.pop(), stack.pop()
                if problem := _call_problem(func, args, limit):
                    return problem
                stack.append(_Call(func, args))
            elif name == "BINPERSID":
                if problem := _storage_problem(stack.pop(), storages):
                    return problem
                stack.append(_OPAQUE)
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                del stack[-n:]
                stack.append(items)
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                stack.append(memo[int(arg)])
            elif op.arg is not None and not op.stack_before and len(op.stack_after) == 1:
                stack.append(arg)  # a constant: int, float, str, bytes, ...
            else:  # anything else by its declared stack effect, its result unknown
                if any(s is pickletools.markobject for s in op.stack_before):
                    pop_mark()
                    before = [s for s in op.stack_before if s is not pickletools.markobject and s.name != "stackslice"]
                else:
                    before = op.stack_before
                if before:
                    del stack[-len(before) :]
                stack.extend(_OPAQUE for _ in op.stack_after)
    except (ValueError, IndexError, KeyError) as e:
        return f"its pickle is malformed ({_first_line(str(e))})"
    return None


def _ints(value: Any, depth: int = 0) -> Iterable[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        yield value
    elif isinstance(value, (tuple, list)) and depth < 4:
        for v in value:
            yield from _ints(v, depth + 1)


def _call_problem(func: Any, args: Any, limit: int) -> str | None:
    name = str(func) if isinstance(func, _Global) else "a callable"
    big = next((n for n in _ints(args) if n > limit), None)
    if big is not None:
        return f"its pickle calls {name} with {big:,}, more than the file's {limit:,} bytes justify"
    index = _SHAPE_ARGUMENT.get(name)
    if index is not None and isinstance(args, tuple) and len(args) > index and isinstance(args[index], tuple):
        shape = list(_ints(args[index]))
        if len(shape) == len(args[index]) and math.prod(shape) > limit:
            return f"its pickle builds {name} of shape {shape}, more elements than the file's {limit:,} bytes hold"
    return None


def _storage_problem(pid: Any, storages: dict[str, int]) -> str | None:
    """A tensor storage record (``('storage', type, key, location, numel)``) must exist and hold numel
    elements."""
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[4], int)):
        return f"its pickle names a storage record it does not describe ({str(pid)[:80]})"
    _, kind, key, _, numel = pid
    try:
        itemsize = torch.serialization.StorageType(str(kind).rsplit(".", 1)[-1]).dtype.itemsize
    except (KeyError, AttributeError, TypeError):
        itemsize = 1  # torch.UntypedStorage
    if str(key) not in storages:
        return f"its storage record {key} is missing"
    if numel < 0 or numel * itemsize > storages[str(key)]:
        return f"its storage record {key} claims {numel:,} elements, its data holds {storages[str(key)]:,} bytes"
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if lines else "no detail")[:200]

"""A checkpoint file cannot make loading run code or allocate more than it holds: one test per payload
class of issue 23 (an allowed constructor with a huge argument, a storage record larger than its data,
a BUILD on an allowed global, crafted tensor sizes, a compressed record, garbage), each refused with
one line naming the file, and real checkpoint files still load."""

from __future__ import annotations

import io
import pickle
import resource
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from sigma_moe.distributed.deepspeed_compat import DEEPSPEED_STATE_CLASSES
from sigma_moe.distributed.safe_load import CheckpointError, safe_load


class _Reduce:
    """Pickles as ``func(*args)`` (a REDUCE), whatever func is."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class _StorageRef:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


def _craft(path: Path, obj, storages: dict[str, bytes] | None = None, *, compress=zipfile.ZIP_STORED) -> Path:
    """A torch zip archive whose data.pkl is ``obj`` pickled as torch would (storages as persistent ids)."""

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, _StorageRef):
                return ("storage", torch.FloatStorage, o.key, "cpu", o.numel)
            return None

    buffer = io.BytesIO()
    Pickler(buffer, protocol=2).dump(obj)
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", buffer.getvalue())
        z.writestr("archive/byteorder", "little")
        for key, data in (storages or {}).items():
            z.writestr(f"archive/data/{key}", data)
        z.writestr("archive/version", "3\n")
    return path


def _tensor(storage: _StorageRef, size: tuple, stride: tuple):
    return _Reduce(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, OrderedDict())


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_real_checkpoint_file_loads(tmp_path):
    state = {
        "w": torch.arange(6.0).reshape(2, 3),
        "rng": np.random.get_state(),
        "python": (3, tuple(range(2**31, 2**31 + 5)), None),  # big ints outside calls are plain data
        "steps": [1, 2],
    }
    torch.save(state, tmp_path / "ok.pt")
    loaded = safe_load(tmp_path / "ok.pt", safe_globals=DEEPSPEED_STATE_CLASSES)
    assert torch.equal(loaded["w"], state["w"]) and loaded["python"] == state["python"]
    assert np.array_equal(loaded["rng"][1], state["rng"][1])


def test_an_allowed_constructor_with_a_huge_argument_is_refused_before_it_allocates(tmp_path):
    before = _peak_rss_mb()
    path = _craft(tmp_path / "bytearray.pt", {"x": _Reduce(bytearray, 2**31)})
    with pytest.raises(CheckpointError, match=r"refusing to load .*bytearray.pt: its pickle calls builtins.bytearray"):
        safe_load(path)
    assert _peak_rss_mb() - before < 500  # 2 GiB were never allocated


def test_a_numpy_array_of_a_huge_shape_is_refused(tmp_path):
    reconstruct = np.zeros(1).__reduce__()[0]
    path = _craft(tmp_path / "ndarray.pt", {"x": _Reduce(reconstruct, np.ndarray, (256, 256, 256, 256), b"b")})
    with pytest.raises(CheckpointError, match=r"builds numpy.*_reconstruct of shape \[256, 256, 256, 256\]"):
        safe_load(path)


def test_a_storage_larger_than_its_data_is_refused(tmp_path):
    ref = _StorageRef("0", 2**28)  # 1 GiB of float32 claimed, 16 bytes there
    path = _craft(tmp_path / "storage.pt", {"w": _tensor(ref, (4,), (1,))}, {"0": b"\0" * 16})
    with pytest.raises(CheckpointError, match=r"its storage record 0 claims 268,435,456 elements, its data holds 16"):
        safe_load(path)


def test_crafted_tensor_sizes_are_one_line_errors(tmp_path):
    ref = _StorageRef("0", 4)
    path = _craft(tmp_path / "sizes.pt", {"w": _tensor(ref, (3, 3), (3, 1))}, {"0": b"\0" * 16})  # 9 > 4
    with pytest.raises(CheckpointError, match=r"cannot load .*sizes.pt: a malformed record \(RuntimeError: ") as e:
        safe_load(path)
    assert "\n" not in str(e.value)


def test_a_build_on_an_allowed_global_is_refused_and_changes_nothing(tmp_path):
    # GLOBAL torch._utils._rebuild_tensor_v2, {"pwned": 1}, BUILD: setattr on torch's own function
    data = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nq\x00}q\x01X\x05\x00\x00\x00pwnedq\x02K\x01sb."
    path = tmp_path / "build.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/version", "3\n")
    with pytest.raises(CheckpointError, match=r"refusing to load .*build.pt: its pickle does what weights-only"):
        safe_load(path, safe_globals=DEEPSPEED_STATE_CLASSES)
    assert not hasattr(torch._utils._rebuild_tensor_v2, "pwned")


def test_code_is_refused_with_its_name(tmp_path):
    import os

    path = _craft(tmp_path / "code.pt", {"x": _Reduce(os.system, "true")})
    with pytest.raises(CheckpointError, match=r"refusing to load .*code.pt: its pickle would build posix.system"):
        safe_load(path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("compressed record", r"claims .* \(compressed\)"),
        ("not a zip", r"is not a torch zip archive"),
        ("truncated pickle", r"its pickle is malformed|a malformed record"),
    ],
)
def test_malformed_files_are_one_line_errors(tmp_path, damage, message):
    path = tmp_path / "bad.pt"
    if damage == "compressed record":  # a zip bomb: a small file that inflates past its size
        _craft(path, {"w": 1}, {"0": b"\0" * 2**20}, compress=zipfile.ZIP_DEFLATED)
    elif damage == "not a zip":
        path.write_bytes(b"\x80\x02}q\x00." + b"\0" * 100)
    else:
        torch.save({"w": torch.ones(3)}, path)
        with zipfile.ZipFile(path) as z:
            records = {n: z.read(n) for n in z.namelist()}
        pkl = next(n for n in records if n.endswith("data.pkl"))
        records[pkl] = records[pkl][: len(records[pkl]) // 2]
        with zipfile.ZipFile(path, "w") as z:
            for n, d in records.items():
                z.writestr(n, d)
    with pytest.raises(CheckpointError, match=message) as e:
        safe_load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)

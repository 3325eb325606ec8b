"""The one atomic-write helper: the target is the old file or the new one, never a part; a failed write
leaves no temporary file; the new file gets the permissions ``open`` would give it."""

from __future__ import annotations

import os

import pytest
import torch

from sigma_moe.atomic_io import atomic_write, atomic_write_bytes, atomic_write_text


def test_writes_and_replaces(tmp_path):
    path = tmp_path / "sub" / "a.json"  # the folder is created
    atomic_write_text(path, "first ✓")
    atomic_write_text(path, "second ✓")
    assert path.read_text(encoding="utf-8") == "second ✓"
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_write(path, lambda tmp: torch.save({"x": torch.ones(2)}, tmp))

    def half_then_fail(tmp):
        tmp.write_bytes(b"partial")
        raise OSError(28, "No space left on device", str(tmp))

    with pytest.raises(OSError, match="No space left"):
        atomic_write(path, half_then_fail)
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_permissions_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # readable by others, as open() gives

"""Data problems found only once training has started (the file is read then): one message, exit 2,
nothing written into the run folder."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "hold no text (empty files)"),
        (b"0123456789", "too little text: train has 9 tokens (needs 33)"),
        (bytes(range(256)) * 40, "could not be decoded as utf-8"),
        ("caf\xe9 na\xefve ".encode("latin-1") * 2000, "could not be decoded as utf-8"),
        ("hello world ".encode("utf-16") * 2000, "could not be decoded as utf-8"),
    ],
)
def test_bad_data_files_end_training_with_one_line(tmp_path, capsys, content, message):
    """Found only once training starts (the file is read then): still one message, exit 2, and
    no config.yaml written into the run folder."""
    from launch_helpers import TINY, restored_environ, tiny_overrides
    from sigma_moe.launch.cli import main

    (tmp_path / "bad.txt").write_bytes(content)
    sets = [a for o in tiny_overrides(tmp_path / "run", f"data.path={tmp_path / 'bad.txt'}") for a in ("--set", o)]
    with restored_environ():
        assert main(["train", str(TINY), *sets]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run" / "config.yaml").exists()

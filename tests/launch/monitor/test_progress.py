"""The console's progress: a bar only on a terminal; in a log (a file, a pipe) one plain line per
logging interval and at the last step, no carriage return; the result line's note on the unigram
baseline."""

from __future__ import annotations

import io
import re

from sigma_moe.launch.monitor.progress import Progress, duration
from sigma_moe.launch.train import above_baseline_note


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_file_gets_one_plain_line_per_interval(tmp_path, capsys):
    with open(tmp_path / "err.log", "w") as err:  # a real file: not a terminal
        progress = Progress(total_steps=23, start_step=3, log_every=5, bar=True, stream=err)
        for step in range(4, 24):
            progress.step(step, loss=5.0 - step / 10, tokens_per_s=12345.6)
        progress.write("a message")
        progress.close()
    out = capsys.readouterr().out + (tmp_path / "err.log").read_text()
    assert "\r" not in out
    lines = out.splitlines()
    steps = [int(m.group(1)) for line in lines if (m := re.match(r"step (\d+)/23 \| ", line))]
    assert steps == [5, 10, 15, 20, 23]  # every log_every steps, and the last
    assert lines[0] == "step 5/23 | loss 4.5000 | 12,346 tokens/s | " + lines[0].split(" | ", 3)[3]
    assert re.fullmatch(r"elapsed \d+s \| ETA \d+s", lines[0].split(" | ", 3)[3])
    assert lines[-1] == "a message"


def test_the_eta_is_the_remaining_steps_at_the_mean_step_time():
    progress = Progress(total_steps=1000, start_step=100, log_every=10, bar=False, stream=Terminal())
    assert progress.bar is None  # progress_bar false: plain lines on a terminal too
    line = progress.line(400, loss=3.25, tokens_per_s=999.4, elapsed=150.0)  # 300 steps in 150 s
    assert line == "step 400/1000 | loss 3.2500 | 999 tokens/s | elapsed 2m30s | ETA 5m00s"
    assert [duration(s) for s in (0, 59.4, 61, 3599, 3725)] == ["0s", "59s", "1m01s", "59m59s", "1h02m"]


def test_a_terminal_gets_the_bar():
    term = Terminal()
    progress = Progress(total_steps=10, start_step=0, log_every=5, bar=True, stream=term)
    for step in range(1, 11):
        progress.step(step, loss=1.0, tokens_per_s=10.0)
    progress.close()
    assert progress.bar is not None and "\r" in term.getvalue() and "10/10" in term.getvalue()


def test_the_result_line_says_when_a_smoke_run_ends_above_the_unigram_baseline():
    assert above_baseline_note(110.0, 412.0, 7_680) == ""  # below the baseline: nothing to say
    smoke = above_baseline_note(500.0, 412.0, 7_680)
    assert smoke.startswith(" (above it: a smoke run, 7,680 training tokens") and "configs/default.yaml" in smoke
    long_run = above_baseline_note(500.0, 412.0, 50_000_000)
    assert "smoke" not in long_run and "50,000,000 training tokens" in long_run and "optimizer.lr" in long_run

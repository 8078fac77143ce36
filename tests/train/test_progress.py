"""Training progress: plain lines in a log file, a live bar on a terminal (also one that reports 0 columns)."""

from __future__ import annotations

import io
import os
import re

import pytest

from climber.config import resolve
from climber.train import progress
from climber.train.loop import Trainer
from conftest import TINY


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return 2


def train_one_epoch(data, out):
    cfg = resolve("climber-tiny", None, TINY + ["train.epochs=1"])
    trainer = Trainer(out, data, cfg, log=lambda *_: None, progress=True)
    trainer.fit()
    return len(trainer.train_loader)


def test_a_log_file_gets_plain_progress_lines_and_no_redraws(tiny_synth, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(progress, "PLAIN_EVERY_S", 0.0)  # a line after every batch
    steps = train_one_epoch(tiny_synth, tmp_path / "run")
    err = capsys.readouterr().err  # captured: not a terminal
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == steps
    pattern = r"epoch 0: (\d+)/(\d+) batches \(\d+%\), loss \d\.\d{4}, \d+ samples/s, ETA \d\d:\d\d"
    assert all(re.fullmatch(pattern, line) for line in lines), lines[:2]
    assert [int(re.match(pattern, line)[1]) for line in lines] == list(range(1, steps + 1))


@pytest.mark.parametrize("columns", [0, 120])
def test_the_bar_counts_every_batch_even_where_the_terminal_reports_0_columns(tiny_synth, tmp_path, monkeypatch,
                                                                              columns):
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    monkeypatch.setattr(os, "get_terminal_size", lambda fd=None: os.terminal_size((columns, columns // 4)))
    monkeypatch.setattr(progress, "BAR_EVERY_S", 0.0)  # a redraw after every batch
    steps = train_one_epoch(tiny_synth, tmp_path / "run")
    frames = [f for f in terminal.getvalue().split("\r") if f.strip()]
    counts = [int(re.search(rf" (\d+)/{steps} ", f)[1]) for f in frames]
    assert counts == list(range(steps + 1))  # drawn at 0, then after each batch with its count
    assert all("loss=" in f for f in frames[1:])
    width = columns - 1 if columns else progress.FALLBACK_SHAPE[0]
    assert all(len(f.rstrip()) == width for f in frames)  # the bar fills the line

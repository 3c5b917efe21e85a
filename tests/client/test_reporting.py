"""What a run shows: the progress bar (log lines above it, the last step's numbers at the
end, a bar in notebooks too) and the curves of a run folder."""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
from collections.abc import Iterator

import pytest
from tqdm.auto import tqdm as auto_tqdm

from gradfleet.client.reporting import ProgressReporter


class Terminal(io.StringIO):
    """What the reporter writes to, standing in for a terminal's stderr."""

    def isatty(self) -> bool:
        return True


@contextlib.contextmanager
def terminal(monkeypatch: pytest.MonkeyPatch) -> Iterator[Terminal]:
    """sys.stderr as a terminal, with a console log handler on it (as the CLI has).

    Entered in the test itself: pytest sets sys.stderr again between a fixture's setup
    and the test."""
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    handler = logging.StreamHandler(screen)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield screen
    finally:
        root.removeHandler(handler)


def entry(step: int, loss: float, **extra: float) -> dict[str, float]:
    return {"step": step, "loss": loss, "samples_per_s": 100.0, **extra}


def test_a_log_line_during_the_bar_is_written_above_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare
    log = logging.getLogger("gradfleet.test_reporting")
    log.setLevel(logging.INFO)
    with terminal(monkeypatch) as screen:
        # execute
        with ProgressReporter(total_steps=10, steps_per_epoch=5) as reporter:
            reporter.update(entry(1, 2.0))
            log.info("a message from the trainer")
            reporter.update(entry(2, 1.5))
        log.info("after the bar")
    # assert: the line starts on a cleared line (tqdm.write), not glued to the bar
    lines = [line for line in screen.getvalue().split("\n") if "a message" in line]
    assert [line.split("\r")[-1] for line in lines] == ["a message from the trainer"]
    assert screen.getvalue().endswith("]\nafter the bar\n")  # the console handler is back


def test_the_final_bar_shows_the_last_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    # execute: the last step comes again with its held-out numbers
    with (
        terminal(monkeypatch) as screen,
        ProgressReporter(total_steps=10, steps_per_epoch=4) as reporter,
    ):
        for step in range(1, 11):
            reporter.update(entry(step, 1.0 / step))
        reporter.update(entry(10, 0.1, val_accuracy=0.875))
    # assert: the last bar drawn says epoch 3, the last loss and the held-out accuracy
    final = screen.getvalue().rstrip("\n").split("\r")[-1]
    assert "10/10" in final
    assert "epoch=3" in final and "loss=0.1000" in final and "val_acc=0.875" in final


def test_a_notebook_gets_a_bar_rather_than_log_lines(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # prepare: stderr is no terminal, but an IPython kernel runs this process
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    # execute
    with (
        caplog.at_level(logging.INFO, logger="gradfleet.client.reporting"),
        ProgressReporter(total_steps=3, steps_per_epoch=3) as reporter,
    ):
        for step in (1, 2, 3):
            reporter.update(entry(step, 1.0))
    # assert: tqdm.auto's bar (its notebook widget under Jupyter), and no step lines
    assert isinstance(reporter.bar, auto_tqdm)
    assert reporter.bar.n == 3
    assert not [m for m in caplog.messages if m.startswith("step ")]


def test_without_a_terminal_the_reporter_logs_the_last_step(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with (
        caplog.at_level(logging.INFO, logger="gradfleet.client.reporting"),
        ProgressReporter(total_steps=4, steps_per_epoch=2, stream=io.StringIO()) as reporter,
    ):
        for step in (1, 2, 3, 4, 4):
            reporter.update(entry(step, 0.5))

    assert reporter.bar is None
    assert [m for m in caplog.messages if m.startswith("step 4/4")] == [
        "step 4/4 epoch=2 loss=0.5000 samples/s=100"
    ]

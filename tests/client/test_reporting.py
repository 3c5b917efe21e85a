"""What a run shows: the progress bar (log lines above it, the last step's numbers at the
end, a bar in notebooks too) and the curves of a run folder."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from tqdm.auto import tqdm as auto_tqdm

from gradfleet.client import JobConfig, train
from gradfleet.client.reporting import ProgressReporter, curves_figure, read_history, write_run
from gradfleet.nn import MLP

GRADFLEET = str(Path(sys.executable).with_name("gradfleet"))


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


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder as `gradfleet train` writes it: a short local run on iris."""
    job = JobConfig(
        model=MLP([4, 8, 3], seed=0),
        dataset="iris",
        batch_size=16,
        steps=40,
        eval_every=10,
        name="iris-curves",
    ).resolve()
    result = train(job, backend="local")
    out = tmp_path_factory.mktemp("run")
    write_run(result, job, out)
    return out


def test_curves_have_a_title_a_legend_and_accuracy_on_0_to_1(run_folder: Path) -> None:
    # execute
    history, title = read_history(run_folder)
    figure = curves_figure(history["steps"], history["evaluations"], title)
    # assert
    loss_axis, accuracy_axis = figure.axes
    labels = [
        text.get_text()
        for ax in figure.axes
        if ax.get_legend()
        for text in ax.get_legend().get_texts()
    ]
    assert (run_folder / "curves.png").stat().st_size > 0
    assert loss_axis.get_title() == "iris-curves"
    assert labels == ["training loss", "held-out loss", "held-out accuracy"]
    assert accuracy_axis.get_ylim() == (0.0, 1.0)
    assert loss_axis.get_yscale() == "linear"
    assert curves_figure(history["steps"], [], title, log_loss=True).axes[0].get_yscale() == "log"


def test_plot_redraws_a_run_folder(run_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "again.png"

    done = subprocess.run(
        [GRADFLEET, "plot", str(run_folder), "--log", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == f"wrote {out}\n"
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_refuses_a_folder_without_history_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a run")

    done = subprocess.run(
        [GRADFLEET, "plot", str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )

    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"gradfleet: error: {tmp_path} holds no history.json: give the --out folder of a "
        "training run"
    ]


def test_history_json_of_a_run_holds_the_evaluations(run_folder: Path) -> None:
    history = json.loads((run_folder / "history.json").read_text())

    assert [e["step"] for e in history["evaluations"]] == [10, 20, 30, 40]
    assert {"val_loss", "val_accuracy"} <= set(history["evaluations"][0])

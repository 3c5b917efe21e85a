"""What the user sees during and after a run: a progress bar and the run's output folder."""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from gradfleet.client.model_files import save_model
from gradfleet.worker.config import JobConfig
from gradfleet.worker.result import TrainResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from tqdm import tqdm

logger = logging.getLogger(__name__)
PLOT_EXTRA = "pip install 'gradfleet[plot]'"


class ProgressReporter:
    """A progress bar on a terminal or in a notebook; periodic log lines elsewhere.

    While the bar is shown, log records go through ``tqdm.write`` so that they appear
    above the bar instead of breaking into it. In a Jupyter notebook stderr is no
    terminal, but tqdm's notebook front end (``tqdm.auto``) draws a widget there.
    """

    def __init__(
        self,
        total_steps: int,
        steps_per_epoch: int,
        enabled: bool = True,
        log_every: float = 5.0,
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.steps_per_epoch = total_steps, max(1, steps_per_epoch)
        self.stream = sys.stderr if stream is None else stream
        self.use_bar = enabled and (_is_terminal(self.stream) or in_notebook())
        self.log_every, self.last_log = log_every, 0.0
        self.bar: tqdm | None = None
        self.done = self.logged = 0
        self._showing = contextlib.ExitStack()

    def __enter__(self) -> ProgressReporter:
        if self.use_bar:
            from tqdm.auto import tqdm as bar_class  # the notebook widget, or the text bar
            from tqdm.contrib.logging import logging_redirect_tqdm

            self.bar = self._showing.enter_context(
                bar_class(total=self.total, unit="step", dynamic_ncols=True, file=self.stream)
            )
            self._showing.enter_context(logging_redirect_tqdm(tqdm_class=bar_class))
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._showing.close()  # log records go to their handlers again, then the bar closes

    def update(self, entry: dict[str, float]) -> None:
        """Show the step ``entry`` describes; an entry may repeat a step with new
        held-out numbers."""
        step = int(entry.get("step", self.done))
        fields = {
            "epoch": (max(step, 1) - 1) // self.steps_per_epoch + 1,
            "loss": f"{entry.get('loss', float('nan')):.4f}",
            "samples/s": f"{entry.get('samples_per_s', 0):.0f}",
        }
        if "val_accuracy" in entry:
            fields["val_acc"] = f"{entry['val_accuracy']:.3f}"
        if self.bar is not None:
            # the fields first: the bar draws them when it next redraws (update or close)
            self.bar.set_postfix(fields, refresh=False)
            self.bar.update(max(0, step - self.done))
        elif step != self.logged and (
            time.monotonic() - self.last_log >= self.log_every or step == self.total
        ):
            self.last_log, self.logged = time.monotonic(), step
            logger.info(
                "step %d/%d %s", step, self.total, " ".join(f"{k}={v}" for k, v in fields.items())
            )
        self.done = max(self.done, step)


def in_notebook() -> bool:
    """Whether this process is an IPython kernel (Jupyter, VS Code, Colab)."""
    return "ipykernel" in sys.modules


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def write_run(result: TrainResult, job: JobConfig, out: Path) -> Path:
    """Save model, history (CSV and JSON), the job config and curves.png into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    summary = job.summary()
    model_path = save_model(
        result.model,
        out,
        {
            "final_metrics": _plain(result.final_metrics),
            # so that `gradfleet evaluate` reloads the data and holds out the same rows
            "dataset": summary["dataset"],
            "validation_split": summary["validation_split"],
            "seed": job.seed,
            "loss": job.loss,
        },
    )
    (out / "config.json").write_text(json.dumps(job.summary(), indent=2) + "\n")
    (out / "history.json").write_text(
        json.dumps(
            {
                "steps": result.history,
                "evaluations": result.evaluations,
                "final_metrics": _plain(result.final_metrics),
                "wall_time": result.wall_time,
            },
            indent=2,
        )
        + "\n"
    )
    with open(out / "history.csv", "w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=["step", "loss", "rows", "samples_per_s", "wall_time"]
        )
        writer.writeheader()
        writer.writerows(result.history)
    try:
        figure = curves_figure(result.history, result.evaluations, job.name)
    except ImportError:
        logger.info("matplotlib is not installed: skipping curves.png (%s)", PLOT_EXTRA)
    else:
        _save(figure, out / "curves.png")
    return model_path


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}


def plot_run(run: Path, out: Path | None = None, log_loss: bool = False) -> Path:
    """Draw the curves of the run folder ``run`` (its history.json, as ``write_run``
    wrote it) into ``out`` (default ``run/curves.png``); returns the path written.

    Raises ValueError naming the folder when it holds no readable history, ImportError
    when matplotlib is not installed.
    """
    history, title = read_history(run)
    figure = curves_figure(history["steps"], history["evaluations"], title, log_loss)
    path = run / "curves.png" if out is None else out
    _save(figure, path)
    return path


def read_history(run: Path) -> tuple[dict[str, Any], str]:
    """(history, title) of a run folder: its history.json, and the job's name from its
    config.json (else the folder's name)."""
    source = run / "history.json"
    if not source.is_file():
        raise ValueError(f"{run} holds no history.json: give the --out folder of a training run")
    try:
        history = json.loads(source.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{source} is not a readable run history: {exc}") from None
    if not (
        isinstance(history, dict)
        and isinstance(history.get("steps"), list)
        and isinstance(history.get("evaluations", []), list)
    ):
        raise ValueError(f"{source} is not a run history (a 'steps' list is missing)")
    history.setdefault("evaluations", [])
    try:
        title = str(json.loads((run / "config.json").read_text())["name"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        title = run.resolve().name
    return history, title


def curves_figure(
    steps: list[dict[str, float]],
    evaluations: list[dict[str, float]],
    title: str,
    log_loss: bool = False,
) -> Figure:
    """Training and held-out loss on the left axis (log-scaled with ``log_loss``),
    held-out accuracy on the right one, fixed to 0..1 so runs compare at a glance.

    ``steps`` are a run's history entries (step, loss); ``evaluations`` its held-out
    scores (step, val_loss, val_accuracy). Raises ImportError without matplotlib.
    """
    from matplotlib.figure import Figure  # not pyplot: no global state, no GUI backend

    figure = Figure(figsize=(7, 4))
    loss_axis = figure.add_subplot()
    loss_axis.plot(
        [h["step"] for h in steps],
        [h["loss"] for h in steps],
        label="training loss",
        color="tab:blue",
        linewidth=1,
    )
    held_out_loss = [e for e in evaluations if "val_loss" in e]
    if held_out_loss:
        loss_axis.plot(
            [e["step"] for e in held_out_loss],
            [e["val_loss"] for e in held_out_loss],
            label="held-out loss",
            color="tab:green",
            marker="o",
        )
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if log_loss:
        loss_axis.set_yscale("log")
    lines, labels = loss_axis.get_legend_handles_labels()
    top_axis = loss_axis  # the legend goes on the axis drawn last, so no line hides it
    accuracy = [e for e in evaluations if "val_accuracy" in e]
    if accuracy:
        accuracy_axis = top_axis = loss_axis.twinx()
        accuracy_axis.plot(
            [e["step"] for e in accuracy],
            [e["val_accuracy"] for e in accuracy],
            label="held-out accuracy",
            color="tab:orange",
            marker="o",
        )
        accuracy_axis.set_ylim(0, 1)
        accuracy_axis.set_ylabel("held-out accuracy")
        more_lines, more_labels = accuracy_axis.get_legend_handles_labels()
        lines, labels = lines + more_lines, labels + more_labels
    # one legend for both axes, where falling loss and rising accuracy leave room
    top_axis.legend(lines, labels, loc="center right")
    loss_axis.set_title(title)
    figure.tight_layout()
    return figure


def _save(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)

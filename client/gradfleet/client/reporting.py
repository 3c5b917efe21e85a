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
from typing import TYPE_CHECKING, TextIO

from gradfleet.client.model_files import save_model
from gradfleet.worker.config import JobConfig
from gradfleet.worker.result import TrainResult

if TYPE_CHECKING:
    from tqdm import tqdm

logger = logging.getLogger(__name__)


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
    _plot(result, out / "curves.png")
    return model_path


def _plain(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, int | float | str)}


def _plot(result: TrainResult, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.info(
            "matplotlib is not installed: skipping %s (pip install 'gradfleet[plot]')", path.name
        )
        return
    fig, loss_axis = plt.subplots(figsize=(7, 4))
    loss_axis.plot(
        [h["step"] for h in result.history],
        [h["loss"] for h in result.history],
        label="training loss",
        color="tab:blue",
    )
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    if result.evaluations:
        acc_axis = loss_axis.twinx()
        acc_axis.plot(
            [e["step"] for e in result.evaluations],
            [e.get("val_accuracy", float("nan")) for e in result.evaluations],
            label="held-out accuracy",
            color="tab:orange",
            marker="o",
        )
        acc_axis.set_ylabel("held-out accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

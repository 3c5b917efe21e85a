"""What the user sees during and after a run: a progress bar and the run's output folder."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from types import TracebackType

from tqdm import tqdm

from gradfleet.client.model_files import save_model
from gradfleet.worker.config import JobConfig
from gradfleet.worker.result import TrainResult

logger = logging.getLogger(__name__)


class ProgressReporter:
    """A tqdm bar on a terminal; periodic log lines when stderr is not one."""

    def __init__(
        self, total_steps: int, steps_per_epoch: int, enabled: bool = True, log_every: float = 5.0
    ) -> None:
        self.total, self.steps_per_epoch = total_steps, max(1, steps_per_epoch)
        self.use_bar = enabled and sys.stderr.isatty()
        self.log_every, self.last_log = log_every, 0.0
        self.bar: tqdm | None = None
        self.done = 0

    def __enter__(self) -> ProgressReporter:
        if self.use_bar:
            self.bar = tqdm(total=self.total, unit="step", dynamic_ncols=True, file=sys.stderr)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.close()

    def update(self, entry: dict[str, float]) -> None:
        step = int(entry.get("step", self.done))
        if step == self.done and step:
            return  # nothing new since the last call
        fields = {
            "epoch": (step - 1) // self.steps_per_epoch + 1,
            "loss": f"{entry.get('loss', float('nan')):.4f}",
            "samples/s": f"{entry.get('samples_per_s', 0):.0f}",
        }
        if "val_accuracy" in entry:
            fields["val_acc"] = f"{entry['val_accuracy']:.3f}"
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(fields, refresh=False)
        elif time.monotonic() - self.last_log >= self.log_every or step == self.total:
            self.last_log = time.monotonic()
            logger.info(
                "step %d/%d %s", step, self.total, " ".join(f"{k}={v}" for k, v in fields.items())
            )
        self.done = step


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

"""JobConfig validation and TOML loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset, load_dataset


def small_data(classes: int = 3, rows: int = 60, features: int = 4) -> ArrayDataset:
    rng = np.random.default_rng(0)
    return ArrayDataset(
        rng.standard_normal((rows, features)), rng.integers(0, classes, rows), validation_split=0.2
    )


def test_valid_job_knows_its_steps() -> None:
    job = JobConfig(
        model=nn.MLP([4, 8, 3]), dataset=small_data(), batch_size=8, epochs=2, workers=2
    )

    assert job.rows_per_worker == 4
    assert job.shard_size == 24
    assert job.total_steps == 2 * (24 // 4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"batch_size": 9, "workers": 2}, "not divisible by workers"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"optimizer": {"name": "rmsprop", "lr": 0.1}}, "unknown optimizer"),
        ({"optimizer": {"name": "sgd", "lr": float("nan")}}, "learning rate"),
        ({"model": {"type": "MLP", "sizes": [5, 8, 3]}}, "features but the model's input size"),
        ({"model": {"type": "MLP", "sizes": [4, 8, 2]}}, "not a class index 0..1"),
        ({"mode": "eventually"}, "mode must be"),
        ({"backup_workers": 2, "workers": 2}, "backup_workers"),
        ({"loss": "hinge"}, "unknown loss"),
        ({"epochs": None}, "exactly one of epochs or steps"),
        ({"steps": 3}, "exactly one of epochs or steps"),
        ({"batch_size": 64}, "only 48"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"seed": 2**63}, "seed must be at most"),
        ({"epochs": None, "steps": 2**63}, "steps must be a positive integer"),
        ({"staleness_bound": 2**31}, "staleness_bound must be at most"),
        ({"checkpoint_every": 2**31}, "checkpoint_every must be at most"),
        ({"model": 5}, "model must be an MLP or its spec"),
        ({"model": "abc"}, "model must be an MLP or its spec"),
        ({"dtype": 5}, "dtype must be 'float32' or 'float64'"),
        ({"loss": "mse"}, "needs targets of shape \\(rows, 3\\)"),
        ({"model": {"type": "MLP", "sizes": [4, 8, 3], "seed": 1e400}}, "model spec is invalid"),
    ],
)
def test_wrong_values_raise_one_clear_sentence(changes: dict, message: str) -> None:
    settings = {"model": nn.MLP([4, 8, 3]), "dataset": small_data(), "batch_size": 8, "epochs": 1}
    settings.update(changes)

    with pytest.raises(ValueError, match=message):
        JobConfig(**settings)


def test_toml_round_trip_with_overrides(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text(
        'name = "iris"\ndataset = "iris"\nbatch_size = 12\nepochs = 3\nworkers = 2\n'
        '[model]\nsizes = [4, 16, 3]\nactivation = "tanh"\n'
        '[optimizer]\nname = "adam"\nlr = 0.01\n'
    )

    job = JobConfig.from_toml(config, workers=3)

    assert job.workers == 3
    assert job.model_spec["activation"] == "tanh"
    assert job.optimizer == {"name": "adam", "lr": 0.01}


def test_toml_unknown_key_is_named(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('dataset = "iris"\nepochs = 1\nlearning_rate = 3\n[model]\nsizes = [4, 3]\n')

    with pytest.raises(ValueError, match="learning_rate"):
        JobConfig.from_toml(config)


def test_progress_reports_the_current_step_with_the_latest_held_out_numbers() -> None:
    from gradfleet.worker.local import train_local

    job = JobConfig(
        model=nn.MLP([4, 8, 3]), dataset=small_data(), batch_size=8, steps=6, eval_every=4
    )
    seen: list[dict[str, float]] = []

    train_local(job, progress=seen.append)

    assert [entry["step"] for entry in seen] == [1, 2, 3, 4, 5, 6]
    assert "val_accuracy" not in seen[2] and "val_accuracy" in seen[5]


@pytest.mark.parametrize(
    ("source", "options", "message"),
    [
        ("digits", {"label_column": 0}, "unknown option"),
        ("table.csv", {"labelcolumn": 0}, "unknown option"),
        ("table.csv", {"label_column": 3}, "outside its 3 columns"),
        ("table.csv", {"label_column": -4}, "outside its 3 columns"),
    ],
)
def test_dataset_options_that_would_be_ignored_or_wrapped_are_refused(
    tmp_path: Path, source: str, options: dict, message: str
) -> None:
    table = tmp_path / "table.csv"
    table.write_text("".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    path = str(table) if source == "table.csv" else source

    with pytest.raises(ValueError, match=message):
        load_dataset(path, **options)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_one_output_models_take_one_target_per_row(loss: str) -> None:
    data = small_data(classes=2)

    job = JobConfig(model=nn.MLP([4, 8, 1]), dataset=data, loss=loss, batch_size=8, epochs=1)

    assert job.dataset.y.ndim == 1

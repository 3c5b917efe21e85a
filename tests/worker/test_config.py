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
        ({"batch_size": 9, "workers": 2}, "not divisible by workers 2.*try batch_size 8 or 10"),
        ({"workers": 0}, "workers must be at least 1"),
        ({"optimizer": {"name": "rmsprop", "lr": 0.1}}, "unknown optimizer"),
        ({"optimizer": {"name": "sgd", "lr": float("nan")}}, "learning rate"),
        ({"model": {"type": "MLP", "sizes": [5, 8, 3]}}, "features but the model's input size"),
        ({"model": {"type": "MLP", "sizes": [4, 8, 2]}}, "3 classes but the model has 2 outputs"),
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
    settings.update({"workers": 1} | changes)

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


def test_construction_reads_no_file_and_changes_no_caller_object(tmp_path: Path) -> None:
    # prepare: float64 features and float labels, for a float32 classifier
    data = small_data()
    data.y = data.y.astype(np.float64)
    x_before, y_before = data.x, data.y
    missing = tmp_path / "not-there.csv"
    # execute
    job = JobConfig(model=nn.MLP([4, 8, 3]), dataset=data, batch_size=8, epochs=1)
    by_path = JobConfig(model=nn.MLP([4, 8, 3]), dataset=str(missing), batch_size=8, epochs=1)
    # assert: the caller's dataset is untouched; the job holds converted copies
    assert data.x is x_before and data.y is y_before and data.y.dtype == np.float64
    assert job.dataset.x.dtype == np.float32 and job.dataset.y.dtype == np.int64
    assert not by_path.loaded
    with pytest.raises(ValueError, match=r"not-there\.csv"):
        by_path.resolve()


def test_arrays_scikit_learn_style_with_a_held_out_part_from_the_jobs_seed() -> None:
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((100, 4)), np.arange(100) % 3

    job = JobConfig(model={"sizes": [4, 8, 3]}, dataset=(x, y), batch_size=8, epochs=1, seed=5)
    again = JobConfig(model={"sizes": [4, 8, 3]}, dataset=(x, y), batch_size=8, epochs=1, seed=5)
    explicit = JobConfig(
        model={"sizes": [4, 8, 3]}, dataset=(x[:80], y[:80], x[80:], y[80:]), batch_size=8, epochs=1
    )

    assert job.dataset.num_rows == 80 and len(job.dataset.x_val) == 20
    np.testing.assert_array_equal(job.dataset.y_val, again.dataset.y_val)
    assert sorted(job.dataset.y_val.tolist()) != sorted(y[80:].tolist())  # shuffled first
    np.testing.assert_array_equal(explicit.dataset.y_val, y[80:])
    assert "array(" not in repr(job) and len(repr(job.dataset)) < 120


@pytest.mark.parametrize(
    ("dataset", "message"),
    [((np.zeros((4, 4)),), "got a tuple of 1 items"), (np.zeros((4, 4)), "got a ndarray")],
)
def test_wrong_datasets_are_named_without_their_values(dataset: object, message: str) -> None:
    with pytest.raises(ValueError, match=message) as err:
        JobConfig(model={"sizes": [4, 3]}, dataset=dataset, batch_size=8, epochs=1)

    assert "[[" not in str(err.value) and "\n" not in str(err.value)


def test_optimizer_by_name_and_names_in_any_case() -> None:
    job = JobConfig(model={"sizes": [4, 3]}, dataset=small_data(), batch_size=8, epochs=1,
                    optimizer="Adam")  # fmt: skip
    table = JobConfig(model={"sizes": [4, 3]}, dataset=small_data(), batch_size=8, epochs=1,
                      optimizer={"name": "SGD", "lr": 0.5})  # fmt: skip

    assert job.optimizer == {"name": "adam", "lr": 0.001}
    assert table.optimizer == {"name": "sgd", "lr": 0.5}


def test_a_mistyped_key_in_a_job_file_gets_a_suggestion(tmp_path: Path) -> None:
    config = tmp_path / "job.toml"
    config.write_text('dataset = "iris"\nepochs = 1\nbatchsize = 8\n[model]\nsizes = [4, 3]\n')

    with pytest.raises(ValueError, match="unknown key 'batchsize'; did you mean 'batch_size'"):
        JobConfig.from_toml(config)

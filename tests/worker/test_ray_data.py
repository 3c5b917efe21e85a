"""Ray Data as a source: sharded on the cluster, same numbers as the same rows in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import ArrayDataset, load_dataset
from gradfleet.worker.ray_data import RayDataset
from gradfleet.worker.ray_runner import init_ray

pytestmark = [pytest.mark.ray, pytest.mark.integration]


@pytest.fixture(scope="module", autouse=True)
def ray_instance() -> Iterator[None]:
    init_ray(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def as_frame(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(x.shape[1])])
    frame["label"] = y
    return frame


def test_ray_data_source_trains_like_the_same_rows_in_memory() -> None:
    digits = load_dataset("digits")
    x, y = digits.x[:600], digits.y[:600]
    validation = ArrayDataset(digits.x_val, digits.y_val)
    source = RayDataset(ray.data.from_pandas(as_frame(x, y)).repartition(7), validation=validation)
    settings = {
        "model": nn.MLP([64, 16, 10], seed=2, dtype="float64"),
        "optimizer": {"name": "sgd", "lr": 0.1},
        "batch_size": 20,
        "steps": 25,
        "workers": 2,
    }

    distributed = train(JobConfig(dataset=source, **settings), backend="ray")
    in_memory = train(
        JobConfig(dataset=ArrayDataset(x, y, digits.x_val, digits.y_val), **settings),
        backend="local",
    )

    np.testing.assert_allclose(distributed.model.flat, in_memory.model.flat, rtol=1e-12)
    assert distributed.final_metrics["val_accuracy"] == in_memory.final_metrics["val_accuracy"]


def test_labels_outside_the_model_are_rejected_before_training() -> None:
    frame = as_frame(np.zeros((40, 3)), np.arange(40) % 5)
    source = RayDataset(ray.data.from_pandas(frame))

    with pytest.raises(ValueError, match="5 classes but the model has 3 outputs"):
        JobConfig(model=nn.MLP([3, 3]), dataset=source, batch_size=4, steps=1)


def test_fractional_labels_are_refused_where_the_shard_is_read() -> None:
    frame = as_frame(np.zeros((8, 3)), np.array([0, 0.6, 1, 1, 0, 1, 0, 1]))
    shard = RayDataset(ray.data.from_pandas(frame)).shards(1)[0]

    with pytest.raises(ValueError, match=r"row 1 of this shard is 0\.6, not a class index"):
        shard.arrays()


def test_a_missing_label_column_is_named() -> None:
    frame = as_frame(np.zeros((4, 2)), np.zeros(4)).rename(columns={"label": "target"})

    with pytest.raises(ValueError, match="no label column 'label'"):
        RayDataset(ray.data.from_pandas(frame))


def test_feature_count_must_match_the_model() -> None:
    source = RayDataset(ray.data.from_pandas(as_frame(np.zeros((8, 5)), np.zeros(8))))

    with pytest.raises(ValueError, match="5 features but the model's input size is 4"):
        JobConfig(model=nn.MLP([4, 2]), dataset=source, batch_size=4, steps=1)


def test_a_ray_data_readable_path_is_read_on_the_cluster(tmp_path: Path) -> None:
    frame = as_frame(np.arange(30, dtype=float).reshape(10, 3), np.arange(10) % 2)
    frame.to_csv(tmp_path / "rows.csv", index=False)

    source = RayDataset.read(tmp_path / "rows.csv")
    ((x, y),) = [shard.arrays() for shard in source.shards(1)]

    assert source.num_rows == 10 and source.num_features == 3
    np.testing.assert_array_equal(x, frame[["f0", "f1", "f2"]].to_numpy(dtype=np.float32))
    np.testing.assert_array_equal(y, frame["label"].to_numpy())

"""Saved models: they load back exactly, and a damaged description is one ValueError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradfleet.client import JobConfig, train
from gradfleet.client.cli import main
from gradfleet.client.model_files import load_model, save_model
from gradfleet.client.reporting import write_run
from gradfleet.nn import MLP
from gradfleet.worker.datasets import load_dataset


def test_a_saved_model_predicts_the_same_after_loading(tmp_path: Path) -> None:
    stats = {"mean": [1.0, 2.0, 3.0], "std": [0.5, 1.0, 2.0]}
    model = MLP([3, 4, 2], seed=5, dtype="float32", preprocessing=stats)
    save_model(model, tmp_path)
    rows = np.random.default_rng(0).standard_normal((6, 3))

    loaded = load_model(tmp_path)

    np.testing.assert_array_equal(loaded.logits(rows), model.logits(rows))
    np.testing.assert_array_equal(loaded.predict(rows), model.predict(rows))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"sizes": 5}, "needs 'sizes', a list of integers"),
        ({"sizes": [3, 4, 2], "dtype": "foo"}, "the model spec is invalid"),
        ({"sizes": [3, 4, 2], "seed": None}, "the model spec is invalid"),
        ({"sizes": [3, 4, 2], "activation": "leaky_relu", "alpha": "x"}, "spec is invalid"),
        ({"sizes": [20000, 20000]}, "does not describe the 26 stored weights"),
    ],
)
def test_a_damaged_model_description_is_one_value_error(
    tmp_path: Path, spec: dict, message: str
) -> None:
    save_model(MLP([3, 4, 2], seed=0), tmp_path)
    meta = json.loads((tmp_path / "model.json").read_text())
    (tmp_path / "model.json").write_text(json.dumps(meta | {"spec": {"type": "MLP", **spec}}))

    with pytest.raises(ValueError, match=message):
        load_model(tmp_path)


def test_evaluate_holds_out_the_rows_training_held_out(tmp_path: Path, capsys) -> None:
    # prepare: train on digits with a 10 % held-out part (not the default 20 %)
    job = JobConfig(
        model=MLP([64, 16, 10], seed=0),
        dataset=load_dataset("digits", validation_split=0.1),
        batch_size=32,
        steps=30,
    )
    result = train(job, backend="local")
    write_run(result, job, tmp_path)
    # execute
    code = main(["evaluate", str(tmp_path), "--data", "digits"])
    # assert: the accuracy is that of training's own held-out rows
    printed = dict(item.split("=") for item in capsys.readouterr().out.split())
    assert code == 0
    assert float(printed["val_accuracy"]) == pytest.approx(
        result.final_metrics["val_accuracy"], abs=1e-4
    )

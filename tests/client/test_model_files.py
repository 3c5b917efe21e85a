"""Saved models: they load back exactly, and a damaged description is one ValueError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gradfleet.client.model_files import load_model, load_model_and_preprocessing, save_model
from gradfleet.nn import MLP


def test_a_saved_model_predicts_the_same_after_loading(tmp_path: Path) -> None:
    model = MLP([3, 4, 2], seed=5, dtype="float32")
    stats = {"mean": np.array([1.0, 2.0, 3.0]), "std": np.array([0.5, 1.0, 2.0])}
    save_model(model, tmp_path, preprocessing=stats)
    rows = np.random.default_rng(0).standard_normal((6, 3))

    loaded, preprocess = load_model_and_preprocessing(tmp_path)

    np.testing.assert_array_equal(
        loaded.predict(preprocess(rows).astype(np.float32)),
        model.predict(((rows - stats["mean"]) / stats["std"]).astype(np.float32)),
    )


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

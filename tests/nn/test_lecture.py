"""The lecture notes' worked example (DESIGN.md): it must hold in the core exactly."""

from __future__ import annotations

import io

import numpy as np

from gradfleet.nn import Tensor, explain


def lecture_graph() -> tuple[list[Tensor], dict[str, Tensor]]:
    """y = x1² + 3·(x2·x3 − x1²) at (1, 2, 3), written as z1 = x1**2; y = z1 + 3*(x2*x3 - z1)."""
    x1, x2, x3 = (
        Tensor(np.float64(value), requires_grad=True, name=f"x{i}")
        for i, value in enumerate((1.0, 2.0, 3.0), start=1)
    )
    z1 = x1**2
    z2 = x2 * x3
    z3 = z2 - z1
    z4 = 3 * z3
    y = z1 + z4
    return [x1, x2, x3], {"z1": z1, "z2": z2, "z3": z3, "z4": z4, "y": y}


def table_rows(text: str) -> dict[str, list[str]]:
    """explain()'s table as {node name: [formula words..., forward value, derivative]}."""
    rows = {}
    for line in text.splitlines()[1:]:
        cells = line.split()
        rows[cells[0]] = cells[1:]
    return rows


def test_forward_values_are_exact() -> None:
    # prepare / execute
    _, nodes = lecture_graph()

    # assert
    values = {name: node.item() for name, node in nodes.items()}
    assert values == {"z1": 1.0, "z2": 6.0, "z3": 5.0, "z4": 15.0, "y": 16.0}


def test_backward_gives_exact_input_derivatives() -> None:
    # prepare
    inputs, nodes = lecture_graph()

    # execute
    nodes["y"].backward()

    # assert
    assert [x.grad.item() for x in inputs] == [-4.0, 9.0, 6.0]


def test_explain_shows_every_node_with_value_and_derivative() -> None:
    # prepare
    _, nodes = lecture_graph()
    out = io.StringIO()

    # execute
    returned = explain(nodes["y"], file=out)

    # assert
    text = out.getvalue()
    assert returned == text
    rows = table_rows(text)
    # node: (forward value, dy/d(node)), as in the lecture's forward and backward tables
    expected = {
        "x1": ("1", "-4"),
        "x2": ("2", "9"),
        "x3": ("3", "6"),
        "z1": ("1", "-2"),
        "z2": ("6", "3"),
        "z3": ("5", "3"),
        "z4": ("15", "1"),
        "y": ("16", "1"),
    }
    assert {name: (cells[-2], cells[-1]) for name, cells in rows.items()} == expected


def test_explain_lists_nodes_in_topological_order_with_their_formulas() -> None:
    # prepare
    _, nodes = lecture_graph()

    # execute
    text = explain(nodes["y"], file=None)

    # assert
    rows = table_rows(text)
    assert list(rows) == ["x1", "x2", "x3", "z1", "z2", "z3", "z4", "y"]
    formulas = {name: " ".join(cells[:-2]) for name, cells in rows.items()}
    assert formulas["z1"] == "x1 ** 2"
    assert formulas["z2"] == "x2 * x3"
    assert formulas["z3"] == "z2 - z1"
    assert formulas["z4"] == "3 * z3"
    assert formulas["y"] == "z1 + z4"


def test_explain_leaves_the_graph_usable_for_backward() -> None:
    # prepare
    inputs, nodes = lecture_graph()
    explain(nodes["y"], file=io.StringIO())

    # execute
    nodes["y"].backward()

    # assert
    assert [x.grad.item() for x in inputs] == [-4.0, 9.0, 6.0]


def test_explain_numbers_unnamed_inputs_in_creation_order() -> None:
    # prepare
    a, b = Tensor(2.0, requires_grad=True), Tensor(5.0, requires_grad=True)
    y = a * b + a

    # execute
    rows = table_rows(explain(y, file=None))

    # assert: dy/da = b + 1, dy/db = a
    assert {name: (cells[-2], cells[-1]) for name, cells in rows.items()} == {
        "x1": ("2", "6"),
        "x2": ("5", "2"),
        "z1": ("10", "1"),
        "y": ("12", "1"),
    }

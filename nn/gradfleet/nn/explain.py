"""A forward/backward table of a small graph, node by node, as in the lecture notes."""

from __future__ import annotations

import sys
from typing import TextIO

import numpy as np

from gradfleet.nn.tensor import Tensor, gradients


def _format(value: np.ndarray) -> str:
    if value.size == 1:
        return f"{value.item():.6g}"
    return np.array2string(value, precision=4, threshold=8, separator=", ")


def explain(output: Tensor, file: TextIO | None = None, output_name: str = "y") -> str:
    """Print (to ``file``, default stdout) and return each node's value and d(output)/d(node).

    Inputs keep their ``name`` (x1, x2, ...); intermediate nodes are named z1, z2, ... in
    the order they were computed; constants are shown inline. The graph is left intact.
    """
    grads = gradients(output)
    nodes = sorted(output.topological_order(), key=lambda n: n._id)
    names: dict[int, str] = {}
    inputs = intermediates = 0
    for node in nodes:
        if node is output:
            names[id(node)] = output.name or output_name
        elif node.is_leaf and node.requires_grad:
            inputs += 1
            names[id(node)] = node.name or f"x{inputs}"
        elif not node.is_leaf:
            intermediates += 1
            names[id(node)] = node.name or f"z{intermediates}"

    def label(node: Tensor) -> str:
        return names.get(id(node), _format(node.data))

    rows = [("node", "computed as", "forward value", f"d{label(output)}/d(node)")]
    for node in nodes:
        if id(node) not in names:
            continue
        if node.is_leaf:
            formula = "input"
        elif len(node._parents) == 2:
            formula = f"{label(node._parents[0])} {node.op} {label(node._parents[1])}"
        else:
            formula = f"{node.op}({', '.join(label(p) for p in node._parents)})"
        grad = grads.get(id(node))
        rows.append(
            (label(node), formula, _format(node.data), "0" if grad is None else _format(grad))
        )
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    text = "\n".join(lines) + "\n"
    (file or sys.stdout).write(text)
    return text

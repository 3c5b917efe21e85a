"""gradfleet.nn: a NumPy reverse-mode autodiff core and the MLP it trains.

No I/O and no networking: only NumPy. See DESIGN.md, "The NumPy core".
"""

from gradfleet.nn import ops
from gradfleet.nn.explain import explain
from gradfleet.nn.gradcheck import GradcheckError, gradcheck
from gradfleet.nn.layers import GELU, LeakyReLU, Linear, Module, ReLU, Sequential, Sigmoid, Tanh
from gradfleet.nn.losses import binary_cross_entropy_with_logits, cross_entropy, mse_loss
from gradfleet.nn.mlp import MLP
from gradfleet.nn.ops import (
    clip,
    exp,
    gelu,
    leaky_relu,
    log,
    log_softmax,
    maximum,
    relu,
    sigmoid,
    softmax,
    sqrt,
    tanh,
)
from gradfleet.nn.optim import SGD, Adam, AdamW, Optimizer, make_optimizer, make_schedule
from gradfleet.nn.tensor import Tensor, no_grad

__all__ = [
    "GELU",
    "MLP",
    "SGD",
    "Adam",
    "AdamW",
    "GradcheckError",
    "LeakyReLU",
    "Linear",
    "Module",
    "Optimizer",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "Tensor",
    "binary_cross_entropy_with_logits",
    "clip",
    "cross_entropy",
    "exp",
    "explain",
    "gelu",
    "gradcheck",
    "leaky_relu",
    "log",
    "log_softmax",
    "make_optimizer",
    "make_schedule",
    "maximum",
    "mse_loss",
    "no_grad",
    "ops",
    "relu",
    "sigmoid",
    "softmax",
    "sqrt",
    "tanh",
]

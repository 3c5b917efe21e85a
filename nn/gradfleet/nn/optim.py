"""Optimisers and learning-rate schedules on named arrays.

``step(params, grads)`` updates ``params`` in place (they may be views into one
contiguous buffer). The parameter server and local mode run this same code, so both
produce the same numbers. State is a flat dict of arrays, so it fits an ``.npz``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np

Arrays = dict[str, np.ndarray]


def _finite_number(name: str, value: Any, low: float = 0.0, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= float(value) <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")
    return float(value)


class Schedule:
    """Learning-rate multiplier as a function of the step (0-based)."""

    name = "constant"

    def factor(self, step: int) -> float:
        return 1.0

    def config(self) -> dict[str, Any]:
        return {"name": self.name}


class StepSchedule(Schedule):
    """Multiply by ``gamma`` every ``step_size`` steps."""

    name = "step"

    def __init__(self, step_size: int, gamma: float = 0.1) -> None:
        if not isinstance(step_size, int) or step_size < 1:
            raise ValueError(
                f"step schedule step_size must be a positive integer, got {step_size!r}"
            )
        self.step_size, self.gamma = step_size, _finite_number("step schedule gamma", gamma)

    def factor(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "step_size": self.step_size, "gamma": self.gamma}


class CosineSchedule(Schedule):
    """Linear warm-up for ``warmup_steps``, then cosine decay to ``min_factor`` at the end."""

    name = "cosine"

    def __init__(self, total_steps: int, warmup_steps: int = 0, min_factor: float = 0.0) -> None:
        if not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(
                f"cosine schedule total_steps must be a positive integer, got {total_steps!r}"
            )
        if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
            raise ValueError(
                "cosine schedule warmup_steps must be an integer in [0, total_steps), "
                f"got {warmup_steps!r}"
            )
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.min_factor = _finite_number("cosine schedule min_factor", min_factor, 0.0, 1.0)

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / (self.total_steps - self.warmup_steps))
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "min_factor": self.min_factor,
        }


class WarmupSchedule(Schedule):
    """Linear warm-up from 1/warmup_steps to 1 over ``warmup_steps``, then constant."""

    name = "linear_warmup"

    def __init__(self, warmup_steps: int) -> None:
        if not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(
                f"linear_warmup warmup_steps must be a positive integer, got {warmup_steps!r}"
            )
        self.warmup_steps = warmup_steps

    def factor(self, step: int) -> float:
        return min(1.0, (step + 1) / self.warmup_steps)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "warmup_steps": self.warmup_steps}


SCHEDULES: dict[str, type[Schedule]] = {
    "constant": Schedule,
    "step": StepSchedule,
    "cosine": CosineSchedule,
    "linear_warmup": WarmupSchedule,
}


def make_schedule(config: dict[str, Any] | None) -> Schedule:
    config = dict(config or {"name": "constant"})
    name = config.pop("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}: choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**config)
    except TypeError as exc:
        raise ValueError(f"bad settings for schedule {name!r}: {exc}") from None


class Optimizer:
    """Base: checks arguments, keeps the step count, applies the schedule to ``lr``."""

    name = ""
    buffer_kinds: tuple[str, ...] = ()

    def __init__(self, lr: float, schedule: Schedule | None = None) -> None:
        self.lr = _finite_number("learning rate", lr)
        if self.lr <= 0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        self.schedule = schedule or Schedule()
        self.steps = 0
        self.buffers: Arrays = {}
        self._scratch: Arrays = {}

    def current_lr(self) -> float:
        return self.lr * self.schedule.factor(self.steps)

    def step(self, params: Arrays, grads: Arrays) -> None:
        """Apply one update to ``params`` in place from the (already averaged) ``grads``."""
        if params.keys() != grads.keys():
            raise ValueError(
                f"gradients must name the same parameters: expected {sorted(params)}, "
                f"got {sorted(grads)}"
            )
        for name, p in params.items():
            if grads[name].shape != p.shape:
                raise ValueError(
                    f"gradient {name!r}: expected shape {p.shape}, got {grads[name].shape}"
                )
        lr = self.current_lr()
        self.steps += 1
        for name, p in params.items():
            self._update(name, p, grads[name], lr)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        raise NotImplementedError

    # elements per pass of `_subtract_scaled`: at 10M parameters blocks save a quarter of
    # the time, below 1M one pass is as fast (benchmarks/bench_server_step.py)
    _BLOCK = 1 << 19

    def _subtract_scaled(self, name: str, p: np.ndarray, g: np.ndarray, factor: float) -> None:
        """``p -= factor * g`` through a kept scratch, block by block for big parameters:
        the same numbers, without a model-sized temporary (memory, page faults) per step."""
        if p.size <= self._BLOCK or not p.flags.c_contiguous:
            out = self._scratch.get(name)
            if out is None or out.shape != g.shape or out.dtype != g.dtype:
                out = self._scratch[name] = np.empty_like(g)
            p -= np.multiply(g, factor, out=out)
            return
        flat_p, flat_g = p.reshape(-1), g.reshape(-1)
        block = self._scratch.get(g.dtype.str)
        if block is None:
            block = self._scratch[g.dtype.str] = np.empty(self._BLOCK, dtype=g.dtype)
        for lo in range(0, flat_p.size, self._BLOCK):
            part = np.multiply(flat_g[lo : lo + self._BLOCK], factor, out=block[: flat_p.size - lo])
            np.subtract(flat_p[lo : lo + self._BLOCK], part, out=flat_p[lo : lo + self._BLOCK])

    def _buffer(self, key: str, like: np.ndarray) -> np.ndarray:
        if key not in self.buffers:
            self.buffers[key] = np.zeros_like(like)
        return self.buffers[key]

    def state_dict(self) -> Arrays:
        return {"steps": np.asarray(self.steps, dtype=np.int64)} | {
            k: v.copy() for k, v in self.buffers.items()
        }

    def load_state_dict(self, state: Arrays, params: Arrays | None = None) -> None:
        """Restore ``state_dict()``; with ``params``, every buffer must match its parameter's
        shape and dtype, and a state with buffers must hold every kind for every parameter
        (as any state after one step does). Nothing changes unless all entries are valid."""
        if "steps" not in state:
            raise ValueError("optimiser state needs a 'steps' entry")
        steps = np.asarray(state["steps"])
        if steps.shape != () or steps.dtype.kind not in "iu" or int(steps) < 0:
            raise ValueError(f"optimiser 'steps' must be a non-negative integer, got {steps!r}")
        buffers = {}
        for key, value in state.items():
            if key == "steps":
                continue
            kind, _, name = key.partition("/")
            if kind not in self.buffer_kinds:
                raise ValueError(
                    f"optimiser state entry {key!r} is not a {self.name} buffer "
                    f"(expected names like {self.buffer_kinds[0]}/<parameter>)"
                )
            array = np.array(value)
            if params is not None:
                if name not in params:
                    raise ValueError(f"optimiser state {key!r} names no parameter of the model")
                expected = params[name]
                if array.shape != expected.shape or array.dtype != expected.dtype:
                    raise ValueError(
                        f"optimiser state {key!r}: expected {expected.dtype} {expected.shape}, "
                        f"got {array.dtype} {array.shape}"
                    )
            if not np.all(np.isfinite(array)):
                raise ValueError(f"optimiser state {key!r} contains NaN or Inf values")
            buffers[key] = array
        if params is not None and buffers:
            missing = [
                f"{kind}/{name}"
                for kind in self.buffer_kinds
                for name in params
                if f"{kind}/{name}" not in buffers
            ]
            if missing:
                raise ValueError(
                    f"optimiser state is partial: it lacks {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}"
                )
        self.steps, self.buffers = int(steps), buffers

    def config(self) -> dict[str, Any]:
        raise NotImplementedError


class SGD(Optimizer):
    """v ← μ v + (g + λ p); p ← p − η v  (Nesterov: p ← p − η (g + λ p + μ v)); μ=0 is plain GD."""

    name = "sgd"
    buffer_kinds = ("momentum",)

    def __init__(
        self,
        lr: float,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(lr, schedule)
        self.momentum = _finite_number("momentum", momentum, 0.0, 1.0)
        self.weight_decay = _finite_number("weight_decay", weight_decay)
        if nesterov and self.momentum == 0:
            raise ValueError("nesterov needs a momentum above 0")
        self.nesterov = bool(nesterov)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        if self.weight_decay:
            g = g + self.weight_decay * p
        if self.momentum:
            v = self._buffer("momentum/" + name, p)
            v *= self.momentum
            v += g
            g = g + self.momentum * v if self.nesterov else v
        self._subtract_scaled(name, p, g, lr)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule.config(),
        }


class Adam(Optimizer):
    """m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²; p ← p − η m̂ / (√v̂ + ε), with bias correction.

    ``weight_decay`` here is L2 added to the gradient; AdamW decouples it.
    """

    name = "adam"
    buffer_kinds = ("m", "v")

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] | list[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        schedule: Schedule | None = None,
    ) -> None:
        super().__init__(lr, schedule)
        if len(betas) != 2:
            raise ValueError(f"betas must be two numbers, got {betas!r}")
        self.beta1 = _finite_number("beta1", betas[0], 0.0, 1.0 - 1e-12)
        self.beta2 = _finite_number("beta2", betas[1], 0.0, 1.0 - 1e-12)
        self.eps = _finite_number("eps", eps)
        self.weight_decay = _finite_number("weight_decay", weight_decay)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float) -> None:
        if self.weight_decay and self.name == "adam":
            g = g + self.weight_decay * p
        m = self._buffer("m/" + name, p)
        v = self._buffer("v/" + name, p)
        m *= self.beta1
        m += (1 - self.beta1) * g
        v *= self.beta2
        v += (1 - self.beta2) * (g * g)
        t = self.steps  # already counts this step
        m_hat = m / (1 - self.beta1**t)
        v_hat = v / (1 - self.beta2**t)
        if self.weight_decay and self.name == "adamw":
            p -= (lr * self.weight_decay) * p
        p -= lr * m_hat / (np.sqrt(v_hat) + self.eps)

    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lr": self.lr,
            "betas": [self.beta1, self.beta2],
            "eps": self.eps,
            "weight_decay": self.weight_decay,
            "schedule": self.schedule.config(),
        }


class AdamW(Adam):
    """Adam with decoupled weight decay: p ← p − η λ p, then the Adam step."""

    name = "adamw"

    def __init__(self, lr: float = 1e-3, weight_decay: float = 0.01, **kwargs: Any) -> None:
        super().__init__(lr, weight_decay=weight_decay, **kwargs)


OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(config: dict[str, Any]) -> Optimizer:
    """Build an optimiser from JSON-like settings, e.g. {"name": "sgd", "lr": 0.1}."""
    if not isinstance(config, dict):
        raise ValueError(f"optimizer settings must be a table/dict, got {config!r}")
    settings = dict(config)
    name = settings.pop("name", None)
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: choose one of {sorted(OPTIMIZERS)}")
    if "lr" not in settings:
        raise ValueError(f"optimizer {name!r} needs a learning rate 'lr'")
    schedule = make_schedule(settings.pop("schedule", None))
    try:
        return OPTIMIZERS[name](schedule=schedule, **settings)
    except TypeError as exc:
        raise ValueError(f"bad settings for optimizer {name!r}: {exc}") from None

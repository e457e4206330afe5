"""The time-budgeted epoch loop that ``train`` (the U-Net) and ``train_boxes`` (its box head)
share: seeded sampling per epoch, steps until the budget is spent or a signal arrives,
validation, one JSON line per epoch, the best validation loss kept in the run state; and the
optimisation step itself (``descend``).
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch


def torch_device(name: str, threads: int, seed: int) -> torch.device:
    """Set torch's CPU threads and seed; the device ``name`` (``auto``: CUDA where torch finds
    it, else the CPU)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def descend(optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One optimisation step down the gradient of ``loss``; its value. (The backward pass as
    ``Tensor.backward`` runs it: that method carries no annotations, this function does.)"""
    optimiser.zero_grad(set_to_none=True)
    torch.autograd.backward(loss)
    optimiser.step()
    return float(loss.item())


def write_best(best: dict[str, Any], run_dir: Path, export: Callable[[], object], to: Path) -> None:
    """Save ``best`` as ``run_dir/best.pt``, then ``export()`` it (ONNX + manifest to ``to``).
    A failed ONNX parity check is reported and training goes on: best.pt is kept and
    ``--export-best`` can retry."""
    torch.save(best, run_dir / "best.pt")
    epoch, loss = best["state"]["epoch"], best["metrics"]["loss"]
    try:
        export()
    except RuntimeError as error:
        print(f"epoch {epoch} not exported: {error}", flush=True)
    else:
        print(f"exported epoch {epoch} (val loss {loss:.4f}) to {to}", flush=True)


def stop_on_signals() -> dict[str, bool]:
    """A flag that SIGTERM and SIGINT set: the loop stops after the step under way."""
    stop = {"now": False}

    def _stop(signum: int, frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    return stop


def run_epochs(
    state: dict[str, Any],
    *,
    budget_s: float,
    rows: npt.NDArray[np.int64],
    weights: npt.NDArray[np.float64],
    batch: int,
    seed: int,
    optimiser: torch.optim.Optimizer,
    lr: Callable[[dict[str, Any]], float],
    step: Callable[[npt.NDArray[np.int64], torch.Generator], float],
    validate: Callable[[], dict[str, float]],
    after_epoch: Callable[[dict[str, float], bool], None],
) -> None:
    """Epochs until ``state["elapsed_s"]`` reaches ``budget_s`` or a signal arrives. Each
    epoch draws ``len(rows)`` of ``rows`` with replacement, by ``weights``, from a generator
    seeded by (``seed``, epoch); before each batch each parameter group's learning rate is
    set to ``lr(state)`` × the group's ``scale`` (1 where it has none)
    and ``step(indices, generator)`` returns its loss. Then ``validate()`` (its ``loss``
    decides the best epoch), the epoch's record in ``state["history"]`` and on stdout, and
    ``after_epoch(metrics, improved)`` to write checkpoints. Only steps and validation count
    against the budget."""
    stop = stop_on_signals()
    while state["elapsed_s"] < budget_s and not stop["now"]:
        epoch = state["epoch"]
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        rng = np.random.default_rng(seed * 100_003 + epoch)
        order = rng.choice(rows, size=len(rows), replace=True, p=weights)
        losses = []
        for start in range(0, len(order) - batch + 1, batch):
            t0 = time.monotonic()
            for group in optimiser.param_groups:
                group["lr"] = lr(state) * group.get("scale", 1.0)
            losses.append(step(order[start : start + batch], g))
            state["step"] += 1
            state["elapsed_s"] += time.monotonic() - t0
            if state["elapsed_s"] >= budget_s or stop["now"]:
                break
        t0 = time.monotonic()
        metrics = validate()
        state["elapsed_s"] += time.monotonic() - t0
        state["epoch"] += 1
        record = {
            "epoch": state["epoch"],
            "step": state["step"],
            "minutes": round(state["elapsed_s"] / 60, 2),
            "train_loss": float(np.mean(losses)) if losses else None,
            **{f"val_{k}": round(v, 4) for k, v in metrics.items()},
        }
        state["history"].append(record)
        print(json.dumps(record), flush=True)
        improved = metrics["loss"] < state["best"]
        if improved:
            state["best"], state["best_epoch"] = metrics["loss"], state["epoch"]
        after_epoch(metrics, improved)

"""The edge of stability: the sharpness an optimizer sees, against the threshold above which it is unstable.

For gradient descent with step size :math:`\\eta` on a quadratic, the iterates diverge along an eigenvector of the
Hessian :math:`H` whose eigenvalue exceeds :math:`2/\\eta`; full-batch training drives the top eigenvalue up to that
threshold and holds it there (Cohen, Kaur, Li, Kolter & Talwalkar 2021, "Gradient descent on neural networks
typically occurs at the edge of stability"). With heavy-ball momentum :math:`\\mu` the threshold is
:math:`(2 + 2\\mu)/\\eta`, with Nesterov momentum :math:`(2 + 2\\mu)/((1 + 2\\mu)\\eta)` (their appendix).

Adam updates :math:`\\theta_{t+1} = \\theta_t - \\eta\\, P_t^{-1} m_t` with a diagonal preconditioner, so the
quantity that meets a threshold is the *preconditioned sharpness* :math:`\\lambda_1(P^{-1} H)`, the top
eigenvalue of the symmetric :math:`P^{-1/2} H P^{-1/2}` (same spectrum), against
:math:`(2 + 2\\beta_1)/((1 - \\beta_1)\\eta)`, :math:`38/\\eta` for :math:`\\beta_1 = 0.9` (Cohen, Ghorbani,
Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl & Gilmer 2022, "Adaptive gradient methods at the edge
of stability"). Conventions, theirs: after :math:`t` updates, with Adam's second-moment estimate :math:`v_t`
(``exp_avg_sq``), :math:`\\hat v_t = v_t / (1 - \\beta_2^t)` (bias-corrected) and

.. math::  P = (1 - \\beta_1^t)\\, \\operatorname{diag}\\big(\\sqrt{\\hat v_t} + \\epsilon\\big),

:math:`\\epsilon` added *outside* the square root as PyTorch's Adam and AdamW do; the factor
:math:`1 - \\beta_1^t` is the first moment's bias correction folded into the preconditioner (it is 1 to within
:math:`10^{-3}` after 66 updates at :math:`\\beta_1 = 0.9`). :math:`P` is the preconditioner of the state saved with
the checkpoint, i.e. the one the next update would use up to one more step of :math:`v`, and :math:`\\eta` that
next update's learning rate. AdamW's decoupled weight decay does not enter :math:`P`.

What the trainer stores (``--set save_preconditioner=true``): beside each checkpoint
``RUN/preconditioner/<checkpoint>.safetensors`` with Adam's ``exp_avg_sq`` of every trainable parameter under its
state-dict name (none for SGD, and none before the first update), and in the header the optimizer's class,
``step``, ``lr`` (of the next update), ``betas``, ``eps``, ``momentum``, ``nesterov`` and the checkpoint's step and
run hash, which the analysis checks against the checkpoint it measures. Loading goes through safetensors only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from landscape.errors import CheckpointError, LandscapeError

Tensor = torch.Tensor
FORMAT = "landscape-preconditioner/1"


# -- what the trainer writes ----------------------------------------------------------------------------------------
def preconditioner_path(run_root: str | Path, checkpoint_name: str) -> Path:
    """``RUN/preconditioner/<checkpoint>.safetensors``."""
    return Path(run_root) / "preconditioner" / f"{checkpoint_name}.safetensors"


def optimizer_preconditioner(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, updates: int | None = None
                             ) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adam's second moments by parameter name (``{}`` for an optimizer without them, or before the first update)
    and the hyperparameters the threshold needs: ``(tensors, metadata)``. The metadata's ``step`` is the optimizer
    state's own count; an optimizer that keeps none (SGD) records ``updates``, the trainer's count, when given.

    Learning rates must agree across the parameter groups (``lr_uniform`` records whether they do; a per-group rate
    would need a per-parameter :math:`\\eta` in the threshold)."""
    groups = optimizer.param_groups
    first = groups[0]
    tensors: dict[str, Tensor] = {}
    step, counted = 0, False
    for name, p in model.named_parameters():  # first names: one entry per shared tensor
        state = optimizer.state.get(p, {})
        if "step" in state:
            step, counted = max(step, int(float(state["step"]))), True
        if "exp_avg_sq" in state:
            tensors[name] = state["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous().clone()
    if not counted and updates is not None:
        step = int(updates)
    betas = first.get("betas")
    meta = {
        "optimizer": type(optimizer).__name__,
        "step": step,
        "lr": float(first["lr"]),
        "lr_uniform": all(float(g["lr"]) == float(first["lr"]) for g in groups),
        "betas": [float(b) for b in betas] if betas is not None else None,
        "eps": float(first["eps"]) if "eps" in first else None,
        "momentum": float(first.get("momentum", 0.0) or 0.0),
        "nesterov": bool(first.get("nesterov", False)),
    }
    return tensors, meta


def save_preconditioner(path: str | Path, tensors: Mapping[str, Tensor], meta: Mapping[str, Any], *,
                        checkpoint_step: int, config_hash: str | None) -> Path:
    """Write :func:`optimizer_preconditioner`'s output atomically (safetensors; the header's values as JSON)."""
    from safetensors.torch import save_file

    from landscape.io import atomic_write

    header = {"format": FORMAT, "checkpoint_step": json.dumps(int(checkpoint_step)),
              "config_hash": json.dumps(config_hash)}
    header.update({k: json.dumps(v) for k, v in meta.items()})
    path = Path(path)
    atomic_write(path, lambda tmp: save_file(dict(tensors), str(tmp), metadata=header))
    return path


@dataclass
class Preconditioner:
    """A saved optimizer state: ``exp_avg_sq`` by parameter name and the hyperparameters (see the module notes)."""

    exp_avg_sq: dict[str, Tensor]
    optimizer: str
    step: int
    lr: float
    betas: tuple[float, float] | None = None
    eps: float | None = None
    momentum: float = 0.0
    nesterov: bool = False
    lr_uniform: bool = True
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def adaptive(self) -> bool:
        """Whether the optimizer keeps a second moment (Adam, AdamW, ...)."""
        return self.betas is not None and self.eps is not None

    def inverse_sqrt_diagonal(self, shapes: Mapping[str, tuple[int, ...]]) -> Tensor:
        """:math:`\\operatorname{diag}(P)^{-1/2}` as a ``(P,)`` float64 vector in the order of ``shapes`` (the
        :class:`~landscape.curvature.loss.LossFunction`'s parameters), with :math:`P` as in the module notes."""
        if not self.adaptive:
            raise LandscapeError(f"A {self.optimizer} optimizer keeps no second moment to precondition with.")
        if self.step < 1:
            raise LandscapeError("The optimizer had taken no step at this checkpoint, so it has no preconditioner.")
        missing = [n for n in shapes if n not in self.exp_avg_sq]
        if missing:
            raise LandscapeError(f"The saved optimizer state has no second moment for {', '.join(missing[:3])}.")
        beta1, beta2 = self.betas
        t = self.step
        parts = []
        for name, shape in shapes.items():
            v = self.exp_avg_sq[name].double()
            if tuple(v.shape) != tuple(shape):
                raise LandscapeError(f"The saved second moment of {name} has shape {tuple(v.shape)}, "
                                     f"not the parameter's {tuple(shape)}.")
            p = (1.0 - beta1 ** t) * ((v / (1.0 - beta2 ** t)).sqrt() + self.eps)
            parts.append(p.reshape(-1).rsqrt())
        return torch.cat(parts)


def load_preconditioner(path: str | Path) -> Preconditioner:
    """Read a file written by :func:`save_preconditioner` (safetensors: no code is executed)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise LandscapeError(f"{path} does not exist; train with --set save_preconditioner=true to store the "
                             "optimizer's preconditioner at every checkpoint.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if header.get("format") != FORMAT:
            raise CheckpointError(f"{path} is not a preconditioner file.")
        meta = {k: json.loads(v) for k, v in header.items() if k != "format"}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors' own errors, JSON errors: a damaged file
        raise CheckpointError(f"{path} is not a readable preconditioner file ({str(e).splitlines()[0][:120]}).") from None
    betas = meta.get("betas")
    return Preconditioner(
        exp_avg_sq=tensors, optimizer=str(meta.get("optimizer", "?")), step=int(meta.get("step", 0)),
        lr=float(meta["lr"]), betas=tuple(betas) if betas else None, eps=meta.get("eps"),
        momentum=float(meta.get("momentum") or 0.0), nesterov=bool(meta.get("nesterov")),
        lr_uniform=bool(meta.get("lr_uniform", True)), meta=meta)


def checkpoint_preconditioner(run: Any, info: Any) -> Preconditioner:
    """The preconditioner saved with checkpoint ``info`` of ``run``, checked to belong to it (same step and run)."""
    path = preconditioner_path(run.root, info.name)
    pre = load_preconditioner(path)
    if int(pre.meta.get("checkpoint_step", -1)) != int(info.step) or (
            info.config_hash and pre.meta.get("config_hash") not in (None, info.config_hash)):
        raise CheckpointError(f"{path} was saved at another step or by another run than checkpoint {info.name}; "
                              "it cannot be used to measure that checkpoint.")
    if not pre.lr_uniform:
        raise LandscapeError(f"The optimizer of {info.name} had several learning rates; the stability threshold "
                             "is defined for one.")
    return pre


# -- the measurement ----------------------------------------------------------------------------------------------
def stability_threshold(pre: Preconditioner) -> tuple[float, str]:
    """The threshold for the optimizer's sharpness and its formula: :math:`(2+2\\beta_1)/((1-\\beta_1)\\eta)` for Adam,
    :math:`(2+2\\mu)/\\eta` for heavy-ball momentum :math:`\\mu` (:math:`2/\\eta` without), :math:`(2+2\\mu)/((1+2\\mu)
    \\eta)` for Nesterov."""
    eta = pre.lr
    if eta <= 0:
        return float("nan"), "undefined at a zero learning rate"
    if pre.adaptive:
        beta1 = pre.betas[0]
        return (2 + 2 * beta1) / ((1 - beta1) * eta), "(2 + 2 beta1) / ((1 - beta1) lr)"
    mu = pre.momentum
    if mu and pre.nesterov:
        return (2 + 2 * mu) / ((1 + 2 * mu) * eta), "(2 + 2 momentum) / ((1 + 2 momentum) lr)"
    return (2 + 2 * mu) / eta, "(2 + 2 momentum) / lr" if mu else "2 / lr"


def edge_of_stability_data(op: Any, shapes: Mapping[str, tuple[int, ...]], pre: Preconditioner | None, *, tol: float,
                           seed: int, raw_top: float | None = None) -> dict[str, Any]:
    """The data variables of ``--preconditioned`` for one checkpoint: ``preconditioned_sharpness`` (Adam:
    :math:`\\lambda_1(P^{-1/2} H P^{-1/2})` by Lanczos; SGD: the raw :math:`\\lambda_1`, ``raw_top`` when the
    eigenvalues already gave it), ``stability_threshold``, ``optimizer_lr``, ``optimizer_step`` and
    ``preconditioned_matvecs``. NaN where the checkpoint has no preconditioner (before the first update)."""
    from landscape.curvature.lanczos import top_eigenvalues
    from landscape.curvature.operators import preconditioned_operator

    nan = float("nan")
    if pre is None:
        values = (nan, nan, nan, -1, 0)
        formula = "no optimizer state"
    else:
        threshold, formula = stability_threshold(pre)
        matvecs = 0
        if pre.adaptive and pre.step >= 1:
            result = top_eigenvalues(preconditioned_operator(op, pre.inverse_sqrt_diagonal(shapes)), 1, tol=tol,
                                     seed=seed)
            sharpness, matvecs = float(result.eigenvalues[0]), result.matvecs
        elif pre.adaptive:
            sharpness = nan
        elif raw_top is not None:
            sharpness = raw_top
        else:
            result = top_eigenvalues(op, 1, tol=tol, seed=seed)
            sharpness, matvecs = float(result.eigenvalues[0]), result.matvecs
        values = (sharpness, threshold, pre.lr, pre.step, matvecs)
    adaptive = pre is not None and pre.adaptive
    what = ("top eigenvalue of P^-1/2 H P^-1/2, P = (1 - beta1^t) diag(sqrt(v_t / (1 - beta2^t)) + eps)"
            if adaptive else "top eigenvalue of H (SGD: no preconditioner)")
    return {
        "preconditioned_sharpness": ((), values[0], {"long_name": what, "optimizer": pre.optimizer if pre else ""}),
        "stability_threshold": ((), values[1], {"long_name": "stability threshold of the optimizer", "formula": formula}),
        "optimizer_lr": ((), values[2], {"long_name": "learning rate of the update after the checkpoint"}),
        "optimizer_step": ((), values[3], {"long_name": "updates the saved optimizer state had taken"}),
        "preconditioned_matvecs": ((), values[4], {"long_name": "Hessian-vector products for the sharpness"}),
    }


def stability_ratio(ds) -> np.ndarray:
    """``preconditioned_sharpness / stability_threshold`` per checkpoint (1 is the edge of stability)."""
    return ds["preconditioned_sharpness"].values / ds["stability_threshold"].values


__all__ = ["Preconditioner", "checkpoint_preconditioner", "edge_of_stability_data", "load_preconditioner",
           "optimizer_preconditioner", "preconditioner_path", "save_preconditioner",
           "stability_ratio", "stability_threshold"]

"""Loss closures over a fixed evaluation set, and the Hessian as a linear operator.

Every curvature measurement in :mod:`landscape.analyses` starts here. A :class:`LossFunction` binds a model to
a fixed evaluation set :math:`\\{(x_i, y_i)\\}_{i=1}^N` and a subset :math:`\\theta` of its parameters, and
computes the mean loss

.. math::  L(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\bar\\ell_b(\\theta),

where :math:`\\bar\\ell_b` is the mean loss of batch :math:`b` of size :math:`n_b` (the last, short batch counts
with its true weight), its gradient :math:`\\nabla L` and Hessian-vector products :math:`H v = \\nabla^2 L \\, v`
with :math:`H \\in \\mathbb{R}^{P \\times P}`, :math:`P` the number of selected parameters.

- Evaluation mode, no augmentation, a fixed order. The model is never changed: parameters are swapped in
  functionally (:func:`torch.func.functional_call`), the train/eval flags are restored afterwards.
- Hessian-vector products are forward-over-reverse, :math:`H v = \\partial_\\epsilon \\nabla L(\\theta +
  \\epsilon v)|_{\\epsilon=0}` (:func:`torch.func.jvp` of :func:`torch.func.grad`); several vectors share one
  primal pass through :func:`torch.func.vmap`. The double-backward product :math:`\\nabla (\\nabla L^\\top v)` is
  kept as an independent cross-check.
- For a long sequence of products (Lanczos, Hutch++) :class:`KeptGraphProducts` runs the forward and backward
  pass once, keeps the graph of the gradient, and differentiates it again for each vector: every product then
  skips the primal work. :class:`HessianOperator` picks it (``product="auto"``) when the evaluation set is one
  batch, whose graph the batch size has already sized; over several batches, holding every batch's graph at
  once could exceed the memory that the batch size was chosen to fit, so products recompute batch by batch
  (double backward on a CPU, forward-over-reverse on a GPU: see :class:`HessianOperator`).
- Fused attention kernels have neither a double-backward nor a forward-mode rule; every method here runs under
  the math kernel of :func:`torch.nn.functional.scaled_dot_product_attention`, switched on inside.
- Parameters with ``requires_grad=False`` and parameters the loss does not reach on the evaluation set are
  skipped. A parameter shared by several modules (the same tensor under several names) is one parameter,
  named by its first name in ``model.named_parameters()``.
- On several processes (``data_parallel``, see :mod:`landscape.analyses.distributed`) each holds a contiguous slice
  of the evaluation set, weights its batches by :math:`n_b / N` with the whole set's :math:`N`, and sums every
  loss, count, gradient and product over the processes: each sees the whole set's :math:`L`, :math:`\\nabla L`
  and :math:`H v`, up to the order of summation.

Vectors come in two forms: a dict ``{name: tensor}`` shaped like the parameters, or a flat tensor of shape
``(P,)`` in the order of :attr:`LossFunction.names` (:meth:`LossFunction.flatten` / :meth:`~LossFunction.unflatten`).
Several vectors are the columns of a ``(P, k)`` matrix, as in :class:`scipy.sparse.linalg.LinearOperator`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator
from torch import nn

from landscape.errors import ConfigError, LandscapeError

Tensor = torch.Tensor
LossCriterion = Callable[[Any, Tensor], Tensor]
Inputs = "Tensor | Mapping[str, Tensor]"
"""A model's inputs: one tensor ``(N, ...)``, or a dict of tensors sharing the first dimension ``N`` (passed as
keyword arguments, e.g. a Hugging Face model's ``pixel_values=``)."""


# -- parameters ------------------------------------------------------------------------------------------------
def parameters_by_pattern(model: nn.Module, pattern: str | None = None) -> dict[str, nn.Parameter]:
    """The trainable parameters of ``model`` whose name matches ``pattern``, each once, in model order.

    ``pattern`` is a comma-separated list of alternatives, each one of

    - a glob over the dotted parameter names: ``"*attn*"``, ``"blocks.3.*"``, ``"*mlp.fc?.weight"``;
    - a module prefix without wildcards: ``"blocks.3"`` selects every parameter under ``blocks.3.``;
    - a regular expression after ``re:``, searched in the name: ``"re:blocks\\.(0|1)\\..*qkv"``.

    ``None``, ``""`` and ``"*"`` select every parameter. A parameter shared by several modules is selected when
    any of its names matches and is returned once, under its first name (the one ``state_dict`` loading and
    :func:`torch.func.functional_call` accept). Parameters with ``requires_grad=False`` are left out.
    """
    matchers = _name_matchers(pattern)
    names_of: dict[int, list[str]] = {}
    params: dict[int, nn.Parameter] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
        params[id(p)] = p
    selected: dict[str, nn.Parameter] = {}
    for key, names in names_of.items():
        p = params[key]
        if p.requires_grad and any(m(n) for n in names for m in matchers):
            selected[names[0]] = p
    if not selected:
        raise ConfigError(
            f"No trainable parameter of the model matches {pattern!r}; give a glob such as '*attn*' or "
            "'blocks.3.*', a module prefix such as 'blocks.3', or a regular expression after 're:'."
        )
    return selected


def _name_matchers(pattern: str | None) -> list[Callable[[str], bool]]:
    if pattern is None or pattern.strip() in ("", "*"):
        return [lambda name: True]
    matchers: list[Callable[[str], bool]] = []
    for part in (p.strip() for p in pattern.split(",")):
        if not part:
            continue
        if part.startswith("re:"):
            try:
                regex = re.compile(part[3:])
            except re.error as e:
                raise ConfigError(f"Parameter pattern {part!r} is not a valid regular expression ({e}).") from None
            matchers.append(lambda name, r=regex: r.search(name) is not None)
        elif any(c in part for c in "*?["):
            matchers.append(lambda name, g=part: fnmatch.fnmatchcase(name, g))
        else:
            matchers.append(lambda name, prefix=part: name == prefix or name.startswith(prefix + "."))
    return matchers


def flatten_tensors(tensors: Mapping[str, Tensor]) -> Tensor:
    """Concatenate a dict of tensors, in its order, into one ``(P,)`` vector."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten_vector(vector: Tensor, shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> dict[str, Tensor]:
    """Split a ``(P,)`` vector into views shaped like ``shapes`` (the inverse of :func:`flatten_tensors`)."""
    sizes = [int(np.prod(s)) for s in shapes.values()]
    if vector.ndim != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"expected a vector of {sum(sizes)} entries, got shape {tuple(vector.shape)}")
    return {n: chunk.view(s) for (n, s), chunk in zip(shapes.items(), torch.split(vector, sizes))}


# -- the evaluation set ------------------------------------------------------------------------------------------
def num_inputs(x: Inputs) -> int:
    """The number of examples ``N`` in ``x``: its first dimension, shared by every tensor of a dict."""
    if isinstance(x, Mapping):
        if not x:
            raise LandscapeError("The inputs are an empty dict; give at least one tensor (e.g. pixel_values).")
        sizes = {name: len(t) for name, t in x.items()}
        if len(set(sizes.values())) > 1:
            listed = ", ".join(f"{n} {k}" for n, k in sizes.items())
            raise LandscapeError(f"The input tensors have different numbers of examples ({listed}).")
        return next(iter(sizes.values()))
    return len(x)


def slice_inputs(x: Inputs, start: int, stop: int) -> Inputs:
    """Examples ``start:stop`` of ``x`` (every tensor of a dict alike)."""
    if isinstance(x, Mapping):
        return {name: t[start:stop] for name, t in x.items()}
    return x[start:stop]


def inputs_to(x: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """``x`` on ``device``, floating-point tensors in ``dtype`` (integer ones, e.g. token ids, keep theirs)."""
    if isinstance(x, Mapping):
        return {name: inputs_to(t, device, dtype) for name, t in x.items()}
    x = x.to(device, non_blocking=True)
    return x.to(dtype) if x.is_floating_point() else x


def model_outputs(outputs: Any) -> Tensor:
    """The prediction tensor of a forward pass: the tensor itself, the ``logits`` of an output object or dict
    (Hugging Face models), or the first element of a tuple."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping) and "logits" in outputs:
        return outputs["logits"]
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise LandscapeError(
        f"The model returned a {type(outputs).__name__}, not a tensor nor an object with .logits; wrap it so that "
        "it returns the tensor the loss takes.")


def forward(model: nn.Module, x: Inputs, tensors: Mapping[str, Tensor] | None = None) -> Tensor:
    """``model(x)`` (``model(**x)`` for a dict), with ``tensors`` swapped in for its parameters and buffers."""
    args, kwargs = ((), dict(x)) if isinstance(x, Mapping) else ((x,), None)
    if tensors is None:
        return model_outputs(model(*args, **(kwargs or {})))
    # tie_weights=False: with the default, a module reachable under two names (GroupedMLP) keeps the passed
    # tensors after the call (pytorch issue 164759); the shared module is swapped once either way.
    return model_outputs(torch.func.functional_call(model, dict(tensors), args, kwargs, tie_weights=False))


@dataclass
class EvaluationSet:
    """A fixed, ordered evaluation set: inputs ``x`` ``(N, ...)`` (or a dict of such tensors), targets ``y``
    ``(N, ...)``, split in batches.

    The batches are ``x[0:B], x[B:2B], ...``; the last may be shorter and is weighted by its size.
    """

    x: Inputs
    y: Tensor
    batch_size: int | None = None

    def __post_init__(self) -> None:
        n = num_inputs(self.x)
        if n != len(self.y):
            raise LandscapeError(f"The evaluation set has {n} inputs but {len(self.y)} targets.")
        if n == 0:
            raise LandscapeError("The evaluation set is empty; give at least one example.")
        if self.batch_size is None or self.batch_size <= 0:
            self.batch_size = n

    def __len__(self) -> int:
        return num_inputs(self.x)

    @property
    def num_batches(self) -> int:
        return -(-len(self) // self.batch_size)

    def batches(self) -> Iterator[tuple[Inputs, Tensor]]:
        for start in range(0, len(self), self.batch_size):
            yield slice_inputs(self.x, start, start + self.batch_size), self.y[start:start + self.batch_size]


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, *, math_attention: bool = True) -> Iterator[nn.Module]:
    """Eval mode (and the math attention kernel) for the duration; every module's train flag is restored after.

    Derivatives of any order need the math kernel; plain loss evaluation (``math_attention=False``) keeps the
    fused kernels, which are faster and give the same values up to rounding.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            yield model
    finally:
        for m, training in flags:
            m.training = training


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The default criterion: mean cross-entropy of class logits ``(n, C)`` against integer targets ``(n,)``."""
    return torch.nn.functional.cross_entropy(logits, targets)


# -- the loss closure ---------------------------------------------------------------------------------------------
class LossFunction:
    """The mean loss of ``model`` on a fixed evaluation set, as a function of a subset of its parameters.

    Args:
        model: any module; it is only read. Its dtype and device are used for every computation.
        x, y: the evaluation set, ``(N, ...)`` inputs (or a dict of them, passed as keyword arguments) and
            ``(N, ...)`` targets, moved batch by batch to the model; floating-point ones take its dtype.
        batch_size: examples per forward pass (``None``: all at once). Results do not depend on it beyond
            floating-point rounding.
        params: which parameters :math:`\\theta` are variables: a pattern for :func:`parameters_by_pattern`,
            a list of names, or ``None`` for all trainable ones. The others stay fixed at their current values.
        criterion: ``criterion(outputs, targets)`` returning the *mean* loss over the batch; ``outputs`` is the
            model's output tensor, or the ``logits`` of an output object (:func:`model_outputs`).
        vectors_per_pass: how many vectors one batched Hessian-vector product pushes through the model at
            once; memory grows with it (each vector carries its own activation tangents).
        skip_unused: leave out parameters that the loss does not reach on the evaluation set (found with one
            gradient pass when the closure is made).
        data_parallel: ``x, y`` are this process's slice of a larger evaluation set split over several processes
            (:class:`landscape.analyses.distributed.DataParallel`): batches are weighted by
            :math:`n_b / N` with the whole set's :math:`N`, and every loss, accuracy count, gradient and
            Hessian-vector product is summed over the processes, so each process sees the whole set's operator.

    Attributes:
        names: the selected parameter names, in vector order; shapes: their shapes; num_parameters: :math:`P`.
    """

    def __init__(
        self,
        model: nn.Module,
        x: Tensor,
        y: Tensor,
        *,
        batch_size: int | None = 256,
        params: str | list[str] | None = None,
        criterion: LossCriterion = cross_entropy,
        vectors_per_pass: int = 8,
        skip_unused: bool = True,
        data_parallel: Any = None,
    ):
        self.model = model
        self.data = EvaluationSet(x, y, batch_size)
        self.data_parallel = data_parallel
        self.num_examples = data_parallel.num_examples if data_parallel is not None else len(self.data)
        self.criterion = criterion
        self.vectors_per_pass = max(1, int(vectors_per_pass))
        first = next(iter(model.parameters()), None)
        if first is None:
            raise LandscapeError("The model has no parameters, so it has no Hessian.")
        self.device = first.device
        self.dtype = first.dtype
        if isinstance(params, (list, tuple)):
            selected = _parameters_by_name(model, list(params))
            self.pattern: str | None = ",".join(params)
        else:
            selected = parameters_by_pattern(model, params)
            self.pattern = params
        canonical = dict(model.named_parameters())  # first names only: what functional_call expects
        buffers = dict(model.named_buffers())
        self._fixed = {n: p.detach() for n, p in canonical.items() if n not in selected}
        self._fixed.update({n: b.detach() for n, b in buffers.items()})
        if skip_unused:
            reached = self._reached_parameters({n: p.detach() for n, p in selected.items()})
            unused = [n for n in selected if n not in reached]
            for n in unused:
                self._fixed[n] = selected.pop(n).detach()
            if not selected:
                raise LandscapeError(
                    f"None of the parameters matching {self.pattern!r} influences the loss on the evaluation set."
                )
            self.skipped = unused
        else:
            self.skipped = []
        self.names = list(selected)
        self.shapes = {n: selected[n].shape for n in self.names}
        self.num_parameters = int(sum(selected[n].numel() for n in self.names))
        self._params = {n: selected[n].detach() for n in self.names}

    # -- vectors ---------------------------------------------------------------------------------------------
    def parameters(self) -> dict[str, Tensor]:
        """The current values :math:`\\theta` of the selected parameters (detached views, never to be edited)."""
        return dict(self._params)

    def parameter_vector(self) -> Tensor:
        """:math:`\\theta` as one ``(P,)`` vector (a copy)."""
        return self.flatten(self._params)

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """``{name: (*shape)}`` -> ``(P,)``, or ``{name: (k, *shape)}`` -> ``(P, k)`` (one column per vector)."""
        first = tensors[self.names[0]]
        batched = first.dim() == len(self.shapes[self.names[0]]) + 1
        if batched:
            k = first.shape[0]
            return torch.cat([tensors[n].reshape(k, -1) for n in self.names], dim=1).T
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """``(P,)`` -> ``{name: (*shape)}``, or ``(P, k)`` -> ``{name: (k, *shape)}`` (the inverse of :meth:`flatten`)."""
        sizes = [int(np.prod(s)) for s in self.shapes.values()]
        if vector.shape[0] != self.num_parameters or vector.dim() not in (1, 2):
            raise ValueError(f"expected ({self.num_parameters},) or ({self.num_parameters}, k), got {tuple(vector.shape)}")
        if vector.dim() == 1:
            return {n: c.view(s) for (n, s), c in zip(self.shapes.items(), torch.split(vector, sizes))}
        rows = vector.T
        return {n: c.reshape(rows.shape[0], *s) for (n, s), c in zip(self.shapes.items(), torch.split(rows, sizes, 1))}

    def _split_params(self, params: Mapping[str, Tensor] | Tensor | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``(variables, fixed)``: the selected parameters' values and every other tensor, ``params`` applied."""
        if params is None:
            return self._params, self._fixed
        if isinstance(params, Tensor):
            return self.unflatten(params.to(self.device, self.dtype)), self._fixed
        unknown = [n for n in params if n not in self._params and n not in self._fixed]
        if unknown:
            raise KeyError(f"not parameters of the model: {', '.join(unknown[:5])}")
        variables = {n: params.get(n, t) for n, t in self._params.items()}
        fixed = {n: params.get(n, t) for n, t in self._fixed.items()}
        return variables, fixed

    def _batch(self, xb: Inputs, yb: Tensor) -> tuple[Inputs, Tensor]:
        y = yb.to(self.device, non_blocking=True)
        return inputs_to(xb, self.device, self.dtype), (y.to(self.dtype) if y.is_floating_point() else y)

    def _batch_loss(self, variables: dict[str, Tensor], x: Tensor, y: Tensor, fixed: dict[str, Tensor] | None = None) -> Tensor:
        tensors = {**(self._fixed if fixed is None else fixed), **variables}
        return self.criterion(forward(self.model, x, tensors), y)

    def _weights(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        n = self.num_examples
        for xb, yb in self.data.batches():
            x, y = self._batch(xb, yb)
            yield len(yb) / n, x, y

    def _reached_parameters(self, variables: dict[str, Tensor]) -> set[str]:
        leaves = {n: t.clone().requires_grad_(True) for n, t in variables.items()}
        reached: set[str] = set()
        with evaluation_mode(self.model), torch.enable_grad():
            for _, x, y in self._weights():
                loss = self._batch_loss(leaves, x, y)
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                reached.update(n for n, g in zip(leaves, grads) if g is not None)
                if len(reached) == len(leaves):
                    break
        if self.data_parallel is not None:  # reached on any process's slice is reached on the whole set
            mask = self._sum(torch.tensor([float(n in reached) for n in leaves], device=self.device))
            reached = {n for n, hit in zip(leaves, mask.tolist()) if hit > 0}
        return reached

    def _sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes of a data-parallel evaluation set (unchanged for one process)."""
        return tensor if self.data_parallel is None else self.data_parallel.all_reduce(tensor)

    def _sum_scalars(self, *values: float) -> list[float]:
        if self.data_parallel is None:
            return list(values)
        return self._sum(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

    # -- values and gradients ---------------------------------------------------------------------------------
    def loss(self, params: Mapping[str, Tensor] | Tensor | None = None) -> float:
        """:math:`L(\\theta)` at the current parameters, or at ``params`` (a dict of some names, or a ``(P,)`` vector)."""
        return self.evaluate(params)[0]

    def evaluate(self, params: Mapping[str, Tensor] | Tensor | nn.Module | None = None) -> tuple[float, float]:
        """``(mean loss, top-1 accuracy in %)`` over the evaluation set.

        ``params`` is ``None`` (the model as given), a dict of parameter values (any subset of the model's
        names, the rest kept), a ``(P,)`` vector of the selected parameters, or another module of the same
        architecture evaluated with its own weights.
        """
        if isinstance(params, nn.Module):
            total, correct = _evaluate_module(params, self.data, self.criterion, self.num_examples)
            total, correct = self._sum_scalars(total, correct)
            return total, 100.0 * correct / self.num_examples
        variables, fixed = self._split_params(params)
        full = {**fixed, **variables}
        total, correct = 0.0, 0.0
        with evaluation_mode(self.model, math_attention=False), torch.no_grad():
            for w, x, y in self._weights():
                outputs = forward(self.model, x, full)
                total += w * float(self.criterion(outputs, y))
                correct += _num_correct(outputs, y)
        total, correct = self._sum_scalars(total, correct)
        return total, 100.0 * correct / self.num_examples

    def loss_and_gradient(self, params: Mapping[str, Tensor] | Tensor | None = None) -> tuple[float, Tensor]:
        """:math:`(L(\\theta), \\nabla L(\\theta))`, the gradient as a ``(P,)`` vector."""
        variables, fixed = self._split_params(params)
        grad_and_value = torch.func.grad_and_value(self._batch_loss)
        total, gradient = 0.0, None
        with evaluation_mode(self.model):
            for w, x, y in self._weights():
                g, value = grad_and_value(variables, x, y, fixed)
                total += w * float(value)
                gradient = _add_scaled(gradient, g, w)
        return self._sum_scalars(total)[0], self._sum(self.flatten(gradient))

    def gradient(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """:math:`\\nabla L(\\theta)` as a ``(P,)`` vector."""
        return self.loss_and_gradient(params)[1]

    # -- Hessian-vector products -------------------------------------------------------------------------------
    def hessian_vector_product(self, v: Tensor | Mapping[str, Tensor], *, vectors_per_pass: int | None = None
                               ) -> Tensor | dict[str, Tensor]:
        """:math:`H v` by forward-over-reverse differentiation, returned in the form ``v`` was given.

        ``v`` may be ``(P,)``, ``(P, k)`` (``k`` vectors as columns, pushed through :func:`torch.func.vmap`
        ``vectors_per_pass`` at a time, default :attr:`vectors_per_pass`) or a dict shaped like the parameters.
        """
        if isinstance(v, Mapping):
            return self.unflatten(self.hessian_vector_product(self.flatten(v), vectors_per_pass=vectors_per_pass))
        v = v.to(self.device, self.dtype)
        if v.dim() == 1:
            return self._hvp_columns(v[:, None])[:, 0]
        step = vectors_per_pass or self.vectors_per_pass
        return torch.cat([self._hvp_columns(v[:, i:i + step]) for i in range(0, v.shape[1], step)], dim=1)

    def _hvp_columns(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``: one pass per batch, the primal computation shared by the ``k`` tangents."""
        k = vectors.shape[1]
        tangents = self.unflatten(vectors)  # {name: (k, *shape)}
        result = None
        with evaluation_mode(self.model):
            for w, x, y in self._weights():
                gradient = torch.func.grad(self._batch_loss)

                def hvp(t: dict[str, Tensor]) -> dict[str, Tensor]:
                    return torch.func.jvp(lambda p: gradient(p, x, y), (self._params,), (t,))[1]

                if k == 1:
                    hv = {n: t[None] for n, t in hvp({n: t[0] for n, t in tangents.items()}).items()}
                else:
                    hv = torch.func.vmap(hvp)(tangents)
                result = _add_scaled(result, hv, w)
        return self._sum(self.flatten(result))

    def hessian_vector_product_double_backward(self, v: Tensor | Mapping[str, Tensor]) -> Tensor | dict[str, Tensor]:
        """:math:`H v = \\nabla_\\theta (g^\\top v)`, :math:`g = \\nabla_\\theta L`, by reverse-over-reverse (double
        backward), an independent cross-check of :meth:`hessian_vector_product`.

        Per batch, one forward and backward pass with ``create_graph=True``, then one backward pass through that
        graph for each vector: the columns of a ``(P, k)`` block share the first pass (one batch's graph in memory
        at a time). ``v`` is ``(P,)``, ``(P, k)`` or a dict, and the result has the same form.
        """
        if isinstance(v, Mapping):
            return self.unflatten(self.hessian_vector_product_double_backward(self.flatten(v)))
        v = v.to(self.device, self.dtype)
        if v.dim() == 1:
            return self.hessian_vector_product_double_backward(v[:, None])[:, 0]
        tangents = [list(self.unflatten(v[:, i]).values()) for i in range(v.shape[1])]
        result = torch.zeros_like(v)
        leaves = list(self._leaves().values())  # each batch builds its own graph on the same leaves
        with evaluation_mode(self.model), torch.enable_grad():
            for w, x, y in self._weights():
                grads = torch.autograd.grad(self._batch_loss(dict(zip(self.names, leaves)), x, y), leaves,
                                            create_graph=True)
                for i, tangent in enumerate(tangents):
                    hv = torch.autograd.grad(grads, leaves, grad_outputs=tangent, retain_graph=i + 1 < len(tangents))
                    result[:, i].add_(torch.cat([h.reshape(-1) for h in hv]), alpha=w)
        return self._sum(result)

    def _leaves(self) -> dict[str, Tensor]:
        """Fresh copies of the selected parameters that require grad, to build a differentiable graph on."""
        return {n: t.clone().requires_grad_(True) for n, t in self._params.items()}

    def dense_hessian(self) -> Tensor:
        """The full ``(P, P)`` Hessian from ``P`` Hessian-vector products with unit vectors (small models only)."""
        eye = torch.eye(self.num_parameters, device=self.device, dtype=self.dtype)
        return self.hessian_vector_product(eye, vectors_per_pass=max(self.vectors_per_pass, 128))

    def hessian_operator(self, product: str = "auto") -> "HessianOperator":
        return HessianOperator(self, product=product)


def _parameters_by_name(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    canonical = {id(p): n for n, p in model.named_parameters()}
    every = dict(model.named_parameters(remove_duplicate=False))
    missing = [n for n in names if n not in every]
    if missing:
        raise ConfigError(f"The model has no parameter named {', '.join(missing[:5])}.")
    out: dict[str, nn.Parameter] = {}
    for n in names:
        p = every[n]
        if p.requires_grad:
            out.setdefault(canonical[id(p)], p)
    return out


def _add_scaled(total: dict[str, Tensor] | None, value: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    if total is None:
        return {n: weight * t for n, t in value.items()}
    return {n: total[n] + weight * t for n, t in value.items()}


def _num_correct(outputs: Tensor, targets: Tensor) -> float:
    if outputs.dim() != 2 or targets.dim() != 1 or targets.is_floating_point():
        return float("nan")
    return float((outputs.argmax(dim=1) == targets).sum())


def _evaluate_module(model: nn.Module, data: EvaluationSet, criterion: LossCriterion, num_examples: int
                     ) -> tuple[float, float]:
    """``(sum over batches of n_b / num_examples * mean loss, number correct)`` of ``model`` on ``data``."""
    first = next(iter(model.parameters()))
    total, correct = 0.0, 0.0
    with evaluation_mode(model, math_attention=False), torch.no_grad():
        for xb, yb in data.batches():
            x = inputs_to(xb, first.device, first.dtype)
            y = yb.to(first.device)
            y = y.to(first.dtype) if y.is_floating_point() else y
            outputs = forward(model, x)
            total += len(yb) / num_examples * float(criterion(outputs, y))
            correct += _num_correct(outputs, y)
    return total, correct


# -- the Hessian as a linear operator ----------------------------------------------------------------------------
class KeptGraphProducts:
    """Hessian-vector products through a kept gradient graph: :math:`H v = \\nabla_\\theta (g^\\top v)` with
    :math:`g = \\nabla L` computed once, with ``create_graph=True``, and reused for every ``v``.

    The first product (or :meth:`build`) runs one forward and backward pass per batch and holds each batch's
    graph; every product after it is one backward pass through those graphs (reverse-over-reverse), skipping
    the forward and backward pass that :meth:`LossFunction.hessian_vector_product` recomputes. The loss and
    gradient of that pass are kept too (:attr:`loss_value`, :attr:`gradient`). Memory: the graph of every batch
    at once: its activations and the backward pass's intermediates. Products are exact for the
    parameters at build time; :meth:`release` frees the graphs (so does leaving a ``with`` block).
    """

    def __init__(self, loss: LossFunction):
        self.loss_function = loss
        self._graphs: list[tuple[float, tuple[Tensor, ...]]] | None = None
        self._leaves: list[Tensor] = []
        self.loss_value: float | None = None
        self.gradient: Tensor | None = None

    def build(self) -> "KeptGraphProducts":
        if self._graphs is not None:
            return self
        lf = self.loss_function
        leaves = lf._leaves()
        graphs, total, gradient = [], 0.0, None
        with evaluation_mode(lf.model), torch.enable_grad():
            for w, x, y in lf._weights():
                value = lf._batch_loss(leaves, x, y)
                grads = torch.autograd.grad(value, list(leaves.values()), create_graph=True)
                graphs.append((w, grads))
                total += w * float(value.detach())
                gradient = _add_scaled(gradient, {n: g.detach() for n, g in zip(leaves, grads)}, w)
        self._graphs, self._leaves = graphs, list(leaves.values())
        self.loss_value = lf._sum_scalars(total)[0]
        self.gradient = lf._sum(lf.flatten(gradient))
        return self

    def matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``, one backward pass per column and batch."""
        self.build()
        lf = self.loss_function
        columns = []
        with evaluation_mode(lf.model):
            for i in range(vectors.shape[1]):
                tangent = list(lf.unflatten(vectors[:, i].to(lf.device, lf.dtype)).values())
                total = None
                for w, grads in self._graphs:
                    hv = torch.autograd.grad(grads, self._leaves, grad_outputs=tangent, retain_graph=True)
                    flat = torch.cat([h.reshape(-1) for h in hv])
                    total = w * flat if total is None else total.add_(flat, alpha=w)
                columns.append(total)
        return lf._sum(torch.stack(columns, dim=1))

    def release(self) -> None:
        self._graphs, self._leaves = None, []

    def __enter__(self) -> "KeptGraphProducts":
        return self.build()

    def __exit__(self, *exc) -> None:
        self.release()


PRODUCTS = ("auto", "forward-over-reverse", "double-backward", "kept-graph")


class HessianOperator(LinearOperator):
    """:math:`H = \\nabla^2 L(\\theta)` of a :class:`LossFunction`, as a symmetric ``(P, P)`` linear operator.

    The scipy interface (``op @ x``, ``op.matvec``, ``op.matmat``, :func:`scipy.sparse.linalg.eigsh`) takes and
    returns numpy arrays in the model's dtype (float32 or float64); :meth:`torch_matmat` and
    :meth:`torch_matvec` stay on the model's device, for estimators written in torch. Each product is
    counted in :attr:`num_matvecs` (one per column); ``callback(k)`` is called after each ``k``-column product,
    e.g. to drive a progress bar.

    ``product`` chooses how products are computed, all exact (they differ by floating-point rounding):

    - ``"kept-graph"``: the gradient graph of the whole evaluation set is built once and kept across products
      (:class:`KeptGraphProducts`; freed by :meth:`release`). Fastest: a product is one backward pass.
    - ``"double-backward"``: per call and batch, one forward and backward pass with ``create_graph`` and one more
      backward pass per vector (:meth:`LossFunction.hessian_vector_product_double_backward`); one batch's graph
      in memory at a time.
    - ``"forward-over-reverse"``: per call and batch, :func:`torch.func.jvp` of :func:`torch.func.grad`,
      ``vectors_per_pass`` vectors at a time under :func:`torch.func.vmap`.
    - ``"auto"``: ``"kept-graph"`` when the evaluation set is one batch; otherwise ``"double-backward"`` on a CPU
      and ``"forward-over-reverse"`` on a GPU. On a CPU vmap's batched tangents cost more memory traffic than
      the shared primal pass saves (1.8M-parameter ViT: 3.5 gradients per vector in blocks of 8, against 2.4
      with one graph per call, ``benchmarks/hessian.md``); on a GPU batching fills the device.
    """

    def __init__(self, loss: LossFunction, *, callback: Callable[[int], Any] | None = None, product: str = "auto"):
        if product not in PRODUCTS:
            raise ConfigError(f"Unknown Hessian-vector product {product!r}; accepted are {', '.join(PRODUCTS)}.")
        self.loss = loss
        self.callback = callback
        self.num_matvecs = 0
        if product == "auto":  # every process must choose alike: they meet in the same collectives
            several = float(loss.data.num_batches > 1)
            if loss.data_parallel is not None:
                several = float(loss._sum(torch.tensor([several], device=loss.device)))
            if not several:
                product = "kept-graph"
            else:
                product = "forward-over-reverse" if loss.device.type == "cuda" else "double-backward"
        self.product = product
        self.kept = KeptGraphProducts(loss) if product == "kept-graph" else None
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(loss.dtype)
        if np_dtype is None:
            raise LandscapeError(f"Hessians are computed in float32 or float64, not {loss.dtype}.")
        super().__init__(dtype=np.dtype(np_dtype), shape=(loss.num_parameters, loss.num_parameters))

    @property
    def device(self) -> torch.device:
        return self.loss.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.loss.dtype

    def torch_matmat(self, vectors: Tensor) -> Tensor:
        """``(P, k)`` -> ``(P, k)``: :math:`H V` on the model's device, in its dtype."""
        vectors = vectors.to(self.device, self.torch_dtype)
        if self.kept is not None:
            out = self.kept.matmat(vectors)
        elif self.product == "double-backward":
            out = self.loss.hessian_vector_product_double_backward(vectors)
        else:
            out = self.loss.hessian_vector_product(vectors)
        self._count(vectors.shape[1])
        return out

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """:math:`(L, \\nabla L)` at the operator's parameters; free once a kept graph is built."""
        if self.kept is not None:
            self.kept.build()
            return self.kept.loss_value, self.kept.gradient
        return self.loss.loss_and_gradient()

    def release(self) -> None:
        """Free a kept graph (the next product builds it again)."""
        if self.kept is not None:
            self.kept.release()

    def torch_matvec(self, vector: Tensor) -> Tensor:
        """``(P,)`` -> ``(P,)``: :math:`H v`."""
        return self.torch_matmat(vector.reshape(-1, 1))[:, 0]

    def _count(self, k: int) -> None:
        self.num_matvecs += k
        if self.callback is not None:
            self.callback(k)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        vectors = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype))
        return self.torch_matmat(vectors).cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def _adjoint(self) -> "HessianOperator":
        return self


# -- Gauss-Newton and Fisher matrices as linear operators -----------------------------------------------------------
MATRICES = ("hessian", "ggn", "fisher", "empirical-fisher")
"""The curvature matrices every estimator of :mod:`landscape.analyses.hessian` can take (``--matrix``)."""


def _model_outputs(loss: LossFunction, variables: Mapping[str, Tensor], x: Any) -> Tensor:
    tensors = {**loss._fixed, **variables}
    args, kwargs = ((), x) if isinstance(x, Mapping) else ((x,), {})
    return torch.func.functional_call(loss.model, tensors, args, kwargs, tie_weights=False)


class OutputCurvatureOperator(LinearOperator):
    """A curvature matrix of the form :math:`\\sum_b \\frac{n_b}{N} J_b^\\top M_b J_b`, as a symmetric ``(P, P)``
    linear operator with the interface of :class:`HessianOperator`.

    :math:`J_b = \\partial z_b / \\partial \\theta` is the Jacobian of batch :math:`b`'s network outputs
    :math:`z_b \\in \\mathbb{R}^{n_b \\times C}` and :math:`M_b` a positive semi-definite matrix on the outputs that
    each subclass defines (:meth:`output_product`, the product :math:`M_b u` for a tangent :math:`u = J_b v` of the
    outputs' shape). A product is one forward-mode pass :math:`u = J_b v` (:func:`torch.func.jvp`), the output
    product, and one reverse pass :math:`J_b^\\top (M_b u)` (:func:`torch.func.vjp`, its forward pass shared by the
    columns of a block), per batch. Products are never formed from per-example gradients.
    """

    matrix = ""

    def __init__(self, loss: LossFunction, *, callback: Callable[[int], Any] | None = None):
        self.loss = loss
        self.callback = callback
        self.num_matvecs = 0
        np_dtype = {torch.float32: np.float32, torch.float64: np.float64}.get(loss.dtype)
        if np_dtype is None:
            raise LandscapeError(f"Curvature matrices are computed in float32 or float64, not {loss.dtype}.")
        super().__init__(dtype=np.dtype(np_dtype), shape=(loss.num_parameters, loss.num_parameters))

    @property
    def device(self) -> torch.device:
        return self.loss.device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.loss.dtype

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        """:math:`M_b u` for batch number ``batch`` with outputs ``(n_b, C)`` and a tangent ``u`` ``(n_b, C)``."""
        raise NotImplementedError

    def prepare_batch(self, batch: int, outputs: Tensor) -> None:
        """Called with each batch's outputs before its products (outside :func:`torch.func.vmap`)."""

    def torch_matmat(self, vectors: Tensor, *, vectors_per_pass: int | None = None) -> Tensor:
        """``(P, k)`` -> ``(P, k)`` on the model's device, in its dtype; ``vectors_per_pass`` columns (default the
        loss function's) go through :func:`torch.func.vmap` together."""
        lf = self.loss
        vectors = vectors.to(self.device, self.torch_dtype)
        result = torch.zeros_like(vectors)
        step = max(1, vectors_per_pass or lf.vectors_per_pass)
        with evaluation_mode(lf.model):
            for b, (w, x, y) in enumerate(lf._weights()):
                def outputs(variables: dict[str, Tensor], x=x) -> Tensor:
                    return _model_outputs(lf, variables, x)

                z, pullback = torch.func.vjp(outputs, lf._params)
                z = z.detach()
                self.prepare_batch(b, z)

                def column(tangent: dict[str, Tensor], b=b, z=z, y=y, pullback=pullback) -> dict[str, Tensor]:
                    u = torch.func.jvp(outputs, (lf._params,), (tangent,))[1]
                    return pullback(self.output_product(b, z, y, u))[0]

                for start in range(0, vectors.shape[1], step):
                    block = vectors[:, start:start + step]
                    products = torch.func.vmap(column)(lf.unflatten(block))
                    result[:, start:start + block.shape[1]].add_(lf.flatten(products), alpha=w)
        self._count(vectors.shape[1])
        return lf._sum(result)

    def torch_matvec(self, vector: Tensor) -> Tensor:
        return self.torch_matmat(vector.reshape(-1, 1))[:, 0]

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """:math:`(L, \\nabla L)` at the operator's parameters."""
        return self.loss.loss_and_gradient()

    def release(self) -> None:
        """Nothing is kept between products."""

    def dense(self) -> Tensor:
        """The full ``(P, P)`` matrix from ``P`` products with unit vectors (small models only)."""
        eye = torch.eye(self.shape[0], device=self.device, dtype=self.torch_dtype)
        return self.torch_matmat(eye, vectors_per_pass=max(self.loss.vectors_per_pass, 128))

    def _count(self, k: int) -> None:
        self.num_matvecs += k
        if self.callback is not None:
            self.callback(k)

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        return self._matmat(np.asarray(x).reshape(-1, 1)).reshape(-1)

    def _matmat(self, X: np.ndarray) -> np.ndarray:
        vectors = torch.from_numpy(np.ascontiguousarray(X, dtype=self.dtype))
        return self.torch_matmat(vectors).cpu().numpy()

    def _rmatvec(self, x: np.ndarray) -> np.ndarray:
        return self._matvec(x)

    def _rmatmat(self, X: np.ndarray) -> np.ndarray:
        return self._matmat(X)

    def _adjoint(self) -> "OutputCurvatureOperator":
        return self


class GGNOperator(OutputCurvatureOperator):
    """The generalised Gauss-Newton matrix :math:`G = \\sum_b \\frac{n_b}{N} J_b^\\top H_b J_b` (Schraudolph 2002)
    with :math:`H_b = \\nabla_z^2 \\bar\\ell_b(z)` the Hessian of the batch's mean loss with respect to the outputs
    (forward-over-reverse through the criterion). It is the Hessian without the term
    :math:`\\sum_i \\nabla_z \\ell_i \\cdot \\nabla_\\theta^2 z_i` of the network's own curvature, and positive
    semi-definite for a convex criterion. For softmax cross-entropy
    :math:`H = (\\operatorname{diag}(p) - p p^\\top) / n_b` per example, which is also the true Fisher's.
    """

    matrix = "ggn"

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        gradient = torch.func.grad(lambda z: self.loss.criterion(z, targets))
        return torch.func.jvp(gradient, (outputs,), (u,))[1]


def _check_softmax_classifier(loss: LossFunction, what: str) -> None:
    if loss.criterion is not cross_entropy:
        raise ConfigError(f"The {what} is defined here for softmax cross-entropy only; this loss has another "
                          "criterion (use --matrix ggn or hessian).")


class FisherOperator(OutputCurvatureOperator):
    """The (true) Fisher information :math:`F = \\frac1N \\sum_i E_{\\hat y \\sim p(\\cdot | x_i)} [\\nabla_\\theta
    \\log p(\\hat y | x_i) \\nabla_\\theta \\log p(\\hat y | x_i)^\\top]` of the softmax model :math:`p =
    \\operatorname{softmax}(z)`, labels drawn from the model's own predictive distribution.

    - ``samples=None``: the expectation is exact, :math:`E[(e_{\\hat y} - p)(e_{\\hat y} - p)^\\top] =
      \\operatorname{diag}(p) - p p^\\top` per example. That is the Hessian of cross-entropy in the logits, so for
      softmax cross-entropy the true Fisher *equals* the generalised Gauss-Newton matrix (Martens 2020, Sec. 9.2);
    - ``samples=S``: a Monte Carlo estimate with ``S`` labels per example drawn (seeded with ``seed``, once per
      batch, fixed for the operator's lifetime so that it is one symmetric matrix):
      :math:`\\frac{1}{N S} \\sum_{i, s} g_{is} g_{is}^\\top`, :math:`g_{is} = J_i^\\top (e_{\\hat y_{is}} - p_i)`.
    """

    matrix = "fisher"

    def __init__(self, loss: LossFunction, *, samples: int | None = None, seed: int = 0,
                 callback: Callable[[int], Any] | None = None):
        _check_softmax_classifier(loss, "true Fisher")
        if samples is not None and samples < 1:
            raise ConfigError(f"--fisher-samples must be a positive integer, not {samples}.")
        super().__init__(loss, callback=callback)
        self.samples = samples
        self.seed = int(seed)
        self.sampled_labels: dict[int, Tensor] = {}

    def labels(self, batch: int, probabilities: Tensor) -> Tensor:
        """The ``(S, n_b)`` labels drawn for batch ``batch`` (drawn on first use, on the CPU, then kept)."""
        if batch not in self.sampled_labels:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + batch)
            draws = torch.multinomial(probabilities.detach().double().cpu(), self.samples, replacement=True,
                                      generator=generator)
            self.sampled_labels[batch] = draws.T.contiguous()
        return self.sampled_labels[batch].to(probabilities.device)

    def prepare_batch(self, batch: int, outputs: Tensor) -> None:
        if self.samples is not None:  # random draws are not allowed under vmap: the labels are drawn here
            self.labels(batch, torch.softmax(outputs, dim=-1))

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        n = outputs.shape[0]
        p = torch.softmax(outputs, dim=-1)
        if self.samples is None:
            pu = p * u
            return (pu - p * pu.sum(-1, keepdim=True)) / n
        labels = self.labels(batch, p)  # (S, n)
        residual = torch.nn.functional.one_hot(labels, p.shape[-1]).to(p) - p  # (S, n, C)
        return (residual * (residual * u).sum(-1, keepdim=True)).sum(0) / (n * self.samples)


class EmpiricalFisherOperator(OutputCurvatureOperator):
    """The empirical Fisher :math:`\\hat F = \\frac1N \\sum_i g_i g_i^\\top` with :math:`g_i = \\nabla_\\theta
    \\ell(z_i, y_i)` the per-example gradients at the true labels (any criterion that averages over examples).

    Computed as :math:`J^\\top M J` with :math:`M_i = r_i r_i^\\top / n_b`, :math:`r_i = \\nabla_{z_i} \\ell(z_i,
    y_i)` (:math:`n_b` times the gradient of the batch mean with respect to :math:`z_i`), which is the same matrix
    since :math:`g_i = J_i^\\top r_i`. Unlike the Fisher it is not a curvature of the model's likelihood, and it
    vanishes where every example is fitted (Kunstner, Hennig & Balles 2019).
    """

    matrix = "empirical-fisher"

    def output_product(self, batch: int, outputs: Tensor, targets: Tensor, u: Tensor) -> Tensor:
        n = outputs.shape[0]
        residual = n * torch.func.grad(lambda z: self.loss.criterion(z, targets))(outputs)
        return residual * (residual * u).sum(-1, keepdim=True) / n


def curvature_operator(loss: LossFunction, matrix: str = "hessian", *, callback: Callable[[int], Any] | None = None,
                       product: str = "auto", fisher_samples: int | None = None, seed: int = 0) -> Any:
    """The operator of ``matrix`` (one of :data:`MATRICES`) for ``loss``: :class:`HessianOperator` (with
    ``product``), :class:`GGNOperator`, :class:`FisherOperator` (exact, or ``fisher_samples`` labels per example
    drawn with ``seed``) or :class:`EmpiricalFisherOperator`."""
    if matrix == "hessian":
        return HessianOperator(loss, callback=callback, product=product)
    if matrix == "ggn":
        return GGNOperator(loss, callback=callback)
    if matrix == "fisher":
        return FisherOperator(loss, samples=fisher_samples, seed=seed, callback=callback)
    if matrix == "empirical-fisher":
        return EmpiricalFisherOperator(loss, callback=callback)
    raise ConfigError(f"Unknown curvature matrix {matrix!r}; accepted are {', '.join(MATRICES)}.")


# -- evaluation data of a run -------------------------------------------------------------------------------------
def analysis_data_for_run(
    run: Any,
    samples: int,
    *,
    seed: int = 0,
    split: str = "train",
    dataset: str | None = None,
    data_dir: Any = None,
    img_size: int | None = None,
    classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The fixed evaluation set of a run: ``samples`` examples of its dataset, seeded, in a fixed order.

    The dataset (name, image size, synthetic options) comes from the run's ``config.yaml`` (``data.name``,
    ``data.img_size``, ``data.options``) unless ``dataset`` / ``img_size`` / ``classes`` are given; synthetic data
    takes the model's channels, image size and classes where they are not given. Before anything is loaded the
    data is checked against the model's input channels, image size and classes
    (:func:`landscape.data.check_data_fits`). Returns ``x`` float32 ``(N, C, H, W)`` normalised with the
    evaluation transform and ``y`` int64 ``(N,)`` (:func:`landscape.data.analysis_subset`).
    """
    from landscape.data import analysis_subset, check_data_fits

    name, img_size, options, facts = _resolve_analysis_data(run, dataset, img_size, classes)
    check_data_fits(name, img_size=img_size, options=options, data_dir=data_dir, **facts)
    if name == "synthetic":
        options.setdefault("count", max(samples, 1024))
    x, y = analysis_subset(name, samples, seed=seed, split=split, data_dir=data_dir, img_size=img_size, **options)
    if len(y) < samples:  # a smaller set than asked for would be recorded under the larger number
        raise LandscapeError(f"--samples {samples} is more than the {len(y)} examples of the {split} split of "
                             f"{name}; give --samples {len(y)} or fewer.")
    if facts["model_classes"] is not None and len(y) and int(y.max()) >= facts["model_classes"]:
        raise LandscapeError(f"{name} has labels up to {int(y.max())}, but the model predicts "
                             f"{facts['model_classes']} classes; give a dataset of {facts['model_classes']} classes "
                             "with --data, or --data synthetic.")
    return x, y


def analysis_data_attrs(run: Any, dataset: str | None = None, img_size: int | None = None,
                        classes: int | None = None) -> dict[str, Any]:
    """What a results file's evaluation data is, for its attrs: ``data`` (name), ``data_img_size``,
    ``data_options`` and, for synthetic data, ``data_note`` saying that it is not the model's own data."""
    name, size, options, _ = _resolve_analysis_data(run, dataset, img_size, classes)
    attrs: dict[str, Any] = {"data": name, "data_img_size": size if size is not None else "", "data_options": options}
    if name == "synthetic":
        attrs["data_note"] = ("synthetic data: seeded class prototypes plus Gaussian noise of the model's input "
                              "shape, not the data the model was trained on; no dataset was read")
    return attrs


def _resolve_analysis_data(run: Any, dataset: str | None, img_size: int | None,
                           classes: int | None) -> tuple[str, int | None, dict[str, Any], dict[str, Any]]:
    """``(dataset name, image size, synthetic options, model facts)`` for the evaluation data of ``run``."""
    from landscape.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    data = run.load_config().get("data") or {}
    name = dataset or data.get("name")
    if not name:
        raise LandscapeError(
            f"Run {run.root} does not say which dataset it was trained on (no data.name in config.yaml); "
            "name the dataset with --data (--data synthetic needs no files)."
        )
    if classes is not None and name != "synthetic":
        raise LandscapeError(f"--classes sets the classes of synthetic data only; {name} has its own classes.")
    from_config = not dataset or dataset == data.get("name")
    if img_size is None and from_config:
        img_size = data.get("img_size")
    options: dict[str, Any] = {}
    if name == "synthetic" and from_config and isinstance(data.get("options"), dict):
        options = dict(data["options"])
        img_size = img_size or options.get("img_size")
        options.pop("img_size", None)
    facts = run_model_facts(run)
    if name == "synthetic":
        options.setdefault("in_chans", facts["model_in_chans"] or 1)
        if classes is not None:
            options["num_classes"] = classes
        options.setdefault("num_classes", facts["model_classes"] or 10)
        img_size = img_size or facts["model_img_size"]
    return name, img_size, options, facts


def run_model_facts(run: Any) -> dict[str, int | None]:
    """The input channels, image size and classes of the model of ``run``'s last checkpoint (``None`` where the
    model does not say: a model taking any image size, or a run without checkpoints), built on the meta device."""
    import torch

    from landscape.checkpoints import architecture_kwargs
    from landscape.models import create_model

    facts: dict[str, int | None] = {"model_in_chans": None, "model_img_size": None, "model_classes": None}
    infos = run.checkpoints()
    if not infos:
        return facts
    try:
        kwargs = architecture_kwargs(infos[-1].model_kwargs, source=f"The header of {infos[-1].path}")
        with torch.device("meta"):
            model = create_model(infos[-1].model, **kwargs)
    except Exception:  # noqa: BLE001  (loading the checkpoint reports an unbuildable model in one sentence)
        return facts
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    facts["model_in_chans"] = conv.in_channels if conv is not None else None
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None and getattr(patch_embed, "strict_img_size", True) and not getattr(
            patch_embed, "dynamic_img_size", False):
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        facts["model_img_size"] = int(size[0]) if len(set(size)) == 1 else None
    num_classes = getattr(model, "num_classes", None)
    facts["model_classes"] = int(num_classes) if isinstance(num_classes, int) and num_classes > 0 else None
    return facts


def evaluation_data(run: Any, settings: Any, data_dir: Any = None, results: Any = None) -> tuple[Tensor, Tensor]:
    """:func:`analysis_data_for_run` for an analysis's settings (``samples``, ``seed``, ``split``, ``dataset``,
    ``img_size``, ``classes``); the data's description (:func:`analysis_data_attrs`) goes into the attrs of
    ``results`` (an :class:`~landscape.analyses.results.AnalysisResults`, or ``None`` off the main process)."""
    from landscape.analyses.results import netcdf_attrs

    data = dict(dataset=settings.dataset, img_size=getattr(settings, "img_size", None),
                classes=getattr(settings, "classes", None))
    x, y = analysis_data_for_run(run, settings.samples, seed=settings.seed, split=settings.split,
                                 data_dir=data_dir, **data)
    if results is not None:
        results.attrs.update(netcdf_attrs(analysis_data_attrs(run, **data)))
    return x, y

"""The loss of a model over a fixed evaluation set, as a function of a subset of its parameters.

A :class:`LossFunction` binds a model to a fixed evaluation set :math:`\\{(x_i, y_i)\\}_{i=1}^N` and a subset
:math:`\\theta` of its parameters, and computes the mean loss

.. math::  L(\\theta) = \\frac{1}{N} \\sum_b n_b \\, \\bar\\ell_b(\\theta),

where :math:`\\bar\\ell_b` is the mean loss of batch :math:`b` of size :math:`n_b` (the last, short batch counts
with its true weight), its gradient :math:`\\nabla L`, the loss and accuracy at other weights (:meth:`~LossFunction.evaluate`),
and Hessian-vector products :math:`H v = \\nabla^2 L \\, v` with :math:`H \\in \\mathbb{R}^{P \\times P}`, :math:`P`
the number of selected parameters (computed by the strategies of :mod:`landscape.curvature.products`).

- Evaluation mode, no augmentation, a fixed order. The model is never changed: parameters are swapped in
  functionally (:func:`torch.func.functional_call`), the train/eval flags are restored afterwards.
- Fused attention kernels have neither a double-backward nor a forward-mode rule; every derivative here runs under
  the math kernel of :func:`torch.nn.functional.scaled_dot_product_attention`, switched on inside.
- Parameters with ``requires_grad=False`` and parameters the loss does not reach on the evaluation set are
  skipped. A parameter shared by several modules (the same tensor under several names) is one parameter,
  named by its first name in ``model.named_parameters()``.
- On several processes (``data_parallel``, see :mod:`landscape.analyses.distributed`) each holds a contiguous slice
  of the evaluation set, weights its batches by :math:`n_b / N` with the whole set's :math:`N` (by their share of
  the counted targets for a cross-entropy with ``ignore_index`` or class weights, :func:`example_weights`), and sums every
  loss, count, gradient and product over the processes: each sees the whole set's :math:`L`, :math:`\\nabla L`
  and :math:`H v`, up to the order of summation.

Vectors come in two forms: a dict ``{name: tensor}`` shaped like the parameters, or a flat tensor of shape
``(P,)`` in the order of :attr:`LossFunction.names` (:meth:`LossFunction.flatten` / :meth:`~LossFunction.unflatten`).
Several vectors are the columns of a ``(P, k)`` matrix, as in :class:`scipy.sparse.linalg.LinearOperator`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from landscape.errors import ConfigError, LandscapeError, caller_stacklevel

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
    - a regular expression after ``re:``, searched in the name: ``"re:blocks\\.(0|1)\\..*qkv"``; commas inside
      its ``{...}`` or ``[...]`` (``"re:blocks\\.[0-9]{1,2}\\.mlp"``) or escaped (``\\,``) do not cut it.

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
    for part in (p.strip() for p in _split_alternatives(pattern)):
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


def _split_alternatives(pattern: str) -> list[str]:
    """``pattern`` cut at its commas, except those inside ``{...}`` or ``[...]`` or after a backslash: a regular
    expression's ``{1,2}`` and ``[,;]`` stay whole (they were cut into a literal ``{1`` and a prefix ``2}``)."""
    parts, current, depth, escaped = [], [], 0, False
    for c in pattern:
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c in "{[":
            depth += 1
        elif c in "}]" and depth:
            depth -= 1
        elif c == "," and not depth:
            parts.append("".join(current))
            current = []
            continue
        current.append(c)
    return parts + ["".join(current)]


def unflatten_vector(vector: Tensor, shapes: Mapping[str, torch.Size | tuple[int, ...]]) -> dict[str, Tensor]:
    """Split a ``(P,)`` vector into views shaped like ``shapes`` (the concatenation of the flattened tensors, in
    the order of ``shapes``)."""
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
    # tensors after the call (pytorch issue 164759); the shared module is swapped once either way. A tensor held by
    # two modules (head.weight = emb.weight) is passed under each of its names, so that every use sees it.
    tensors = dict(tensors)
    for alias, name in tied_aliases(model).items():
        if name in tensors and alias not in tensors:
            tensors[alias] = tensors[name]
    return model_outputs(torch.func.functional_call(model, tensors, args, kwargs, tie_weights=False))


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{other name: first name}`` of every parameter or buffer that two different modules hold (an output layer
    tied to the embedding: ``head.weight = emb.weight``). The names of one module reachable under several paths (a
    GroupedMLP's shared MLP) are not listed: swapping that module's tensor once reaches every path."""
    modules = dict(model.named_modules(remove_duplicate=False))
    aliases: dict[str, str] = {}
    for named in (model.named_parameters, model.named_buffers):
        seen: dict[int, tuple[str, set[int]]] = {}
        for name, tensor in named(remove_duplicate=False):
            owner = id(modules[name.rpartition(".")[0]])
            if id(tensor) not in seen:
                seen[id(tensor)] = (name, {owner})
                continue
            first, owners = seen[id(tensor)]
            if owner not in owners:
                owners.add(owner)
                aliases[name] = first
    return aliases


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

    Derivatives of any order need the math kernel, and ``nn.MultiheadAttention`` in eval mode takes torch's fused
    fast path, which has no forward-mode derivative (the GGN's and Fisher's products ended in torch's
    NotImplementedError): both are off for the duration. Plain loss evaluation (``math_attention=False``) keeps the
    fused kernels, which are faster and give the same values up to rounding.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    flags = [(m, m.training) for m in model.modules()]
    mha = getattr(torch.backends, "mha", None)
    fast_path = mha.get_fastpath_enabled() if mha is not None and math_attention else None
    model.eval()
    try:
        if fast_path:
            mha.set_fastpath_enabled(False)
        with sdpa_kernel(SDPBackend.MATH) if math_attention else contextlib.nullcontext():
            yield model
    finally:
        if fast_path:
            mha.set_fastpath_enabled(True)
        for m, training in flags:
            m.training = training


def cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """The default criterion: mean cross-entropy of class logits ``(n, C)`` against integer targets ``(n,)``."""
    return torch.nn.functional.cross_entropy(logits, targets)


def describe_criterion(criterion: Any) -> str:
    """A criterion in words precise enough to tell two apart: ``cross_entropy`` for the default, a loss module
    with its settings (``CrossEntropyLoss(reduction='mean', ignore_index=-100, label_smoothing=0.1)``), a
    ``functools.partial`` with its arguments, a function by its module and name."""
    import functools

    if criterion is None or criterion is cross_entropy:
        return "cross_entropy"
    if isinstance(criterion, functools.partial):
        arguments = [repr(a) for a in criterion.args] + [f"{k}={v!r}" for k, v in criterion.keywords.items()]
        return f"{describe_criterion(criterion.func)}({', '.join(arguments)})"
    if isinstance(criterion, nn.Module):
        fields = [f"{k}={v!r}" for k, v in vars(criterion).items()
                  if not k.startswith("_") and k != "training" and isinstance(v, (bool, int, float, str, type(None)))]
        tensors = [f"{n}=<tensor of {b.numel()}>" for n, b in criterion.named_buffers() if b is not None]
        return f"{type(criterion).__name__}({', '.join(fields + tensors)})"
    name = getattr(criterion, "__qualname__", None) or getattr(criterion, "__name__", None) or type(criterion).__name__
    module = getattr(criterion, "__module__", None)
    return f"{module}.{name}" if module and module not in ("__main__", "builtins") else name


def _is_cross_entropy(criterion: Any) -> bool:
    import functools

    if isinstance(criterion, functools.partial):
        return _is_cross_entropy(criterion.func)
    return (criterion is None or criterion is cross_entropy or criterion is torch.nn.functional.cross_entropy
            or isinstance(criterion, torch.nn.CrossEntropyLoss))


def loss_attrs(criterion: Any) -> dict[str, str]:
    """``long_name`` (and ``units``) of a measured mean loss: the default criterion is cross-entropy without label
    smoothing, whatever the run trained with; another is named by :func:`describe_criterion`, in nats when it is a
    cross-entropy (smoothed or weighted too), else in the loss's own units."""
    if criterion is None or criterion is cross_entropy:
        return {"long_name": "mean cross-entropy on the evaluation set (no label smoothing)", "units": "nats"}
    attrs = {"long_name": f"mean {describe_criterion(criterion)} on the evaluation set (the loss given)"}
    if _is_cross_entropy(criterion):
        attrs["units"] = "nats"
    return attrs


NOT_A_MEAN = 0.05
"""Relative gap between a criterion on a batch and the count-weighted mean of it on the batch's halves above which
it is refused as not a mean (a sum gives 1, i.e. 100%)."""
NEARLY_A_MEAN = 1e-4
"""Above this gap (float32 rounding is about 1e-7) a criterion is a mean over something else than the examples:
warned about."""


def example_weights(criterion: Any, y: Tensor) -> Tensor | None:
    """What each example counts for in the criterion's mean, when the criterion says so: ``(N,)`` float64 weights
    for cross-entropy (the default, :class:`torch.nn.CrossEntropyLoss`, :class:`torch.nn.NLLLoss`, their functions
    and ``functools.partial`` of them with keywords; mean reduction)
    on class-index targets, each example counting the class weights of its targets (1 each without ``weight``) and
    0 for a target equal to ``ignore_index``; ``None`` for any other criterion or targets.

    Such a criterion's batch value is :math:`\\sum_{i \\in b} c_i \\ell_i / C_b` with :math:`C_b = \\sum_{i \\in b} c_i`,
    so the whole set's mean loss is :math:`\\sum_b (C_b / C)\\, \\bar\\ell_b`: batches weighted by their counted
    weight, not their number of examples, give every result independent of ``batch_size``."""
    functional = (torch.nn.functional.cross_entropy, torch.nn.functional.nll_loss)
    if criterion is cross_entropy or criterion in functional:
        weight, ignore = None, -100
    elif (isinstance(criterion, functools.partial) and criterion.func in functional and not criterion.args
          and criterion.keywords.get("reduction", "mean") == "mean"):  # partial(F.cross_entropy, ignore_index=0)
        weight, ignore = criterion.keywords.get("weight"), int(criterion.keywords.get("ignore_index", -100))
    elif (isinstance(criterion, (nn.CrossEntropyLoss, nn.NLLLoss)) and criterion.reduction == "mean"
          and type(criterion).forward in (nn.CrossEntropyLoss.forward, nn.NLLLoss.forward)):  # not a subclass's own
        weight, ignore = criterion.weight, int(criterion.ignore_index)
    else:
        return None
    if not isinstance(y, Tensor) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool or y.dim() == 0:
        return None
    targets = y.detach().reshape(len(y), -1).cpu().long()
    kept = targets != ignore
    if weight is None:
        return kept.sum(1).double()
    weight = weight.detach().cpu().double()
    classes = targets.clamp(0, len(weight) - 1)  # a target outside the classes is refused where it is read
    return (weight[classes] * kept).sum(1)


def counted_batches(whole: Tensor, counted: Tensor, batch_size: int) -> tuple[float, list[float]]:
    """``(C, [C_b])``: the whole set's counted weight and each batch's (:func:`example_weights` of the whole set and
    of the examples batched here), refusing a set or a batch that counts nothing: its mean loss is 0/0."""
    total = float(whole.sum())
    if not total > 0:
        raise LandscapeError("Every target of the evaluation set is ignored (ignore_index) or of a class weighted 0, "
                             "so its mean loss is NaN; give examples with targets the loss counts.")
    shares = [float(counted[start:start + batch_size].sum()) for start in range(0, len(counted), batch_size)]
    for b, share in enumerate(shares):
        if not share > 0:
            start = b * batch_size
            raise LandscapeError(
                f"Every target of examples {start} to {min(start + batch_size, len(counted)) - 1} (a batch of "
                f"batch_size={batch_size}) is ignored (ignore_index) or of a class weighted 0, so that batch's mean "
                "loss is NaN; give examples with targets the loss counts, or a batch_size that mixes them with the "
                "others.")
    return total, shares


def check_mean_criterion(model: nn.Module, x: Inputs, y: Tensor, criterion: LossCriterion, *, examples: int = 64) -> bool:
    """Refuse a criterion that cannot take the model's outputs and the targets, or is not one number, the mean over
    the batch's examples.

    Every measurement weights batch ``b``'s criterion value by :math:`n_b / N` (by its counted targets for the
    cross-entropies :func:`example_weights` knows), which is the mean loss of the whole set only if the criterion
    is such a per-batch mean. A sum (``reduction="sum"``) or a mean over a count the loss hides would make the
    eigenvalues, trace and loss depend on ``batch_size``, silently. Checked on the first ``examples``
    examples: the criterion on them must equal the count-weighted mean of its values on their two halves. Returns
    whether it warned of a mean over a count the loss does not say.
    """
    n = min(num_inputs(x), len(y), examples)
    first = next(iter(model.parameters()))
    xb, yb = inputs_to(slice_inputs(x, 0, n), first.device, first.dtype), y[:n].to(first.device)
    yb = yb.to(first.dtype) if yb.is_floating_point() else yb
    with evaluation_mode(model), torch.no_grad():
        outputs = forward(model, xb)
        try:
            whole = criterion(outputs, yb)
        except (RuntimeError, ValueError, TypeError, IndexError) as e:  # shapes or types the loss does not take
            reason = " ".join(str(e).split()).rstrip(".")[:200] or type(e).__name__
            raise LandscapeError(
                f"The loss cannot take the model's outputs {tuple(outputs.shape)} and targets {tuple(yb.shape)} "
                f"({yb.dtype}): {reason}. (A model returning a tuple is measured on its first element.)") from None
        if not isinstance(whole, Tensor):
            raise LandscapeError(f"The loss returned a {type(whole).__name__}, not a torch tensor: it must be computed "
                                 "from the outputs with torch (its gradient is taken), returning the batch mean as a "
                                 "0-d tensor.")
        if whole.numel() != 1:
            raise LandscapeError(f"The loss returned a tensor of shape {tuple(whole.shape)}, not one number; give a "
                                 "loss that returns the mean over the batch (reduction='mean').")
        if whole.dim() != 0:
            raise LandscapeError(f"The loss returned a tensor of shape {tuple(whole.shape)}, not a 0-d tensor (its "
                                 "gradient needs a scalar); return its one element, e.g. with .reshape(()).")
        if not whole.is_floating_point():
            raise LandscapeError(f"The loss returned a {whole.dtype} tensor; give a real floating-point loss.")
        gap = mean_gap(criterion, outputs, yb)
    if gap is None:
        return False
    gap, whole, halves = gap
    if gap > NOT_A_MEAN:  # a sum doubles it
        raise LandscapeError(
            f"The loss is not a mean over the batch's examples: on {n} examples it gives {whole:.6g}, while the mean "
            f"of its values on their two halves is {halves:.6g}. A sum would make every result scale with the batch "
            "size; give a loss with reduction='mean'.")
    if gap > NEARLY_A_MEAN:  # a mean over a count it does not say (a custom loss): batch_size matters a little
        warn_uneven_mean(n, whole, halves)
        return True
    return False


def mean_gap(criterion: LossCriterion, outputs: Tensor, yb: Tensor) -> tuple[float, float, float] | None:
    """``(relative gap, value, halves)``: the criterion on a batch's ``outputs`` against the mean of its values on
    the batch's two halves, weighted as the batches will be (:func:`example_weights`, else by examples); ``None``
    when there is nothing to compare (one example, a half counting nothing, a value not finite)."""
    n = len(yb)
    if n < 2 or len(outputs) != n:
        return None
    with torch.no_grad():
        whole = criterion(outputs, yb)
        k = n // 2
        counted = example_weights(criterion, yb)  # what the batches will be weighted by
        first, second = (k, n - k) if counted is None else (float(counted[:k].sum()), float(counted[k:].sum()))
        if first <= 0 or second <= 0:  # a half of ignored targets only: nothing to compare
            return None
        try:
            halves = (first * criterion(outputs[:k], yb[:k]) + second * criterion(outputs[k:], yb[k:])) / (first + second)
            whole, halves = float(whole), float(halves)
        except (RuntimeError, ValueError, TypeError, IndexError):  # a loss that needs more examples than a half
            return None
    if not (math.isfinite(whole) and math.isfinite(halves)):
        return None
    return abs(whole - halves) / max(abs(whole), abs(halves), 1e-6), whole, halves


def warn_uneven_mean(n: int, whole: float, halves: float) -> None:
    """The warning for a loss whose batch mean is over a count it does not say (see :func:`check_mean_criterion`)."""
    import warnings

    warnings.warn(
        f"The loss is a mean over something other than the batch's examples (ignore_index or class weights in a "
        f"loss other than a CrossEntropyLoss or NLLLoss module?): on "
        f"{n} examples it gives {whole:.6g}, the count-weighted mean of its halves {halves:.6g}. Batches are "
        "weighted by their number of examples, so results depend slightly on batch_size; for exact results give "
        "a loss that is a plain mean over examples, or one batch (batch_size >= the examples).",
        stacklevel=caller_stacklevel())


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
            gradient pass when the closure is made). Either way a parameter the forward reads around its attribute
            (which ``functional_call`` cannot replace) is refused, checked on one batch unless ``swap_checked``
            (a closure of a model another closure has checked already).
        data_parallel: ``x, y`` are this process's slice of a larger evaluation set split over several processes
            (:class:`landscape.analyses.distributed.DataParallel`): batches are weighted by
            :math:`n_b / N` with the whole set's :math:`N` (:meth:`batch_weights`), and every loss, accuracy count, gradient and
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
        swap_checked: bool = False,
    ):
        self.model = model
        self.data = EvaluationSet(x, y, batch_size)
        self.data_parallel = data_parallel
        self.num_examples = data_parallel.num_examples if data_parallel is not None else len(self.data)
        self.criterion = criterion
        self._batch_weights = self._counted_batch_weights()
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
            self._check_unswapped(selected, unused)
            for n in unused:
                self._fixed[n] = selected.pop(n).detach()
            if not selected:
                raise LandscapeError(
                    f"None of the parameters matching {self.pattern!r} influences the loss on the evaluation set."
                )
            self.skipped = unused
        else:  # every parameter moves (a surface): still none may be read around its attribute
            if data_parallel is None and not swap_checked:
                reached = self._reached_parameters({n: p.detach() for n, p in selected.items()}, batches=1)
                self._check_unswapped(selected, [n for n in selected if n not in reached])
            self.skipped = []
        self.frozen = [n for n, p in canonical.items() if not p.requires_grad]
        self.left_out = {n: canonical[n].numel() for n in self.frozen + self.skipped}
        """Parameters left out, with their sizes: frozen ones (``requires_grad=False``) and those that do not reach
        the loss (:attr:`skipped`)."""
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

    # -- what the product strategies and curvature operators build on -------------------------------------------
    def batch_loss(self, variables: dict[str, Tensor], x: Tensor, y: Tensor, fixed: dict[str, Tensor] | None = None) -> Tensor:
        """The mean loss :math:`\\bar\\ell_b` of one batch ``(x, y)`` (from :meth:`weighted_batches`) at the selected
        parameters' values ``variables``, the others at their own values (or at ``fixed``)."""
        tensors = {**(self._fixed if fixed is None else fixed), **variables}
        return self.criterion(forward(self.model, x, tensors), y)

    def batch_outputs(self, variables: dict[str, Tensor], x: Tensor) -> Tensor:
        """The model's outputs :math:`z_b` on one batch's inputs ``x`` at the selected parameters' values
        ``variables`` (the others at their own values)."""
        return forward(self.model, x, {**self._fixed, **variables})

    def weighted_batches(self) -> Iterator[tuple[float, Tensor, Tensor]]:
        """``(w_b, x_b, y_b)`` for each batch, on the model's device (floating-point tensors in its dtype), with
        :math:`\\sum_b w_b \\bar\\ell_b` the whole set's mean loss (:meth:`batch_weights`)."""
        for w, (xb, yb) in zip(self.batch_weights(), self.data.batches()):
            x, y = self._batch(xb, yb)
            yield w, x, y

    def batch_weights(self) -> list[float]:
        """Each batch's weight: :math:`n_b / N`, or for a criterion whose mean counts targets otherwise
        (``ignore_index``, class weights: :func:`example_weights`) :math:`C_b / C`, its share of the counted weight.
        """
        if self._batch_weights is not None:
            return self._batch_weights
        n = self.num_examples
        return [len(yb) / n for _, yb in self.data.batches()]

    def _counted_batch_weights(self) -> list[float] | None:
        """:math:`C_b / C` per batch when :func:`example_weights` applies and the examples do not all count the
        same (then :math:`n_b / N` is the same weighting); ``C`` over the whole set, every process's slice of it
        with ``data_parallel`` (whose ``targets`` are the whole set's). A batch that counts nothing has a NaN mean
        (0/0) and is refused, as is a set that counts nothing."""
        counted = example_weights(self.criterion, self.data.y)
        if counted is None:
            return None
        whole = counted
        if self.data_parallel is not None:
            targets = getattr(self.data_parallel, "targets", None)
            whole = example_weights(self.criterion, targets) if targets is not None else None
            if whole is None:
                return None
        total, shares = counted_batches(whole, counted, self.data.batch_size)
        if bool((whole == whole[0]).all()):
            return None
        return [share / total for share in shares]

    def _check_unswapped(self, selected: dict[str, Tensor], unused: list[str]) -> None:
        """Refuse parameters that reach the loss in the model's own forward but not when swapped in by
        ``functional_call`` (the forward reads them through a Python list or a copy kept outside the module's
        parameters): left out as "not reaching the loss", the Hessian would silently lose their rows."""
        candidates = [n for n in unused if selected[n].requires_grad]
        if not candidates:
            return
        with evaluation_mode(self.model), torch.enable_grad():
            for _, x, y in self.weighted_batches():
                loss = self.criterion(forward(self.model, x), y)
                grads = torch.autograd.grad(loss, [selected[n] for n in candidates], allow_unused=True)
                hidden = [n for n, g in zip(candidates, grads) if g is not None and bool(g.ne(0).any())]
                if hidden:
                    raise LandscapeError(
                        f"The model's forward reads {', '.join(hidden[:3])}{' and others' if len(hidden) > 3 else ''} "
                        "other than through its module attribute (a Python list or a copy of the tensor, say), so "
                        "torch.func.functional_call cannot replace it and its curvature cannot be measured; let the "
                        "forward use the parameter attribute itself.")
                break

    def _reached_parameters(self, variables: dict[str, Tensor], batches: int | None = None) -> set[str]:
        """The names of ``variables`` the loss reaches through ``functional_call`` on the evaluation set (on its
        first ``batches`` batches only, when given)."""
        leaves = {n: t.clone().requires_grad_(True) for n, t in variables.items()}
        reached: set[str] = set()
        with evaluation_mode(self.model), torch.enable_grad():
            for i, (_, x, y) in enumerate(self.weighted_batches()):
                loss = self.batch_loss(leaves, x, y)
                grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                reached.update(n for n, g in zip(leaves, grads) if g is not None)
                if len(reached) == len(leaves) or (batches is not None and i + 1 >= batches):
                    break
        if self.data_parallel is not None:  # reached on any process's slice is reached on the whole set
            mask = self.all_reduce(torch.tensor([float(n in reached) for n in leaves], device=self.device))
            reached = {n for n, hit in zip(leaves, mask.tolist()) if hit > 0}
        return reached

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed over the processes of a data-parallel evaluation set (unchanged for one process)."""
        return tensor if self.data_parallel is None else self.data_parallel.all_reduce(tensor)

    def all_reduce_scalars(self, *values: float) -> list[float]:
        if self.data_parallel is None:
            return list(values)
        return self.all_reduce(torch.tensor(values, dtype=torch.float64, device=self.device)).tolist()

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
            total, correct = _evaluate_module(params, self.data, self.criterion, self.batch_weights())
            total, correct = self.all_reduce_scalars(total, correct)
            return total, 100.0 * correct / self.num_examples
        variables, fixed = self._split_params(params)
        full = {**fixed, **variables}
        total, correct = 0.0, 0.0
        with evaluation_mode(self.model, math_attention=False), torch.no_grad():
            for w, x, y in self.weighted_batches():
                outputs = forward(self.model, x, full)
                total += w * float(self.criterion(outputs, y))
                correct += _num_correct(outputs, y)
        total, correct = self.all_reduce_scalars(total, correct)
        return total, 100.0 * correct / self.num_examples

    def loss_and_gradient(self, params: Mapping[str, Tensor] | Tensor | None = None) -> tuple[float, Tensor]:
        """:math:`(L(\\theta), \\nabla L(\\theta))`, the gradient as a ``(P,)`` vector."""
        variables, fixed = self._split_params(params)
        grad_and_value = torch.func.grad_and_value(self.batch_loss)
        total, gradient = 0.0, None
        with evaluation_mode(self.model):
            for w, x, y in self.weighted_batches():
                g, value = grad_and_value(variables, x, y, fixed)
                total += w * float(value)
                gradient = add_scaled(gradient, g, w)
        return self.all_reduce_scalars(total)[0], self.all_reduce(self.flatten(gradient))

    def gradient(self, params: Mapping[str, Tensor] | Tensor | None = None) -> Tensor:
        """:math:`\\nabla L(\\theta)` as a ``(P,)`` vector."""
        return self.loss_and_gradient(params)[1]

    def columnwise(self, matmat: Callable[[Tensor], Tensor], v: Tensor | Mapping[str, Tensor]
                   ) -> Tensor | dict[str, Tensor]:
        """``matmat`` (``(P, k)`` -> ``(P, k)``) applied to ``v`` given as ``(P,)``, ``(P, k)`` or a dict."""
        if isinstance(v, Mapping):
            return self.unflatten(self.columnwise(matmat, self.flatten(v)))
        v = v.to(self.device, self.dtype)
        return matmat(v[:, None])[:, 0] if v.dim() == 1 else matmat(v)

    def differentiable_parameters(self) -> dict[str, Tensor]:
        """Fresh copies of the selected parameters that require grad, to build a differentiable graph on."""
        return {n: t.clone().requires_grad_(True) for n, t in self._params.items()}



def left_out_variable(loss: "LossFunction") -> tuple:
    """The results variable ``num_parameters_left_out``: how many parameters the measure leaves out (frozen, or not
    reaching the loss), their names in its ``names`` attribute."""
    return ((), int(sum(loss.left_out.values())), {
        "long_name": "parameters left out: frozen (requires_grad False) or not reaching the loss",
        "names": ", ".join(loss.left_out) or "none"})


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


def add_scaled(total: dict[str, Tensor] | None, value: dict[str, Tensor], weight: float) -> dict[str, Tensor]:
    if total is None:
        return {n: weight * t for n, t in value.items()}
    return {n: total[n] + weight * t for n, t in value.items()}


def _num_correct(outputs: Tensor, targets: Tensor) -> float:
    """Examples whose top class is the target's (class indices, or the most likely class of probability targets of
    the outputs' shape); NaN where there are no classes to compare."""
    if outputs.dim() != 2:
        return float("nan")
    if targets.dim() == 2 and targets.is_floating_point() and targets.shape == outputs.shape:
        rows = targets.sum(1)
        if bool((targets >= 0).all()) and bool(torch.allclose(rows, torch.ones_like(rows), atol=1e-4)):
            return float((outputs.argmax(dim=1) == targets.argmax(dim=1)).sum())  # class probabilities
        return float("nan")  # regression targets: no classes
    if targets.dim() != 1 or targets.is_floating_point():
        return float("nan")
    return float((outputs.argmax(dim=1) == targets).sum())


def _evaluate_module(model: nn.Module, data: EvaluationSet, criterion: LossCriterion, weights: list[float]
                     ) -> tuple[float, float]:
    """``(sum over batches of weight * mean loss, number correct)`` of ``model`` on ``data``."""
    first = next(iter(model.parameters()))
    total, correct = 0.0, 0.0
    with evaluation_mode(model, math_attention=False), torch.no_grad():
        for w, (xb, yb) in zip(weights, data.batches()):
            x = inputs_to(xb, first.device, first.dtype)
            y = yb.to(first.device)
            y = y.to(first.dtype) if y.is_floating_point() else y
            outputs = forward(model, x)
            total += w * float(criterion(outputs, y))
            correct += _num_correct(outputs, y)
    return total, correct

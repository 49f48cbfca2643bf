"""The notebook API: measure any ``nn.Module`` on any data, in one call each.

::

    import landscape as ls

    ds = ls.hessian(model, loader, top_k=3, trace=True)      # a DataLoader, an (x, y) pair or batches
    ds = ls.sharpness(model, (x, y), rho=[0.01, 0.05], m=16)
    ds = ls.surface(model, loader, dims=2, points=21)         # a 1D or 2D slice in one call
    run = ls.load_run("runs/NAME")                            # a run directory and its results
    fig = ls.figure("hessian_vs_epoch", [run, other_run])     # runs, or Datasets in memory

Each measurement returns the Dataset that ``landscape analyze`` writes for one checkpoint (the same variables,
coordinates and attrs: the analysis name, its settings as JSON, the seed and the library versions), computed by
the same functions. What the command line reads from a run (the model, the evaluation set) is given here
directly:

- ``data``: a :class:`torch.utils.data.DataLoader` or any iterable of batches, or one ``(inputs, targets)`` pair.
  A batch is ``(inputs, targets)`` or a dict whose ``labels`` (or ``label``, ``targets``, ``target``, ``y``)
  entry holds the targets and whose other entries are the inputs. The batches are read once, in their order,
  and concatenated: the evaluation set is fixed (a shuffling loader gives one fixed draw). ``samples`` keeps the
  first examples only.
- inputs are a tensor or a dict of tensors passed as keyword arguments (``model(pixel_values=...)``); a model
  output with ``.logits`` (Hugging Face) is reduced to its logits.
- ``loss``: any ``loss(outputs, targets) -> mean over the batch`` (cross-entropy by default; e.g.
  :func:`torch.nn.functional.mse_loss` for regression).
- a bfloat16 or float16 model is measured in float32 (a copy; the model is not changed) with a warning and the
  attr ``precision_note``: second-order quantities in 8 mantissa bits are mostly rounding noise. A model whose
  parameters mix precisions is measured as a copy in the widest of them (float64 if any), with the same note.
- the model is measured in eval mode, as every analysis of a checkpoint is, so that the loss is one function of
  the weights: BatchNorm uses its running statistics and dropout (and drop-path) is off. A model given in train
  mode with such layers gets a warning and the attr ``mode_note``; its train flags and running statistics are left
  as they were.
- the loss given is recorded with its settings (``CrossEntropyLoss(..., label_smoothing=0.1)``) in the attrs and
  in ``settings``, so that results of two losses are told apart.

Settings that cannot apply are refused in one sentence (:class:`~landscape.errors.LandscapeError`).
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import functools
import re
import warnings
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from landscape.errors import ConfigError, LandscapeError, caller_stacklevel

TARGET_KEYS = ("labels", "label", "targets", "target", "y")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _without_jit_warning(measure: Callable) -> Callable:
    """``measure`` with torch's ``torch.jit.script`` deprecation warning off while it runs, and only then.

    torch's own forward-mode rules use torch.jit.script on first use, which warns that it is deprecated: nothing a
    caller can act on, printed many times by a GGN or Fisher product (the CLI filters it too). The caller's own
    code keeps the warning outside these calls."""

    @functools.wraps(measure)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # not warnings.catch_warnings(): on leaving it drops the filters libraries install on their first import
        # inside the call (scipy's), and resets which warnings were already shown, so they repeat at every call
        # (an "ignore" filter leaves no record behind, so adding and removing it changes nothing else)
        added = not warnings.filters or warnings.filters[0] != _JIT_FILTER
        if added:
            warnings.filters.insert(0, _JIT_FILTER)
        try:
            return measure(*args, **kwargs)
        finally:
            if added:
                with contextlib.suppress(ValueError):
                    warnings.filters.remove(_JIT_FILTER)  # the first one: this call's, unless another came before

    return wrapper


_JIT_FILTER = ("ignore", re.compile(r".*torch.jit.script.*", re.IGNORECASE), FutureWarning, None, 0)


# -- data -----------------------------------------------------------------------------------------------------------
def evaluation_data(data: Any, samples: int | None = None) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of ``data`` (see the module docstring), the batches concatenated in their order;
    ``samples`` keeps the first ``samples`` examples."""
    from landscape.curvature.loss import num_inputs, slice_inputs

    if samples is not None:
        samples = _checked_value(samples, int, "samples", "data")
        if samples < 1:
            raise ConfigError(f"samples must be a positive whole number of examples, not {samples!r}.")
    if _is_pair(data):
        x, y = _tensor(data[0], "inputs"), data[1]
    else:
        if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
            raise LandscapeError(
                f"data is a {type(data).__name__}; give a DataLoader, an iterable of (inputs, targets) batches or "
                "one (inputs, targets) pair.")
        inputs, targets, count = [], [], 0
        for i, batch in enumerate(data):
            xb, yb = _split_batch(batch, i)
            yb = _tensor(yb, "targets")
            if not isinstance(yb, torch.Tensor):
                raise LandscapeError(f"Batch {i}'s targets are a {type(yb).__name__}; give one tensor of targets (a "
                                     "model of several tasks is measured on one loss: wrap it to return one output "
                                     "and give its targets).")
            if yb.dim() == 0:
                raise LandscapeError(f"Batch {i}'s target is one number, so data looks like a list of single "
                                     "examples; give a DataLoader (it stacks examples into batches) or one stacked "
                                     "(inputs, targets) pair.")
            inputs.append(xb)
            targets.append(yb)
            count += len(yb)
            if samples is not None and count >= samples:
                break
        if not inputs:
            raise LandscapeError("data holds no batches; give at least one example.")
        if len({tuple(t.shape[1:]) for t in targets}) > 1:
            raise LandscapeError("The batches' targets have different shapes per example; give every batch targets "
                                 "of one shape.")
        x, y = _concatenate(inputs), torch.cat(targets)  # along the examples: a regression target keeps its shape
    y = _tensor(y, "targets")
    if not isinstance(y, torch.Tensor):
        raise LandscapeError(f"The targets are a {type(y).__name__}; give one tensor of targets (a model of several "
                             "tasks is measured on one loss: wrap it to return one output and give its targets).")
    if y.dim() == 0:
        raise LandscapeError("The targets are one number; give one target per example.")
    if y.dtype in (torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32, torch.uint64):
        y = y.long()  # class labels as numpy and many loaders keep them (torch's losses take int64 and uint8 only)
    if not y.is_floating_point() and y.dim() == 2 and y.shape[1] == 1:  # class labels of shape (N, 1): one each
        y = y.reshape(-1)
    n = num_inputs(x)
    if n == 0:
        raise LandscapeError("data holds no examples; give at least one.")
    if n != len(y):
        raise LandscapeError(f"data has {n} inputs but {len(y)} targets; give one target per example.")
    if samples is not None and samples < n:
        x, y = slice_inputs(x, 0, samples), y[:samples]
    return x, y


def _is_pair(data: Any) -> bool:
    import numpy as np

    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, Mapping, np.ndarray))
            and (isinstance(data[1], (torch.Tensor, np.ndarray, list, tuple))  # no batch is a tensor and a list
                 or isinstance(data[0], (torch.Tensor, np.ndarray)) and isinstance(data[1], Mapping)))


def _tensor(value: Any, what: str) -> Any:
    """``value`` as a tensor (numpy arrays and lists converted), a dict of them kept a dict."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        return {k: _tensor(v, f"{what} {k!r}") for k, v in value.items()}
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError):
        raise LandscapeError(f"The {what} are a {type(value).__name__}, not a tensor or an array of numbers.") from None


def _split_batch(batch: Any, index: int) -> tuple[Any, torch.Tensor]:
    if isinstance(batch, Mapping):
        key = next((k for k in TARGET_KEYS if k in batch), None)
        if key is None:
            raise LandscapeError(
                f"Batch {index} is a dict without targets; name them one of {', '.join(TARGET_KEYS)}.")
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise LandscapeError(
        f"Batch {index} is a {type(batch).__name__}; each batch must be an (inputs, targets) pair or a dict with "
        "'labels'.")


def _concatenate(parts: list[Any]) -> Any:
    parts = [_tensor(p, "inputs") for p in parts]
    if isinstance(parts[0], Mapping):
        keys = list(parts[0])
        if any(list(p) != keys for p in parts):
            raise LandscapeError("The batches' input dicts have different keys; give every batch the same inputs.")
        return {k: torch.cat([p[k] for p in parts]) for k in keys}
    return torch.cat(parts)


# -- the model ------------------------------------------------------------------------------------------------------
def _mode_note(model: nn.Module) -> str | None:
    """For a model in train mode whose layers act otherwise in eval mode (BatchNorm, dropout, drop-path), the note
    that it is measured in eval mode; ``None`` otherwise."""
    if not model.training:
        return None
    kinds = set()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            kinds.add("BatchNorm uses its running statistics, not the batch's")
        elif isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            kinds.add("dropout is off")
        elif type(m).__name__ == "DropPath" and float(getattr(m, "drop_prob", 0) or 0) > 0:
            kinds.add("drop-path is off")
    if not kinds:
        return None
    return (f"The model was given in train mode; it was measured in eval mode ({', '.join(sorted(kinds))}), so that "
            "the loss is one function of the weights, as in every landscape analysis.")


def _measured_model(model: nn.Module, device: Any) -> tuple[nn.Module, str, dict[str, str]]:
    """The module to measure, its dtype name (float32/float64) and the notes to record: ``precision_note``, why a
    float32 copy of a low-precision model is measured instead, and ``mode_note``, that a model in train mode is
    measured in eval mode."""
    if not isinstance(model, nn.Module):
        raise LandscapeError(f"model is a {type(model).__name__}, not a torch.nn.Module.")
    model = _unwrapped(model)
    if torch.is_inference_mode_enabled():
        raise LandscapeError("torch.inference_mode() is on, which turns off the autograd every measure needs; call "
                             "landscape outside the inference_mode block.")
    parameters = list(model.parameters())
    if not parameters:
        raise LandscapeError("The model has no parameters, so there is nothing to measure.")
    if any(p.is_meta for p in parameters):
        raise LandscapeError("The model's parameters are on the meta device, so they hold no values; load its weights "
                             "(e.g. model.to_empty(device='cpu') then load_state_dict) before measuring it.")
    first = parameters[0]
    note = None
    target = None if device is None else _device(device)
    kinds = sorted({p.dtype for p in parameters}, key=str)
    wrong = [d for d in kinds if not d.is_floating_point or d.is_complex]
    if wrong:
        raise LandscapeError(f"The model's parameters are {wrong[0]}; give a floating-point model.")
    dtype = torch.float64 if torch.float64 in kinds else torch.float32
    if kinds != [dtype]:  # low precision, or a mixture: a copy in one precision
        names = " and ".join(str(d).replace("torch.", "") for d in kinds)
        note = (f"The model's parameters are {names}; it was measured in {str(dtype).replace('torch.', '')} (a copy)"
                + (", since second derivatives in 8 or 11 mantissa bits are mostly rounding error."
                   if any(d in LOW_PRECISION for d in kinds) else ", so that every product runs in one precision."))
        warnings.warn(note, stacklevel=caller_stacklevel())
        # real floating-point tensors only: Module.to(dtype) also casts complex buffers (an FFT filter, a rotary
        # table) to real, dropping their imaginary parts, and measures another function without a word
        model = copy.deepcopy(model)._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
    if target is not None and target != first.device:
        model = copy.deepcopy(model) if note is None else model
        model = model.to(target)
    _check_finite_weights(model)
    notes = {"precision_note": note} if note is not None else {}
    mode = _mode_note(model)
    if mode is not None:
        warnings.warn(mode, stacklevel=caller_stacklevel())
        notes["mode_note"] = mode
    return model, ("float64" if dtype == torch.float64 else "float32"), notes


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` (``.module``) and ``torch.compile``
    (``._orig_mod``): the same parameters, without a wrapper that refuses parameters swapped in by
    ``functional_call`` (data parallel) or double backward (compiled)."""
    for _ in range(8):
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            break
    return model


def _device(device: Any) -> torch.device:
    """The device ``device`` names, accepted and refused as ``--device`` is
    (:func:`landscape.trainers.distributed.check_device`: ``auto``, ``cpu``, ``cuda``, ``cuda:K``, ``mps``)."""
    from landscape.trainers.distributed import check_device

    advice = "give 'auto', 'cpu', 'cuda', 'cuda:K' or 'mps' as this machine has them, or leave device out"
    if not isinstance(device, (str, torch.device)):
        raise ConfigError(f"device={device!r} cannot be used (not a device name); {advice}.")
    try:
        return torch.device(check_device(str(device)))
    except LandscapeError as e:
        raise ConfigError(f"device={device!r} cannot be used ({str(e).split(';')[0].rstrip('.')}); {advice}.") from None


def _check_finite_weights(model: nn.Module) -> None:
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LandscapeError(f"The model's {name} holds NaN or infinite values, so every measure of it would be "
                                 "NaN; give finite weights.")


def _check_finite_inputs(x: Any) -> None:
    parts = x.items() if isinstance(x, Mapping) else [("inputs", x)]
    for name, tensor in parts:
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            where = "The inputs hold" if name == "inputs" else f"The input {name!r} holds"
            raise LandscapeError(f"{where} NaN or infinite values, so the loss would be NaN; give finite data.")


def _check_trainable(model: nn.Module) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise LandscapeError("Every parameter of the model is frozen (requires_grad=False), so there is nothing to "
                             "measure; unfreeze those to measure (the measures take the parameters that require grad).")


def _measured_loss(loss: Callable | None, model: nn.Module) -> Callable | None:
    """The loss as measured: the tensors of one of torch's weighted losses (``nn.CrossEntropyLoss``'s class
    weights, ``BCEWithLogitsLoss``'s ``pos_weight``...) and a ``functools.partial``'s tensor keywords detached and in
    the measured model's dtype and device (a bfloat16 model is measured as a float32 copy; a weight that requires
    grad has no second derivative in torch's losses). Cross-entropy's class weights must be finite and
    non-negative. Any other loss is used as given (it may hold a model of its own, in its own precision)."""
    first = next(iter(model.parameters()), None)
    if loss is None or first is None:
        return loss

    def measured(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        return t.to(first.device, first.dtype) if t.is_floating_point() else t.to(first.device)

    torch_own = (isinstance(loss, nn.modules.loss._Loss) and type(loss).__module__.startswith("torch.")
                 and not loss._parameters and not loss._modules)
    if torch_own:
        tensors = {k: t for k, t in loss._buffers.items() if t is not None}
        weight = loss._buffers.get("weight") if isinstance(loss, (nn.CrossEntropyLoss, nn.NLLLoss)) else None
    elif isinstance(loss, functools.partial):
        tensors = {k: t for k, t in loss.keywords.items() if isinstance(t, torch.Tensor)}
        weight = tensors.get("weight")
    else:
        return loss
    if isinstance(weight, torch.Tensor) and weight.is_floating_point():
        values = weight.detach()
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise ConfigError("The loss's class weight holds " + ("NaN or infinite" if not bool(torch.isfinite(values)
                              .all()) else "negative") + " values; class weights must be finite and non-negative.")
    if not any(t.requires_grad or t.device != first.device or (t.is_floating_point() and t.dtype != first.dtype)
               for t in tensors.values()):
        return loss
    if isinstance(loss, functools.partial):
        keywords = {k: measured(v) if isinstance(v, torch.Tensor) else v for k, v in loss.keywords.items()}
        return functools.partial(loss.func, *loss.args, **keywords)
    copied = copy.copy(loss)  # torch's loss modules hold their tensors as buffers: the copy gets its own
    copied._buffers = {k: measured(t) if t is not None else None for k, t in loss._buffers.items()}
    return copied


def _check_loss(model: nn.Module, x: Any, y: Any, loss: Callable | None, copied: str | None = None) -> bool:
    """The loss (cross-entropy by default) must take the model's outputs and the targets and be the mean over a
    batch (results weight batches by their size, or by their counted targets): checked once, on a few examples. ``copied`` names the precision
    of the copy measured instead of the model given (:func:`_measured_model`), if one was made. Returns whether the
    loss was warned of as a mean over a count it does not say."""
    from landscape.curvature.loss import check_mean_criterion, cross_entropy, num_inputs

    if isinstance(loss, type):
        raise LandscapeError(f"loss is the class {loss.__name__}; give an instance of it (loss={loss.__name__}()) or "
                             "a function of (outputs, targets).")
    _check_finite_inputs(x)
    if isinstance(y, torch.Tensor) and y.is_floating_point() and not bool(torch.isfinite(y).all()):
        raise LandscapeError("The targets hold NaN or infinite values, so the loss would be NaN; give finite targets.")
    try:
        value = _check_outputs(model, x, y, cross_entropy if loss is None else loss)
        warned = check_mean_criterion(model, x, y, cross_entropy if loss is None else loss)
        if isinstance(value, torch.Tensor) and not value.requires_grad and any(p.requires_grad
                                                                               for p in model.parameters()):
            raise LandscapeError("The loss does not depend on the model's parameters (it has no autograd graph to "
                                 "them: detached, or a constant); give a loss computed from the outputs it is passed.")
        return warned
    except LandscapeError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError, AssertionError) as e:
        # the model's forward (timm's patch embedding asserts the image size)
        shape = ({k: tuple(v.shape) for k, v in x.items()} if isinstance(x, Mapping) else tuple(x.shape)
                 if isinstance(x, torch.Tensor) else type(x).__name__)
        reason = " ".join(str(e).split()).rstrip(".")[:200] or type(e).__name__
        if copied is not None:  # the model as given may run: its copy in one precision did not
            raise LandscapeError(f"The {copied} copy of the model measured (its parameters mix precisions or are low "
                                 f"precision) cannot take the inputs ({reason}); convert the model to one precision "
                                 "first, e.g. model.double() or model.float().") from None
        raise LandscapeError(f"The model cannot take the inputs ({num_inputs(x)} examples, {shape}): {reason}.") from None


def _check_outputs(model: nn.Module, x: Any, y: torch.Tensor, loss: Callable) -> Any:
    """One forward of two examples, with the graph: float targets must not broadcast against the outputs into a
    larger shape (outputs (N,) against targets (N, 1) make an (N, N) loss, every output against every target; torch
    only warns). Returns the loss of those examples, or None where the loss refused them (said by
    :func:`~landscape.curvature.loss.check_mean_criterion`)."""
    from landscape.curvature.loss import evaluation_mode, forward, inputs_to, slice_inputs

    first = next(iter(model.parameters()))
    xb = inputs_to(slice_inputs(x, 0, min(2, len(y))), first.device, first.dtype)
    yb = y[:2].to(first.device)
    yb = yb.to(first.dtype) if yb.is_floating_point() else yb
    with evaluation_mode(model), torch.enable_grad():
        outputs = forward(model, xb)
        if isinstance(outputs, torch.Tensor) and yb.is_floating_point() and len(yb) > 1 and outputs.shape != yb.shape:
            try:
                both = torch.broadcast_shapes(outputs.shape, yb.shape)
            except RuntimeError:
                both = None
            if both is not None and both != outputs.shape and both != yb.shape:
                raise LandscapeError(f"The model's outputs {tuple(outputs.shape[1:])} and the targets "
                                     f"{tuple(y.shape[1:])} per example would be broadcast against each other "
                                     "(every output compared with every target); give targets of the outputs' shape.")
        try:
            return loss(outputs, yb)
        except Exception:
            return None


def _check_targets(model: nn.Module, x: Any, y: torch.Tensor, loss: Callable | None, batch_size: int,
                   warned: bool = False) -> None:
    """For cross-entropy (the default), class labels must be classes of the model's outputs or -100 (ignored),
    checked over every example (the loss itself was tried on the first few); no batch may be all ignored (its mean
    loss is NaN, and it would take the whole result with it). Then, for every loss, :func:`_check_every_batch`."""
    _check_class_targets(model, x, y, loss)
    _check_every_batch(model, x, y, loss, batch_size, warned)


def _check_every_batch(model: nn.Module, x: Any, y: torch.Tensor, loss: Callable | None, batch_size: int,
                       warned: bool) -> None:
    """One pass over the whole set at the model's weights, in the batches the measures take: the loss must take
    every batch (targets past the first examples too) and be finite on it, and a loss that averages over a count
    it does not say is warned about here if the first examples did not show it (``warned``)."""
    import math

    from landscape.curvature.loss import (NEARLY_A_MEAN, counted_batches, cross_entropy, evaluation_mode,
                                          example_weights, forward, inputs_to, mean_gap, slice_inputs, warn_uneven_mean)

    criterion = cross_entropy if loss is None else loss
    first = next(iter(model.parameters()))
    n = len(y)
    counted = example_weights(criterion, y)
    if counted is not None:  # a batch counting no target (all ignored) is refused before its loss is tried
        counted_batches(counted, counted, batch_size)
    with evaluation_mode(model), torch.no_grad():
        for start in builtins.range(0, n, batch_size):
            stop = min(start + batch_size, n)
            yb = y[start:stop].to(first.device)
            yb = yb.to(first.dtype) if yb.is_floating_point() else yb
            try:
                outputs = forward(model, inputs_to(slice_inputs(x, start, stop), first.device, first.dtype))
                value = float(criterion(outputs, yb))
            except (RuntimeError, ValueError, TypeError, IndexError) as e:
                reason = " ".join(str(e).split()).rstrip(".")[:200] or type(e).__name__
                raise LandscapeError(f"The loss cannot be computed on examples {start} to {stop - 1}: {reason}.") \
                    from None
            if not math.isfinite(value):
                raise LandscapeError(
                    f"The loss is {value} on examples {start} to {stop - 1} at the model's weights, so every measure "
                    "would be NaN; check those examples' inputs and targets, and the loss.")
            if not warned:
                gap = mean_gap(criterion, outputs, yb)
                if gap is not None and gap[0] > NEARLY_A_MEAN:
                    warn_uneven_mean(stop - start, gap[1], gap[2])
                    warned = True


def _check_class_targets(model: nn.Module, x: Any, y: torch.Tensor, loss: Callable | None) -> None:
    """Class labels of cross-entropy (the default, ``nn.CrossEntropyLoss``) against the model's classes, in one
    sentence naming the example (torch would name none)."""
    from landscape.curvature.loss import evaluation_mode, forward, inputs_to, slice_inputs

    if not (loss is None or isinstance(loss, nn.CrossEntropyLoss)) or y.is_floating_point() or y.dim() != 1 \
            or y.dtype == torch.bool or not len(y):
        return
    first = next(iter(model.parameters()))
    with evaluation_mode(model), torch.no_grad():
        outputs = forward(model, inputs_to(slice_inputs(x, 0, 1), first.device, first.dtype))
    classes = int(outputs.shape[-1]) if isinstance(outputs, torch.Tensor) and outputs.dim() == 2 else None
    skip = int(getattr(loss, "ignore_index", -100))
    wrong = ((y < 0) | (y >= classes if classes is not None else False)) & (y != skip)
    if bool(wrong.any()):
        i = int(wrong.nonzero()[0])
        raise LandscapeError(f"Target {int(y[i])} of example {i} is not a class of the model's outputs; give class "
                             "indices from 0" + (f" to {classes - 1}" if classes is not None else "") +
                             f" ({skip} for an example the loss ignores).")


_RUN_ONLY = {"samples", "dtype", "split", "dataset", "weights", "img_size", "classes", "preconditioned"}
"""Settings of an analysis of a run's checkpoints that have no meaning for a model and data given directly: the
evaluation set is the data, the precision the model's, and there is no optimizer state to precondition by."""


def _settings(cls: type, options: dict[str, Any], *, samples: int, dtype: str, what: str):
    import re
    import typing

    names = {f.name for f in dataclasses.fields(cls)} - _RUN_ONLY
    unknown = sorted(set(options) - names)
    if unknown:
        why = (" (there is no optimizer state here; use 'landscape analyze hessian RUN --preconditioned')"
               if unknown[0] == "preconditioned" else "")
        raise ConfigError(f"{what} has no setting {unknown[0]!r}{why}; accepted are {', '.join(sorted(names))}.")
    hints = typing.get_type_hints(cls)
    checked = {k: _checked_value(v, hints[k], k, what) for k, v in options.items()}
    try:
        return cls(**checked, samples=samples, dtype=dtype)
    except ConfigError as e:  # the settings' sentences name command-line options; here they are keywords
        text = re.sub(r"--([a-z][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), str(e))
        raise ConfigError(text) from None


def _checked_value(value: Any, hint: Any, name: str, what: str) -> Any:
    """``value`` as the type ``hint`` of the setting ``name`` says (numpy and 0-d tensor numbers taken as
    numbers), or one sentence."""
    import numbers
    import types
    import typing

    origin, args = typing.get_origin(hint) or hint, typing.get_args(hint)
    if isinstance(hint, types.UnionType) or origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _checked_value(value, option, name, what)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if isinstance(value, torch.Tensor) and value.numel() == 1 and origin in (int, float, bool):
        value = value.item()
    if origin is bool:
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        raise ConfigError(f"{what}: {name} must be True or False, not {value!r}.")
    if origin is int:
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise ConfigError(f"{what}: {name} must be a whole number, not {value!r}.")
    if origin is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{what}: {name} must be a number, not {value!r}.")
    if origin is str:
        if isinstance(value, str):
            return value
        if name == "params" and isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return ",".join(value)  # a list of parameter names or patterns: the comma-separated form
        raise ConfigError(f"{what}: {name} must be a text value, not {value!r}.")
    if origin is tuple:
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            raise ConfigError(f"{what}: {name} must be a sequence of numbers such as (0.0, 1.0), not {value!r}.")
        items = list(value)
        inner = args[:1] * len(items) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(inner) != len(items):
            raise ConfigError(f"{what}: {name} must hold {len(inner)} values, not {len(items)} ({value!r}).")
        return tuple(_checked_value(v, t, name, what) for v, t in zip(items, inner))
    return value


def _finish(ds, name: str, settings: Any, determining: dict[str, Any], loss: Callable | None,
            notes: dict[str, str]):
    from landscape.analyses.results import analysis_attrs, netcdf_attrs

    if loss is not None:  # part of the settings, so that results of two losses are told apart
        determining = {**determining, "loss_function": _loss_name(loss)}
    attrs = analysis_attrs(name, determining, settings.seed)
    attrs.update(netcdf_attrs({"loss_function": _loss_name(loss)}))
    attrs.update(notes)
    ds.attrs = attrs
    return ds


def _loss_name(loss: Callable | None) -> str:
    from landscape.curvature.loss import describe_criterion

    return describe_criterion(loss)


def _trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


# -- the measurements ------------------------------------------------------------------------------------------------
@_without_jit_warning
def hessian(model: nn.Module, data: Any, *, loss: Callable | None = None, samples: int | None = None,
            device: Any = None, **settings: Any):
    """Top eigenvalues, trace and spectral density of the loss Hessian of ``model`` on ``data``.

    ``settings`` are the fields of :class:`~landscape.analyses.hessian.HessianSettings`: ``top_k`` (5),
    ``which`` (largest, smallest, both), ``tol``, ``trace``, ``trace_method``, ``trace_matvecs``, ``density``,
    ``density_probes``, ``density_steps``, ``params`` (a parameter pattern), ``seed``, ``batch_size`` (256),
    ``product``, ``vectors_per_pass``. Returns the Dataset of
    :func:`~landscape.analyses.hessian.hessian_analysis`, with the attrs of ``RUN/analysis/hessian.nc``.
    """
    from landscape.analyses.hessian import HessianSettings, hessian_analysis

    x, y = evaluation_data(data, samples)
    measured, dtype, notes = _measured_model(model, device)
    _check_trainable(measured)
    loss = _measured_loss(loss, measured)
    warned = _check_loss(measured, x, y, loss, dtype if "precision_note" in notes else None)
    config = _settings(HessianSettings, settings, samples=len(y), dtype=dtype, what="hessian()")
    _check_targets(measured, x, y, loss, config.batch_size, warned)
    if config.top_k and config.params is None:
        count = _trainable_count(measured)
        if config.top_k * (2 if config.which == "both" else 1) > count:
            both = (f" with which='both' (the {config.top_k} largest and the {config.top_k} smallest)"
                    if config.which == "both" else "")
            raise ConfigError(f"top_k={config.top_k}{both} asks for more eigenvalues than the model's {count} "
                              "trainable parameters have.")
    _check_second_derivatives(measured)
    ds = hessian_analysis(measured, x, y, config, criterion=loss)
    return _finish(ds, "hessian", config, config.determining(), loss, notes)


def _check_second_derivatives(model: nn.Module) -> None:
    """Refuse a model with torch's weight norm when torch's second derivative through it is wrong (checked once
    against finite differences: in torch 2.14 a Hessian-vector product through ``torch._weight_norm`` is off by a
    third of its size, so every Hessian of such a model would be; its forward-mode derivative, which the GGN's
    products take, is not implemented at all)."""
    uses = any(type(m).__name__ == "_WeightNorm" for m in model.modules()) or any(
        type(hook).__name__ == "WeightNorm" for m in model.modules() for hook in m._forward_pre_hooks.values())
    if uses and not _weight_norm_second_derivative_is_right():
        raise LandscapeError(
            f"The model uses torch's weight_norm, whose second derivative is wrong in torch {torch.__version__} (a "
            "Hessian-vector product through it is off by about a third), so its Hessian cannot be measured; remove "
            "it (torch.nn.utils.parametrize.remove_parametrizations) or write w = g v / ||v|| in the forward "
            "(sharpness and surfaces need first derivatives only, and are right).")


@functools.lru_cache(maxsize=1)
def _weight_norm_second_derivative_is_right() -> bool:
    """Whether torch's double backward through ``torch._weight_norm`` matches central differences of its gradient
    on a small float64 problem."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    v0, g0 = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64)
    dv, dg = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 1, generator=g, dtype=torch.float64)

    def gradient(vv, gg, create_graph=False):
        with torch.enable_grad():
            vv, gg = vv.clone().requires_grad_(), gg.clone().requires_grad_()
            value = torch.tanh(x @ torch._weight_norm(vv, gg, 0).T).pow(2).sum()
            return torch.autograd.grad(value, (vv, gg), create_graph=create_graph), (vv, gg)

    (gv, gg), (vv, ggv) = gradient(v0, g0, create_graph=True)
    with torch.enable_grad():
        hv = torch.autograd.grad((gv * dv).sum() + (gg * dg).sum(), (vv, ggv))
    e = 1e-6
    (pv, pg), _ = gradient(v0 + e * dv, g0 + e * dg)
    (mv, mg), _ = gradient(v0 - e * dv, g0 - e * dg)
    exact = torch.cat([((pv - mv) / (2 * e)).reshape(-1), ((pg - mg) / (2 * e)).reshape(-1)])
    products = torch.cat([hv[0].reshape(-1), hv[1].reshape(-1)])
    return bool((products - exact).norm() <= 1e-5 * exact.norm())


@_without_jit_warning
def sharpness(model: nn.Module, data: Any, *, rho: float | Sequence[float] | None = None, loss: Callable | None = None,
              samples: int | None = None, device: Any = None, **settings: Any):
    """Worst-case (SAM or adaptive), m-, average-case and first-order sharpness of ``model`` on ``data``.

    ``rho`` is one radius or several; the other ``settings`` are the fields of
    :class:`~landscape.analyses.sharpness.SharpnessSettings`: ``p`` ("2" or "inf"), ``adaptive``, ``eta``,
    ``steps``, ``m`` (batch size of m-sharpness, at most the number of examples), ``draws``, ``params``,
    ``seed``, ``batch_size``. Returns the Dataset of :func:`~landscape.analyses.sharpness.sharpness_analysis`.
    """
    from landscape.analyses.sharpness import SharpnessSettings, sharpness_analysis

    p = settings.get("p")
    if isinstance(p, (int, float)) and not isinstance(p, bool):  # p=2 or p=math.inf, as a norm is usually written
        settings["p"] = "inf" if p == float("inf") else str(int(p)) if float(p).is_integer() else str(p)
    if rho is not None:
        if "rhos" in settings:
            raise ConfigError("Give the radii once, as rho=, not also as rhos=.")
        settings["rhos"] = ((rho,) if isinstance(rho, (int, float)) or getattr(rho, "ndim", None) == 0
                            or (isinstance(rho, torch.Tensor) and rho.numel() == 1 and rho.dim() == 0) else rho)
    x, y = evaluation_data(data, samples)
    measured, dtype, notes = _measured_model(model, device)
    _check_trainable(measured)
    m = _checked_value(settings.get("m"), int | None, "m", "sharpness()")
    if m is not None and m > len(y):
        raise ConfigError(f"m={m} is larger than the {len(y)} examples given, so m-sharpness has no batch of m; "
                          f"give m at most {len(y)} or more data.")
    loss = _measured_loss(loss, measured)
    warned = _check_loss(measured, x, y, loss, dtype if "precision_note" in notes else None)
    config = _settings(SharpnessSettings, settings, samples=len(y), dtype=dtype, what="sharpness()")
    _check_targets(measured, x, y, loss, config.batch_size, warned)
    ds = sharpness_analysis(measured, x, y, config, criterion=loss)
    return _finish(ds, "sharpness", config, config.determining(), loss, notes)


@_without_jit_warning
def surface(model: nn.Module, data: Any, *, directions: Any = "random", dims: int | None = None,
            range: tuple[float, float] | None = None, points: int = 51, loss: Callable | None = None,
            samples: int | None = None, device: Any = None, **settings: Any):
    """Loss and top-1 accuracy on a 1D or 2D slice through the weights of ``model``.

    ``directions``:

    - ``"random"``: seeded Gaussian directions, filter-normalised against the model's weights (as
      ``landscape analyze surface --directions random``; ``one_dim``, ``qkv`` and ``seed`` as there);
    - another model (or its state dict) of the same architecture: the line :math:`(1 - a) w_0 + a w_1`;
    - two of them: the plane :math:`(1 - a - b) w_0 + a w_1 + b w_2`;
    - a list of one or two dicts ``{parameter name: tensor}``: the slice :math:`w_0 + a d_1 + b d_2` along
      them as given (e.g. Hessian eigenvectors).

    ``dims`` (1 or 2; by default 2 for random, the number of directions otherwise), ``range`` ``(start, stop)``
    and ``points`` per axis define the grid. Random and given directions move the parameters the other measures
    take (frozen ones, ``requires_grad=False``, are held and named in the ``parameters_left_out`` attribute) and
    hold the buffers; a line or plane between models moves every parameter and the floating-point buffers (e.g.
    BatchNorm running statistics), so that it ends at the other model itself (the ``buffers`` attribute). Returns
    the Dataset of :func:`~landscape.analyses.surface.surface_analysis`.
    """
    from landscape.curvature.loss import LossFunction
    from landscape.analyses.surface import (DEFAULT_RANGES, SurfaceSettings, normalization_policies,
                                            refuse_normalization_policies, surface_analysis)
    from landscape.curvature.directions import filter_normalize, grid_axes, qkv_head_counts, random_directions

    x, y = evaluation_data(data, samples)
    measured, dtype, notes = _measured_model(model, device)
    loss = _measured_loss(loss, measured)
    warned = _check_loss(measured, x, y, loss, dtype if "precision_note" in notes else None)
    kind, given = _direction_kind(directions)
    refuse_normalization_policies(kind, [name for name in ("one_dim", "qkv", "tokens") if name in settings])
    if dims is None:
        dims = 2 if kind == "random" else len(given)
    if kind != "random" and dims != len(given):
        raise ConfigError(f"{len(given)} direction(s) were given for a {dims}D slice; give one per dimension.")
    if kind != "random" and range is None:
        range = DEFAULT_RANGES.get(kind, DEFAULT_RANGES["random"])
    # made as random directions, which checks every other field; the kind is recorded below
    config = _settings(SurfaceSettings, {**settings, "dims": dims, "range": range, "points": points}, samples=len(y),
                       dtype=dtype, what="surface()")
    _check_targets(measured, x, y, loss, config.batch_size, warned)
    policies = normalization_policies(config)  # as random directions; non-random ones are not normalised
    config.directions = kind
    first = next(iter(measured.parameters()))
    moved = kind in ("interpolate", "plane")  # a line or plane between models moves every tensor to the other's
    center = {n: p.detach().clone(memory_format=torch.contiguous_format) for n, p in measured.named_parameters()
              if moved or p.requires_grad}
    frozen = {n: p.numel() for n, p in measured.named_parameters() if not (moved or p.requires_grad)}
    if not center:
        raise ConfigError("Every parameter of the model is frozen (requires_grad=False), so a slice along "
                          "directions has nothing to move; unfreeze the parameters to slice along.")
    extra = {n: b.detach().clone() for n, b in measured.named_buffers()}
    if kind == "random":
        heads = qkv_head_counts(measured)
        raw = random_directions(center, 2, seed=config.seed)
        chosen = [filter_normalize(raw[k], center, qkv_heads=heads, one_dim=config.one_dim, qkv=config.qkv,
                                   tokens=config.tokens) for k in builtins.range(dims)]
    else:
        chosen = [_parameter_dict(d, center, first, what) for d, what in given]
    anchors = (0.0, 1.0) if kind in ("interpolate", "plane") else (0.0,)
    axes = [grid_axes(config.range, config.points, anchors) for _ in builtins.range(dims)]
    closure = LossFunction(measured, x, y, batch_size=config.batch_size, skip_unused=False,
                           **({"criterion": loss} if loss is not None else {}))
    targets = [_buffer_dict(d, extra) for d, _ in given] if moved else None
    ds = surface_analysis(closure, center, chosen, kind, axes, extra=extra, extra_targets=targets)
    buffers = ds.attrs.get("buffers")
    determining = config.determining()
    determining["targets"] = [f"in-memory {what} {i + 1}" for i, (_, what) in enumerate(given)
                              if kind in ("interpolate", "plane")]
    ds = _finish(ds, "surface", config, determining, loss, notes)
    if kind != "random":
        policies["normalization_applies_to"] = "nothing: these directions are not filter-normalised"
    ds.attrs.update(policies)
    if buffers is not None:
        ds.attrs["buffers"] = buffers
    if frozen:
        ds.attrs["parameters_left_out"] = (f"{sum(frozen.values())} frozen (requires_grad False), held at the "
                                           f"model's values: {', '.join(frozen)}")
    return ds


def _buffer_dict(source: Any, extra: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The buffers of a model (or state dict) given as the end of a line or plane, for those of ``extra``."""
    tensors = dict(source.named_buffers()) if isinstance(source, nn.Module) else dict(source)
    return {n: tensors[n].detach() for n in extra if isinstance(tensors.get(n), torch.Tensor)}


def _direction_kind(directions: Any) -> tuple[str, list[tuple[Any, str]]]:
    if isinstance(directions, str):
        if directions != "random":
            raise ConfigError(
                f"directions={directions!r} is not computed from a model alone; give 'random', one or two models "
                "(a line or a plane), or a list of parameter dicts (for pca or eigen directions of a run, use "
                "'landscape analyze surface RUN').")
        return "random", []
    items = list(directions) if isinstance(directions, (list, tuple)) else [directions]
    if not 1 <= len(items) <= 2:
        raise ConfigError(f"{len(items)} directions were given; a slice takes one or two.")
    if all(isinstance(d, nn.Module) for d in items):  # a wrapped target has its module's tensors under other names
        return ("interpolate" if len(items) == 1 else "plane"), [(_unwrapped(d), "model") for d in items]
    if all(isinstance(d, Mapping) for d in items):
        if len(items) == 1 and not isinstance(directions, (list, tuple)):
            return "interpolate", [(items[0], "state dict")]
        return "given", [(d, "direction") for d in items]
    kinds = {type(d).__name__ for d in items}
    what = "a mixture" if len(kinds) > 1 else f"{'a ' if len(items) == 1 else ''}{kinds.pop()}"
    raise ConfigError(f"directions must be 'random', models, or dicts of parameter tensors, not {what}.")


def _parameter_dict(source: Any, center: dict[str, torch.Tensor], like: torch.Tensor, what: str
                    ) -> dict[str, torch.Tensor]:
    tensors = dict(source.state_dict()) if isinstance(source, nn.Module) else dict(source)
    missing = [n for n in center if n not in tensors]
    if missing:
        raise LandscapeError(f"The {what} given as a direction has no tensor {missing[0]!r}; give one of the same "
                             "architecture.")
    wrong = [n for n in center if tuple(tensors[n].shape) != tuple(center[n].shape)]
    if wrong:
        raise LandscapeError(f"The {what} given as a direction has {wrong[0]!r} of shape "
                             f"{tuple(tensors[wrong[0]].shape)}, not {tuple(center[wrong[0]].shape)}.")
    out = {n: tensors[n].detach().to(device=like.device, dtype=like.dtype).clone() for n in center}
    unfit = [n for n, t in out.items() if not bool(torch.isfinite(t).all())]
    if unfit:
        raise LandscapeError(f"The {what} given as a direction has NaN or infinite values in {unfit[0]!r}; give "
                             "finite tensors.")
    return out


# -- runs and figures -------------------------------------------------------------------------------------------------
def load_run(path: Any, *, weights: str = "raw"):
    """A run directory with its results read into memory: a :class:`~landscape.summary.RunResults`
    (``.hessian``, ``.sharpness``, ``.surfaces``, ``.dynamics``, ... as Datasets, ``.results`` every file;
    ``.run`` for checkpoints and metrics)."""
    import os

    from landscape.summary import load_run as load

    if not isinstance(path, (str, os.PathLike)):
        raise LandscapeError(f"path is a {type(path).__name__}; give a run folder's path (a str or a Path).")
    if weights not in ("raw", "ema"):
        raise ConfigError(f"weights must be 'raw' or 'ema', not {weights!r}.")
    return load(path, weights=weights)


def results(*datasets: Any, label: str = "model", seed: int = 0):
    """One run's results from Datasets in memory (e.g. returned by :func:`hessian`), for :func:`figure`.

    Each Dataset is placed by its attrs (``analysis`` and ``settings``), as a results file of a run is; one
    without a ``checkpoint`` dimension counts as one checkpoint at step 0. Runs with the same ``label`` are seeds
    of one variant.
    """
    from pathlib import Path

    from landscape.analyses.results import checkpoint_entry
    from landscape.models.variants import Variant
    from landscape.runs import Run
    from landscape.summary import Result, RunResults, classify, missing_variable, read_settings

    import xarray as xr

    if not isinstance(label, str) or not label:
        raise ConfigError(f"label must be a name (a non-empty text), not {label!r}.")
    seed = _checked_value(seed, int, "seed", "results()")
    found, dynamics = [], None
    for i, ds in enumerate(datasets):
        if not isinstance(ds, xr.Dataset):
            what = ("a DataArray (one variable); give the whole Dataset the measure returned"
                    if isinstance(ds, xr.DataArray) else f"a {type(ds).__name__}, not an xarray Dataset")
            raise LandscapeError(f"Argument {i + 1} of results() is {what}.")
        kind = classify(ds)
        if kind not in ("hessian", "sharpness", "surface", "dynamics"):
            what = "no 'analysis' attr" if kind is None else f"the 'analysis' attr {kind!r}"
            raise LandscapeError(f"Dataset {i + 1} has {what}, not hessian, sharpness, surface or dynamics, so no "
                                 "figure knows what it holds.")
        missing = missing_variable(kind, ds)
        if missing:
            raise LandscapeError(f"Dataset {i + 1} says it holds {kind} results but has no {missing!r}; give the "
                                 "Dataset the measure returned.")
        if kind == "dynamics":
            dynamics = ds
            continue
        if "checkpoint" not in ds.dims:
            ds = checkpoint_entry(ds, name="model", epoch=None, step=0)
        found.append(Result(path=Path(label) / f"{kind}-{i}.nc", kind=kind, settings=read_settings(ds), dataset=ds))
    variant = Variant(key=label, name=label, family="other", base=label, label=label)
    return RunResults(path=Path(label), run=Run(Path(label)), variant=variant, label=label, seed=seed,
                      num_params=None, results=found, dynamics=dynamics, final_step=0)


FIGURE_HELP = "a RunResults (load_run, results), a run directory, a Dataset, or a list of them"


def figure(name: str, runs: Any):
    """Draw figure ``name`` of the gallery (:data:`landscape.figures.FIGURES`) for ``runs``: a matplotlib Figure.

    ``runs`` is one or a list of: :class:`~landscape.summary.RunResults` (from :func:`load_run` or :func:`results`),
    run directories, or Datasets (each its own run). Runs holding none of the results the figure draws are one
    sentence (a :class:`~landscape.errors.LandscapeError`).
    """
    import matplotlib
    import numpy as np

    from landscape.figures import FIGURES, STYLE, variant_styles
    from landscape.models.variants import unique_labels
    from landscape.summary import RunResults

    if name not in FIGURES:
        raise LandscapeError(f"Unknown figure {name!r}; accepted are {', '.join(FIGURES)}.")
    items = list(runs) if isinstance(runs, (list, tuple)) else [runs]
    loaded = []
    for item in items:
        if isinstance(item, RunResults):
            loaded.append(item)
        elif hasattr(item, "data_vars"):
            loaded.append(results(item, label=f"model {len(loaded) + 1}"))
        elif isinstance(item, str) or hasattr(item, "__fspath__"):
            loaded.append(load_run(item))
        else:
            raise LandscapeError(f"Cannot draw a {type(item).__name__}; give {FIGURE_HELP}.")
    if not loaded:
        raise LandscapeError(f"Nothing to draw; give {FIGURE_HELP}.")
    labels = unique_labels(r.variant for r in loaded)
    for r in loaded:
        r.label = r.label or labels[r.variant.key]
    with matplotlib.rc_context(STYLE):
        fig = FIGURES[name](loaded, variant_styles(loaded))
    if fig is None:
        held = sorted({res.kind for r in loaded for res in r.results} | ({"dynamics"} if any(
            r.dynamics is not None for r in loaded) else set()))
        undated = all(not any(np.isfinite(np.asarray(res.dataset["epoch"].values, dtype=float)).any()
                              for res in r.results if "epoch" in res.dataset.coords) for r in loaded)
        why = (" (figures over epochs need a run's checkpoints, ls.load_run(PATH); a measure of a model in memory "
               "is one checkpoint without an epoch)" if undated and "epoch" in name else "")
        from landscape.figures import FIGURE_NEEDS

        needs = f"; it needs {FIGURE_NEEDS[name]}" if name in FIGURE_NEEDS and not why else ""
        raise LandscapeError(f"Figure {name} has nothing to draw: the results given hold "
                             f"{', '.join(held) or 'no analysis'}{needs or ', not the ones it draws'}{why}.")
    return fig

"""Loss surfaces: 1D and 2D slices of the loss landscape along chosen directions.

A slice evaluates the loss and accuracy on the fixed analysis subset at the weights

.. math:: w(a, b) = w_0 + a\\, d_1 + b\\, d_2

over a grid of coordinates :math:`(a, b)` in *direction units* (``a = 1`` means one whole :math:`d_1`). Each point's
weights are computed afresh from :math:`w_0` and the directions and handed to ``torch.func.functional_call``; the
model is never modified and no point inherits rounding from the previous one.

Directions
----------
``random``
    Gaussian directions with filter normalisation (Li et al. 2018): each direction tensor :math:`d` drawn from
    :math:`N(0, I)` (seeded) is rescaled per *filter* :math:`i` to :math:`d_i \\|w_i\\| / \\|d_i\\|`, so that a step of
    one unit moves every filter by its own norm and scale-invariant filters are compared on equal terms. What a
    filter is, per kind of parameter:

    - a weight with two or more dimensions (linear ``(out, in)``, convolution ``(out, in, kh, kw)`` such as the patch
      embedding): one output row, i.e. everything that feeds one output unit, as in Li et al.;
    - the fused ``qkv`` weight of an attention layer, ``(3 H d_h, D)``: one head's query, key or value block of
      :math:`d_h` rows, normalised as a whole. The attention logits are unchanged when a head's query block is
      scaled by :math:`a` and its key block by :math:`1/a` (and the output by a head's value block scaled by
      :math:`a` and the matching columns of the projection by :math:`1/a`); the head block is the unit these
      symmetries act on, so it is the unit that is normalised (``qkv="row"`` normalises row by row instead, which is
      finer and also lies within one head). Separate ``q``/``k``/``v`` projections (the grouped-query attention of
      mLiT) are ordinary weights, normalised row by row, each row within one head;
    - the position embedding ``(1, N, D)``, class, register, distillation and mask tokens: one token's
      :math:`D`-vector each, since each token is an independent learned input and one row of a table
      (``tokens="tensor"`` reproduces Li et al.'s code, whose filters are the slices along the first dimension:
      one filter for the whole ``(1, N, D)`` tensor);
    - one-dimensional parameters (biases, LayerNorm gains and shifts, LayerScale): set to zero, as in the paper of
      Li et al. and their code's ``--xignore biasbn`` (their scale is not a filter scale and moving them changes
      the plot more than it informs it); their code's default copies the weights instead, :math:`d = w`
      (``one_dim="weight"``); ``one_dim="filter"`` normalises each such vector as a whole.

    Where this departs from Li et al. (2018) and their code: token tables per token (theirs: per first-dimension
    slice, ``tokens="tensor"``), the fused qkv weight per head block (theirs: per row, ``qkv="row"``), 1-D
    tensors zeroed (their default: :math:`d = w`, ``one_dim="weight"``). Every policy is recorded in the results'
    attributes (:func:`normalization_policies`).

    The raw Gaussian draws are saved once per run in ``RUN/analysis/directions/random-seed<S>.safetensors`` and
    normalised at each checkpoint against that checkpoint's weights, so every checkpoint (and every run with the
    same parameter names and shapes) is sliced along the same random directions.
``interpolate:RUN2[@EPOCH]``
    The line from each checkpoint of RUN to RUN2's checkpoint at EPOCH (its last by default), written as
    :math:`w(\\alpha) = (1 - \\alpha) w_0 + \\alpha w_1` so that :math:`\\alpha = 0` and :math:`\\alpha = 1`
    reproduce the two checkpoints bit for bit. The loss and error barriers of Frankle et al. (2020) are
    :math:`\\max_{\\alpha \\in [0, 1]} f(\\alpha) - \\tfrac{1}{2}(f(0) + f(1))` over the grid points in :math:`[0, 1]`.
``plane:RUN2,RUN3``
    The plane through each checkpoint of RUN and the last checkpoints of RUN2 and RUN3 (``RUN2@EPOCH`` allowed), in
    affine coordinates :math:`w(a, b) = (1 - a - b) w_0 + a w_1 + b w_2`: the three checkpoints sit exactly at
    (0, 0), (1, 0) and (0, 1). The axes are not orthogonal; their lengths (``direction_norm``) and the cosine
    between them (``axis_cosine``) are recorded with the results.
``pca``
    The top principal directions of the run's trajectory (Li et al. 2018, Sec. 7) over all its checkpoints (whatever
    ``--checkpoints`` selects as centres)
    :math:`\\theta_1..\\theta_T`: the differences :math:`D_i = \\theta_i - \\theta_T` are centred and their Gram
    matrix :math:`G = H D D^\\top H` (:math:`H = I - \\tfrac{1}{T-1} 1 1^\\top`) is accumulated in one pass that
    reads the same slice of every checkpoint at a time (never a parameters x checkpoints matrix); with
    :math:`G a_k = \\lambda_k a_k`, a second pass forms :math:`v_k = D^\\top H a_k / \\sqrt{\\lambda_k}` (unit norm).
    Each :math:`v_k` is scaled by the largest :math:`|\\langle \\theta_i - \\theta_T, v_k \\rangle|` so that the
    trajectory fits in :math:`[-1, 1]` direction units; the explained variance :math:`\\lambda_k / \\operatorname{tr} G`
    and the projected trajectory are recorded. Saved in ``RUN/analysis/directions/pca-<weights>.safetensors``.
``eigen``
    The top Hessian eigenvectors of each checkpoint saved by ``landscape analyze hessian --save-eigenvectors``
    (unit norm; zero on parameters the Hessian was not taken over).

Grids and results
-----------------
The coordinates of the checkpoints themselves (0 for the centre; 0 and 1 for interpolation and planes) are always
grid points (:func:`grid_axes`), and :func:`combine` gives them exactly the checkpoint's tensors. Every point is
evaluated by :meth:`landscape.curvature.loss.LossFunction.evaluate`, the one definition of the evaluation loss
that all analyses share, so a grid point at a checkpoint reproduces that checkpoint's own evaluation bit for bit.

``RUN/analysis/surface-<directions>-<dims>d.nc`` holds, per checkpoint, ``loss`` and ``top1`` over ``a`` (and
``b``), ``direction_norm`` per axis, and as applicable ``loss_barrier``/``error_barrier`` (interpolation),
``axis_cosine`` (plane), ``trajectory_coordinates``/``explained_variance`` (pca), ``eigenvalue`` (eigen).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from landscape.analyses.distributed import SHARD_MODES
from landscape.analyses.driver import Analysis, analyze
from landscape.analyses.settings import EvaluationSettings
from landscape.curvature.loss import loss_attrs
from landscape.curvature.directions import (ONE_DIM_POLICIES, QKV_POLICIES, TOKEN_POLICIES, ParamDict, TrajectoryPCA,
                                            barrier, check_same_parameters, combine, filter_normalize, grid_axes,
                                            grid_coefficients, qkv_head_counts, random_directions,
                                            trajectory_principal_directions)
from landscape.errors import LandscapeError

DIRECTION_KINDS = ("random", "interpolate", "plane", "pca", "eigen")

# -- saved directions -----------------------------------------------------------------------------------------
def save_directions(path: str | Path, directions: Sequence[ParamDict], metadata: dict[str, Any]) -> Path:
    """Write directions as ``d1/<name>``, ``d2/<name>`` ... in one safetensors file, atomically, with JSON metadata."""
    import json

    from safetensors.torch import save_file

    from landscape.io import atomic_write

    tensors = {f"d{k + 1}/{name}": t.detach().to("cpu").contiguous()
               for k, d in enumerate(directions) for name, t in d.items()}
    meta = {key: json.dumps(value, default=str) for key, value in metadata.items()}
    meta["count"] = json.dumps(len(directions))
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return Path(path)


def load_directions(path: str | Path) -> tuple[list[ParamDict], dict[str, Any]]:
    """Read a file written by :func:`save_directions`: the directions and their metadata."""
    import json

    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = {k: json.loads(v) for k, v in (f.metadata() or {}).items()}
            count = int(meta.get("count", 0))
            directions: list[ParamDict] = [{} for _ in range(count)]
            for key in f.keys():
                k, _, name = key.partition("/")
                directions[int(k[1:]) - 1][name] = f.get_tensor(key)
    except Exception as e:  # safetensors, json and indexing each raise their own types for a damaged file
        raise LandscapeError(
            f"Directions file {path} is unreadable ({e.__class__.__name__}); delete it to redraw.") from None
    return directions, meta


# -- trajectory PCA -------------------------------------------------------------------------------------------
class _CheckpointSlices:
    """Reads slices of single parameters from a checkpoint file without loading the whole file."""

    def __init__(self, path: Path, weights: str = "raw"):
        import json

        from safetensors import safe_open

        from landscape.checkpoints import EMA_PREFIX, read_checkpoint_info, read_raw_metadata

        info = read_checkpoint_info(path)
        if weights == "ema" and not info.has_ema:
            raise LandscapeError(f"Checkpoint {path} holds no EMA weights; use the raw weights.")
        self.path = Path(path)
        self.prefix = EMA_PREFIX if weights == "ema" else ""
        self.aliases = json.loads(read_raw_metadata(path).get("aliases", "{}"))
        self._file = safe_open(str(path), framework="pt")
        self._keys = set(self._file.keys())

    def key(self, name: str) -> str:
        key = self.prefix + name
        key = self.aliases.get(key, key)
        if key not in self._keys:
            raise LandscapeError(
                f"Checkpoint {self.path} has no parameter {name!r}; the trajectory must share one architecture.")
        return key

    def close(self) -> None:
        self._file.__exit__(None, None, None)

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the parameter (a 0-d parameter is one row), flattened, in float64."""
        sliced = self._file.get_slice(self.key(name))
        if len(sliced.get_shape()) == 0:
            return self._file.get_tensor(self.key(name)).reshape(-1).double()
        return sliced[start:stop].reshape(-1).double()


def trajectory_pca(
    paths: Sequence[str | Path],
    shapes: dict[str, Sequence[int]],
    *,
    count: int = 2,
    weights: str = "raw",
    max_elements: int = 1 << 24,
    dtype: torch.dtype = torch.float32,
) -> TrajectoryPCA:
    """Top-``count`` principal directions of the trajectory through the checkpoints at ``paths`` (see the module
    docstring). ``shapes`` names the parameters (``{name: shape}``) to read. Memory: the ``(T-1, T-1)`` Gram matrix,
    one slice of at most ``max_elements`` numbers from all checkpoints, and the ``count`` output directions.
    """
    paths = [Path(p) for p in paths]
    if len(paths) < count + 2:  # T - 1 centred differences span at most T - 2 dimensions
        raise LandscapeError(
            f"Trajectory PCA with {count} directions needs at least {count + 2} checkpoints; the run has {len(paths)}.")
    readers = [_CheckpointSlices(p, weights) for p in paths]
    try:
        result = trajectory_principal_directions(readers, shapes, count, max_elements=max_elements, dtype=dtype)
        result.checkpoints = [r.path.stem for r in readers]
        return result
    finally:
        for reader in readers:
            reader.close()


# -- evaluating a grid ------------------------------------------------------------------------------------------
def evaluate_grid(
    closure: Any,
    bases: Sequence[ParamDict],
    coefficients: np.ndarray,
    *,
    extra: ParamDict | None = None,
    extra_bases: Sequence[ParamDict] | None = None,
    progress: Any = None,
    world: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and top-1 accuracy (%) at each row of ``coefficients`` ``(points, len(bases))``.

    ``closure`` is a :class:`landscape.curvature.loss.LossFunction` (its ``evaluate`` defines the loss: the
    batch-size-weighted mean over the analysis subset, eval mode); ``extra`` holds tensors passed unchanged at
    every point (buffers), except those of ``extra_bases`` (one dict per base: the floating-point buffers of a
    line's or plane's checkpoints), combined with the same coefficients as the weights. Point :math:`i` is evaluated
    at ``combine(bases, coefficients[i])``. ``progress(1)`` is
    called after each point. With ``world`` (several processes, each calling this alike) the points are cut into
    contiguous blocks, one per process (:func:`landscape.analyses.distributed.map_sharded`), and every process
    returns all of them.
    """
    from landscape.analyses.distributed import map_sharded

    def evaluate(i: int) -> tuple[float, float]:
        params = combine(bases, coefficients[i])
        if extra_bases:
            params = {**combine(extra_bases, coefficients[i]), **params}
        if extra:
            params = {**extra, **params}
        value = closure.evaluate(params)
        if progress is not None:
            progress(1)
        return value

    values = map_sharded(evaluate, range(coefficients.shape[0]), world)
    losses = np.array([loss for loss, _ in values], dtype=np.float64)
    accuracies = np.array([top1 for _, top1 in values], dtype=np.float64)
    return losses, accuracies


# -- direction specifications -----------------------------------------------------------------------------------
DIRECTIONS_HELP = "random, interpolate:RUN2[@EPOCH], plane:RUN2[@EPOCH],RUN3[@EPOCH], pca or eigen"
DEFAULT_RANGES = {"random": (-1.0, 1.0), "pca": (-1.0, 1.0), "eigen": (-1.0, 1.0), "interpolate": (0.0, 1.0),
                  "plane": (-0.5, 1.5)}
"""``--range`` when none is given: the centre in the middle, or the checkpoints of a line or plane with a margin."""


@dataclass
class CheckpointRef:
    """A checkpoint of another run: ``RUN`` (its last checkpoint) or ``RUN@EPOCH``."""

    run: Path
    epoch: int | None = None

    def __str__(self) -> str:
        return f"{self.run}" + (f"@{self.epoch}" if self.epoch is not None else "")

    def resolve(self) -> Any:
        """The :class:`~landscape.checkpoints.CheckpointInfo` this reference names, refused where its run's
        config and metrics say it belongs to another run (:meth:`~landscape.runs.Run.check_checkpoint_model`)."""
        from landscape.runs import Run

        try:
            run = Run.open(self.run)
            info = run.select_checkpoints("last" if self.epoch is None else f"epochs:{self.epoch}")[-1]
            run.check_checkpoint_model(info)
            return info
        except LandscapeError as e:
            raise type(e)(f"In --directions, {self}: {e}") from None


@dataclass
class DirectionSpec:
    """A parsed ``--directions`` value: its kind and, for interpolate and plane, the checkpoints it names."""

    kind: str
    targets: list[CheckpointRef] = field(default_factory=list)

    @property
    def dims_allowed(self) -> tuple[int, ...]:
        return {"interpolate": (1,), "plane": (2,)}.get(self.kind, (1, 2))

    def slug(self, run: Path | None = None) -> str:
        """A file-name-safe name: ``random``, ``interpolate-runB@10``, ``plane-runB-runC`` ... A target that is not
        in the folder of ``run`` (the run analysed) also gets 8 hex digits of the SHA-1 of its path relative to that
        folder, so that two targets of one name in two studies stay apart (and stay the same when both move)."""
        parts = [self.kind] + [target_name(t.run, run) + (f"@{t.epoch}" if t.epoch is not None else "")
                               for t in self.targets]
        slug = "-".join(parts)
        if len(slug) > 120:  # long run names: the file name (with its temporary's) must stay under 255 bytes
            import hashlib

            slug = f"{slug[:100]}_{hashlib.sha1(slug.encode('utf-8', 'surrogateescape')).hexdigest()[:10]}"
        return slug


def target_name(target: Path, run: Path | None) -> str:
    """The file-name part for ``target``: its folder's name, with a hash of where it lies beside ``run``'s when
    it is not in the same folder (see :meth:`DirectionSpec.slug`)."""
    import hashlib

    target = Path(target).resolve()
    name = _safe(target.name)
    if run is None or target.parent == Path(run).resolve().parent:
        return name
    where = Path(os.path.relpath(target, Path(run).resolve().parent)).as_posix()
    return f"{name}_{hashlib.sha1(where.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"


def _safe(text: str) -> str:
    """``text`` with every run of characters outside ``[A-Za-z0-9_.+=]`` made ``_``; a name with characters
    beyond ASCII (``é``, ``数据``: all ``_``) or an ``@`` (which marks the epoch in a file name: the folder
    ``lr@2`` and epoch 2 of ``lr`` wrote one file) also gets 8 hex digits of its SHA-1, so that such names stay
    apart."""
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_.+=]+", "_", text) or "run"
    if not text.isascii() or "@" in text:
        safe += "_" + hashlib.sha1(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return safe


def parse_directions(text: str) -> DirectionSpec:
    """Parse ``random``, ``interpolate:RUN2[@EPOCH]``, ``plane:RUN2,RUN3``, ``pca`` or ``eigen``."""
    text = (text or "").strip()
    kind, _, arg = text.partition(":")
    kind = kind.strip().lower()
    if kind not in DIRECTION_KINDS:
        raise LandscapeError(f"Unknown directions {text!r}; accepted are {DIRECTIONS_HELP}.")
    if kind in ("random", "pca", "eigen"):
        if arg:
            raise LandscapeError(
                f"Directions {kind!r} take no argument (got {text!r}); accepted are {DIRECTIONS_HELP}.")
        return DirectionSpec(kind)
    wanted = 1 if kind == "interpolate" else 2
    refs = [_parse_ref(part, text) for part in _split_refs(arg, wanted) if part.strip()]
    if len(refs) != wanted:
        raise LandscapeError(
            f"Directions {kind} need {wanted} run director{'y' if wanted == 1 else 'ies'} after the colon "
            f"(got {text!r}); accepted are {DIRECTIONS_HELP}.")
    return DirectionSpec(kind, refs)


def _split_refs(arg: str, wanted: int) -> list[str]:
    """``arg`` cut at its commas into run references, except where a run's own folder name holds a comma: the
    cut whose ``wanted`` pieces all name existing folders (an ``@EPOCH`` aside) wins over the plain one."""
    pieces = arg.split(",")
    if len(pieces) > wanted:
        import itertools

        for cuts in itertools.combinations(range(1, len(pieces)), wanted - 1):
            bounds = (0, *cuts, len(pieces))
            parts = [",".join(pieces[a:b]) for a, b in zip(bounds, bounds[1:])]
            if all(_names_a_folder(p) for p in parts):
                return parts
    return pieces


def _names_a_folder(part: str) -> bool:
    part = part.strip()
    path, at, epoch = part.rpartition("@")
    return bool(part) and (Path(part).is_dir() or (bool(at) and epoch.strip().isdigit() and Path(path.strip()).is_dir()))


def _parse_ref(part: str, text: str) -> CheckpointRef:
    part = part.strip()
    path, at, epoch = part.rpartition("@")
    if not at or Path(part).is_dir():  # a run whose folder name holds an '@' (runs/lr@0.1)
        return CheckpointRef(Path(part))
    if not epoch.strip().isascii() or not epoch.strip().isdigit():  # int() also reads '0_2' and Arabic-Indic digits
        raise LandscapeError(f"In directions {text!r}, {epoch!r} after '@' is not an epoch number (digits 0-9).")
    return CheckpointRef(Path(path.strip()), int(epoch))  # 'RUN @ 5' as 'RUN@5', as spaces around commas


def parse_range(text: str | Sequence[float] | None, kind: str = "random") -> tuple[float, float]:
    """``"-1:1"`` -> ``(-1.0, 1.0)``; ``None`` gives the default of the direction kind (see :data:`DEFAULT_RANGES`)."""
    if text is None:
        return DEFAULT_RANGES[kind]
    if not isinstance(text, str):
        start, stop = (float(v) for v in text)
        shown = f"({start:g}, {stop:g})"
    else:
        try:
            start_text, stop_text = text.split(":")
            start, stop = float(start_text), float(stop_text)
        except ValueError:
            raise LandscapeError(f"Range {text!r} must have the form START:STOP, e.g. -1:1 or 0:1.") from None
        shown = repr(text)
    if not (math.isfinite(start) and math.isfinite(stop)) or start >= stop:
        raise LandscapeError(f"Range {shown} must have finite START < STOP.")
    if max(abs(start), abs(stop)) > MAX_COORDINATE:
        raise LandscapeError(f"Range {shown} reaches past {MAX_COORDINATE:,.0f} times the directions, which moves the "
                             "weights a million times their own size (every loss there is overflow); give e.g. -1:1.")
    return start, stop


MAX_COORDINATE = 1e6
"""The largest surface coordinate taken: a random direction is as large as the weights (filter-normalised), so
coordinates beyond it measure overflow, not the landscape."""


# -- one checkpoint -------------------------------------------------------------------------------------------------
def surface_analysis(
    closure: Any,
    center: ParamDict,
    directions: Sequence[ParamDict],
    kind: str,
    axes: Sequence[np.ndarray],
    *,
    extra: ParamDict | None = None,
    extra_targets: Sequence[ParamDict] | None = None,
    callback: Any = None,
    world: Any = None,
):
    """Loss and top-1 accuracy on the grid ``axes`` (one array per dimension) around one checkpoint.

    For ``kind`` in random, pca, eigen, ``directions`` are :math:`d_1 (, d_2)` and the weights
    :math:`w_0 + a d_1 + b d_2`; for interpolate and plane they are the other checkpoints :math:`w_1 (, w_2)` and
    the weights :math:`(1 - a - b) w_0 + a w_1 + b w_2`. ``closure`` is a
    :class:`~landscape.curvature.loss.LossFunction`; ``extra`` tensors (buffers) are passed unchanged, except on
    a line or plane whose checkpoints' buffers are given as ``extra_targets``: there the floating-point ones (e.g.
    BatchNorm running statistics) move with the weights, so that the line ends at the other checkpoint itself (the
    ``buffers`` attribute says which). With ``world`` the grid points are shared out between processes
    (:func:`evaluate_grid`).

    Returns an ``xarray.Dataset`` (no checkpoint dimension): ``loss``/``top1`` over ``a`` (and ``b``),
    ``direction_norm`` over ``axis`` (the Euclidean norm of each direction, :math:`w_k - w_0` for checkpoints),
    for interpolation ``loss_barrier``/``error_barrier`` (see :func:`barrier`), for a plane ``axis_cosine``.
    """
    import time

    import xarray as xr

    started = time.perf_counter()
    dims = len(axes)
    if len(directions) != dims:
        raise ValueError(f"{dims} axes need {dims} directions, got {len(directions)}")
    names = ["a", "b"][:dims]
    coefficients = grid_coefficients(kind, axes)
    moving = [n for n, t in (extra or {}).items() if t.is_floating_point() and extra_targets
              and all(n in o and tuple(o[n].shape) == tuple(t.shape) for o in extra_targets)]
    if kind in ("interpolate", "plane") and moving:
        extra_bases = [{n: extra[n] for n in moving},
                       *[{n: o[n].to(device=extra[n].device, dtype=extra[n].dtype) for n in moving}
                         for o in extra_targets]]
    else:
        extra_bases = None
    if kind in ("interpolate", "plane"):
        steps = [{n: d[n] - center[n] for n in center} for d in directions]
    else:
        steps = list(directions)
    norms = [float(torch.sqrt(sum((t.double() ** 2).sum() for t in s.values()))) for s in steps]
    if kind in ("interpolate", "plane"):  # before the grid is paid for: a line of length 0, a plane of one line
        if 0.0 in norms:
            raise LandscapeError(f"The {'line' if kind == 'interpolate' else 'plane'}'s target "
                                 f"{norms.index(0.0) + 1} has the very weights of the checkpoint it starts from, so "
                                 "the slice would be one point; give another checkpoint or run.")
        if kind == "plane":
            cosine = sum(float((steps[0][n].double() * steps[1][n].double()).sum()) for n in center) / (
                norms[0] * norms[1])
            if abs(cosine) > 1 - 1e-9:
                raise LandscapeError(f"The plane's two targets lie on one line through the checkpoint (cosine "
                                     f"{cosine:.6f}), so they span no plane; give two targets in other directions.")
    loss, top1 = evaluate_grid(closure, [center, *directions], coefficients, extra=extra, extra_bases=extra_bases,
                               progress=callback, world=world)
    shape = tuple(len(a) for a in axes)
    data: dict[str, Any] = {
        "loss": (names, loss.reshape(shape), loss_attrs(getattr(closure, "criterion", None))),
        "top1": (names, top1.reshape(shape), {"long_name": "top-1 accuracy on the evaluation set", "units": "%"}),
        "direction_norm": (("axis",), np.asarray(norms), {"long_name": "Euclidean norm of one direction unit"}),
    }
    if kind == "interpolate":
        data["loss_barrier"] = ((), barrier(loss, axes[0]),
                                {"long_name": "max loss on [0, 1] minus the endpoints' mean",
                                 "units": data["loss"][2].get("units", "loss units")})
        data["error_barrier"] = ((), barrier(100.0 - top1, axes[0]),
                                 {"long_name": "max top-1 error on [0, 1] minus the endpoints' mean", "units": "%"})
    if kind == "plane":
        dot = sum(float((steps[0][n].double() * steps[1][n].double()).sum()) for n in center)
        data["axis_cosine"] = ((), dot / max(norms[0] * norms[1], 1e-300), {"long_name": "cosine between the axes"})
    data["seconds"] = ((), time.perf_counter() - started, {"long_name": "wall time", "units": "s"})
    coords = {n: (n, np.asarray(a, dtype=np.float64), {"long_name": f"coordinate along direction {k + 1}",
                                                       "units": "direction units"})
              for k, (n, a) in enumerate(zip(names, axes))}
    coords["axis"] = names
    ds = xr.Dataset(data, coords=coords)
    floating = [n for n, t in (extra or {}).items() if t.is_floating_point()]
    if extra_bases:
        ds.attrs["buffers"] = (f"moved with the weights ({', '.join(moving)}); others held at the centre's values"
                               if len(moving) < len(floating) else
                               f"moved with the weights ({', '.join(moving)})")
    elif floating:
        ds.attrs["buffers"] = f"held at the centre's values ({', '.join(floating)})"
    return ds


# -- a run --------------------------------------------------------------------------------------------------------
@dataclass
class SurfaceSettings(EvaluationSettings):
    """What ``landscape analyze surface`` evaluates at each checkpoint, and on which data.

    ``directions`` (see the module docstring) and ``dims`` (1 or 2; interpolation is a line, a plane is 2-D);
    ``range`` ``(start, stop)`` in direction units (``None``: :data:`DEFAULT_RANGES` of the kind) with ``points``
    per axis; ``one_dim``/``qkv``/``tokens``: the filter-normalisation policy of random directions. The loss is the mean
    cross-entropy over ``samples`` examples of the run's dataset (``dataset``/``split``, chosen with ``seed``, which
    also seeds random directions) in ``dtype``. ``batch_size`` trades memory for speed only.
    """

    directions: str = "random"
    dims: int | None = None
    range: tuple[float, float] | None = None
    points: int = 51
    one_dim: str = "zero"
    qkv: str = "head"
    tokens: str = "token"

    def validate(self) -> DirectionSpec:
        """Check the settings, fill in ``dims`` and ``range`` defaults, and return the parsed directions."""
        from landscape.errors import ConfigError

        spec = parse_directions(self.directions)
        if self.dims is None:
            self.dims = spec.dims_allowed[-1] if spec.kind != "interpolate" else 1
        if self.dims not in spec.dims_allowed:
            hint = {"interpolate": "a line: use --dims 1, or plane:RUN2,RUN3 for a plane",
                    "plane": "two-dimensional: use --dims 2, or interpolate:RUN2 for a line"}
            raise ConfigError(
                f"Directions {spec.kind} are {hint.get(spec.kind, 'for --dims 1 or 2')}, not --dims {self.dims}.")
        self.range = parse_range(self.range if self.range is not None else None, spec.kind)
        most = 10_001 if self.dims == 1 else 1_001  # a 2D grid evaluates points squared
        if not 2 <= self.points <= most:
            raise ConfigError(f"--points must be from 2 to {most:,} for --dims {self.dims}, not {self.points}.")
        if self.one_dim not in ONE_DIM_POLICIES:
            raise ConfigError(f"Unknown policy {self.one_dim!r} for 1-D parameters; accepted are zero, filter and "
                              "weight.")
        if self.tokens not in TOKEN_POLICIES:
            raise ConfigError(f"Unknown token-table normalisation {self.tokens!r}; accepted are token and tensor.")
        if self.qkv not in QKV_POLICIES:
            raise ConfigError(f"Unknown qkv normalisation {self.qkv!r}; accepted are head and row.")
        changed = [f.name for f in fields(self)
                   if f.name in ("one_dim", "qkv", "tokens") and getattr(self, f.name) != f.default]
        refuse_normalization_policies(spec.kind, ["--" + n.replace("_", "-") for n in changed])
        self.check_evaluation()
        for axis in self.axes():
            if len(np.unique(axis)) < len(axis):  # a range narrower than floating point can split
                raise ConfigError(f"--range {self.range[0]:.17g}:{self.range[1]:.17g} is too narrow for {self.points} "
                                  "distinct grid points; give a wider range.")
        return spec

    def axes(self) -> list[np.ndarray]:
        """The grid coordinates of each dimension (checkpoint coordinates included, see :func:`grid_axes`)."""
        anchors = (0.0, 1.0) if parse_directions(self.directions).kind in ("interpolate", "plane") else (0.0,)
        return [grid_axes(self.range, self.points, anchors) for _ in range(self.dims)]


def refuse_normalization_policies(kind: str, given: list[str]) -> None:
    """Refuse filter-normalisation policies (``given``, named as the caller spells them) with directions of
    ``kind`` other than random ones, which are used as they are: recorded, the policies would describe nothing
    measured, and would keep the plain rerun from its own results."""
    from landscape.errors import ConfigError

    if kind != "random" and given:
        one = len(given) == 1
        raise ConfigError(f"{' and '.join(given)} {'chooses' if one else 'choose'} how random directions are "
                          f"normalised, and {kind} directions are used as they are: leave {'it' if one else 'them'} "
                          "out.")


def normalization_policies(settings: "SurfaceSettings") -> dict[str, str]:
    """The filter-normalisation policy of each kind of parameter, as the surface results' attributes record it
    (``normalization_*``), each saying where it departs from Li et al. (2018) and how to get theirs."""
    policies = {
        "normalization_weights": "matrices and convolutions: one filter per output row, as Li et al. (2018)",
        "normalization_qkv": {
            "head": "fused qkv weight: one filter per head's q, k or v block (Li et al.: per row, --qkv row)",
            "row": "fused qkv weight: one filter per row, as Li et al. (2018)"}[settings.qkv],
        "normalization_tokens": {
            "token": "pos_embed and cls/reg/dist/mask tokens: one filter per token (Li et al.'s code: one for the "
                     "whole (1, N, D) tensor, --tokens tensor)",
            "tensor": "pos_embed and cls/reg/dist/mask tokens: one filter per first-dimension slice, the whole "
                      "(1, N, D) tensor, as Li et al.'s code"}[settings.tokens],
        "normalization_one_dim": {
            "zero": "1-D tensors (biases, norms): zero, as Li et al.'s paper and their code's --xignore biasbn "
                    "(their code's default: d = w, --one-dim weight)",
            "filter": "1-D tensors (biases, norms): one filter per tensor (Li et al.'s code: d = w)",
            "weight": "1-D tensors (biases, norms): d = w, as Li et al.'s code by default"}[settings.one_dim],
    }
    policies["normalization_applies_to"] = ("random directions only" if parse_directions(settings.directions).kind
                                            == "random" else "nothing: these directions are not filter-normalised")
    return policies


def surface_path(run: Any, spec: DirectionSpec, dims: int, weights: str = "raw") -> Path:
    """``RUN/analysis/surface-<directions>-<dims>d.nc``, e.g. ``surface-random-2d.nc`` (``-ema`` appended for the
    EMA weights)."""
    from landscape.analyses.results import results_path

    return results_path(run, f"surface-{spec.slug(Path(run.root))}-{dims}d", {"weights": weights})


def directions_dir(run: Any) -> Path:
    """``RUN/analysis/directions/``: saved directions, reused by every later checkpoint and re-run."""
    return Path(run.analysis_dir) / "directions"


def _load_weights(path: Path, weights: str, shapes: dict[str, tuple[int, ...]], buffers: Sequence[str],
                  device: torch.device, dtype: torch.dtype) -> tuple[ParamDict, ParamDict]:
    """A checkpoint's parameters (those of ``shapes``) and buffers as fresh tensors in ``dtype`` on ``device``.

    Fresh copies have their own contiguous storage, so a checkpoint evaluated as a grid point runs through
    exactly the same kernels as the same checkpoint loaded into a model.
    """
    from landscape.checkpoints import check_finite_weights, check_real_weights, load_checkpoint

    _, state = load_checkpoint(path, weights=weights)
    check_same_parameters({n: torch.empty(s, device="meta") for n, s in shapes.items()},
                          {n: state[n] for n in shapes if n in state}, what=f"Checkpoint {path}")
    check_real_weights(state, list(shapes), source=str(path))  # the others check these as they build the model
    check_finite_weights(path, {n: state[n] for n in [*shapes, *buffers] if n in state}, weights)

    def fresh(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device=device)
        return t.clone(memory_format=torch.contiguous_format)

    return {n: fresh(state[n]) for n in shapes}, {n: fresh(state[n]) for n in buffers if n in state}


def saved_random_directions(run: Any, shapes: dict[str, tuple[int, ...]], seed: int) -> list[ParamDict]:
    """The raw (unnormalised) Gaussian directions of ``run`` for ``seed``: read from
    ``directions/random-seed<seed>.safetensors``, or drawn (two of them, so 1-D and 2-D slices share the first)
    and saved there."""
    path = directions_dir(run) / f"random-seed{seed}.safetensors"
    reference = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    if path.exists():
        directions, _ = load_directions(path)
        for d in directions:
            check_same_parameters(reference, d, what=f"Directions file {path}")
        return directions
    directions = random_directions(reference, 2, seed=seed)
    save_directions(path, directions, {"kind": "random", "seed": seed, "distribution": "standard normal, float32",
                                       "normalisation": "filter-normalised against each checkpoint when used"})
    return directions


def saved_trajectory_pca(run: Any, shapes: dict[str, tuple[int, ...]], weights: str) -> TrajectoryPCA:
    """The trajectory PCA of ``run`` over all its checkpoints, read from ``directions/pca-<weights>.safetensors``
    when it was made from the same checkpoints, else computed and saved there."""
    infos = run.checkpoints()
    for info in infos:  # every one, not only those to measure: another run's would bend the plane
        run.check_checkpoint_model(info)
    names = [i.name for i in infos]
    path = directions_dir(run) / f"pca-{weights}.safetensors"
    if path.exists():
        directions, meta = load_directions(path)
        if meta.get("checkpoints") == names and len(directions) == 2:
            return TrajectoryPCA(directions, meta["scales"], meta["explained_variance"],
                                 np.asarray(meta["coordinates"], dtype=np.float64), names)
    pca = trajectory_pca([i.path for i in infos], shapes, count=2, weights=weights)
    save_directions(path, pca.directions, {"kind": "pca", "weights": weights, "checkpoints": names,
                                           "scales": pca.scales, "explained_variance": pca.explained_variance,
                                           "coordinates": pca.coordinates.tolist()})
    return pca


class SurfaceAnalysis(Analysis):
    """A loss surface of :class:`SurfaceSettings` around each checkpoint of a run (:func:`analyze`), results in
    ``RUN/analysis/surface-<directions>-<dims>d.nc`` (:func:`surface_path`).

    The stored settings name the target checkpoints by their resolved files (relative to the run's folder, so runs
    moved together continue their lines) and, for ``pca``, the trajectory, so a re-run with other targets or a
    longer trajectory is refused rather than mixed in. The model is built once and each checkpoint's weights are
    evaluated on the grid through it; random directions and the trajectory PCA are made once per run (by the first
    process) and saved in ``RUN/analysis/directions/``. Besides the driver's shard modes, ``shard="grid"`` shares
    out each checkpoint's grid points.
    """

    name = "surface"
    shard_modes = SHARD_MODES
    unit = " point"

    def __init__(self, settings: SurfaceSettings | None = None):
        super().__init__(settings or SurfaceSettings())
        self.spec = parse_directions(self.settings.directions)
        self._targets: list[Any] | None = None
        self._digests: list[str] | None = None

    def targets(self) -> list[Any]:
        """The checkpoints the directions point to (interpolate, plane), resolved once."""
        if self._targets is None:
            self._targets = [ref.resolve() for ref in self.spec.targets]
        return self._targets

    def stored_targets(self, run: Any) -> list[str]:
        """The target checkpoints as the settings record them: their resolved files, relative to ``run``'s folder
        (``../runB/checkpoints/epoch-0010.safetensors``), so that runs moved or copied together continue their
        lines and planes, while a target moved apart from the run is another setting."""
        from landscape.analyses.results import stored_path

        return [stored_path(t.path, run.root) for t in self.targets()]

    def target_digests(self) -> list[str]:
        """The SHA-256 of each target checkpoint's tensors (:func:`~landscape.checkpoints.weights_sha256`), read
        once: the same weights saved again (a resume that rewrites its last checkpoint, a retraining with the same
        seed) are the same target, whatever their header's timings say."""
        if self._digests is None:
            from landscape.checkpoints import weights_sha256

            self._digests = [weights_sha256(t.path) for t in self.targets()]
        return self._digests

    def determining(self, run: Any) -> dict[str, Any]:
        determining = self.settings.determining()
        determining["directions"] = self.spec.kind  # the targets by their resolved files, however RUN2 was spelled
        determining["targets"] = self.stored_targets(run)
        if self.spec.targets:  # what the files held: a run retrained in place, or another run moved to that path,
            determining["target_weights_sha256"] = self.target_digests()  # is another target, not a continuation
        if self.spec.kind == "pca":
            determining["trajectory"] = [i.name for i in run.checkpoints()]
        return determining

    def results_path(self, run: Any) -> Path:
        """:func:`surface_path`, or the file of the same line or plane spelled the other way (``RUN2`` for its last
        checkpoint, ``RUN2@EPOCH``) whose recorded targets are these: one slice is measured into one file."""
        path = surface_path(run, self.spec, self.settings.dims, self.settings.weights)
        if path.exists() or not self.spec.targets:
            return path
        import itertools

        from landscape.analyses.results import read_results
        from landscape.summary import read_settings

        spellings = [[CheckpointRef(ref.run, None), CheckpointRef(ref.run, info.epoch)] if info.epoch is not None
                     else [ref] for ref, info in zip(self.spec.targets, self.targets())]
        wanted = self.stored_targets(run)
        for refs in itertools.product(*spellings):
            other = surface_path(run, DirectionSpec(self.spec.kind, list(refs)), self.settings.dims,
                                 self.settings.weights)
            if other != path and other.is_file():
                ds = read_results(other)
                if ds is not None and read_settings(ds).get("targets") == wanted:  # its digests are checked on opening
                    return other
        return path

    def attrs(self) -> dict[str, Any]:
        return normalization_policies(self.settings)

    def work(self, job: Any) -> int:
        return self.settings.points ** self.settings.dims

    def prepare(self, job: Any, todo: Sequence[Any]) -> None:
        from landscape.analyses import distributed
        from landscape.curvature.loss import LossFunction
        from landscape.checkpoints import build_model

        settings, run, kind = self.settings, job.run, self.spec.kind
        model = build_model(todo[0]).to(device=job.device, dtype=job.dtype)  # weights come from each checkpoint
        self.shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        self.buffers = [n for n, _ in model.named_buffers()]
        x, y, data_parallel = distributed.split_evaluation_set(job.x, job.y, job.data_parallel_world)
        self.closure = LossFunction(model, x, y, batch_size=settings.batch_size, skip_unused=False,
                                    data_parallel=data_parallel)
        files = {info.path.resolve(): info.name for info in todo}
        for target in self.targets():
            if target.path.resolve() in files:  # before anything is measured: the rest of the series would be lost
                raise LandscapeError(
                    f"The {'line' if kind == 'interpolate' else 'plane'}'s target {target.path} is the checkpoint "
                    f"{files[target.path.resolve()]} to be measured, so its slice there would be one point; leave it "
                    "out of --checkpoints or give another target.")
            check_same_architecture(model, build_model(target), what=f"{target.path}", reference=f"{todo[0].path}")
        loaded = [self.load_weights(job, t.path) for t in self.targets()]
        self.others = [weights for weights, _ in loaded]
        self.other_buffers = [buffers for _, buffers in loaded]  # running statistics move along a line or plane
        self.raw = distributed.main_first(lambda: saved_random_directions(run, self.shapes, settings.seed),
                                          job.world) if kind == "random" else None
        self.pca = distributed.main_first(lambda: saved_trajectory_pca(run, self.shapes, settings.weights),
                                          job.world) if kind == "pca" else None
        self.heads = qkv_head_counts(model)
        self.axes = settings.axes()

    def load_weights(self, job: Any, path: Path) -> tuple[ParamDict, ParamDict]:
        return _load_weights(path, self.settings.weights, self.shapes, self.buffers, job.device, job.dtype)

    def load(self, job: Any, info: Any) -> tuple[ParamDict, ParamDict]:
        return self.load_weights(job, info.path)

    def measure(self, job: Any, info: Any, loaded: tuple[ParamDict, ParamDict], callback: Any) -> Any:
        settings, kind, pca = self.settings, self.spec.kind, self.pca
        center, extra = loaded
        extras: dict[str, Any] = {}
        if kind in ("interpolate", "plane"):
            directions = self.others
        elif kind == "random":
            directions = [filter_normalize(self.raw[k], center, qkv_heads=self.heads, one_dim=settings.one_dim,
                                           qkv=settings.qkv, tokens=settings.tokens)
                          for k in range(settings.dims)]
        elif kind == "pca":
            directions = [{n: t.to(job.device, job.dtype) for n, t in d.items()} for d in pca.directions[:settings.dims]]
            at = pca.checkpoints.index(info.name)
            relative = pca.coordinates - pca.coordinates[at]
            extras["trajectory_coordinates"] = (("trajectory", "axis"), relative[:, :settings.dims],
                                                {"long_name": "every checkpoint of the run projected on the plane",
                                                 "units": "direction units"})
            extras["explained_variance"] = (("axis",), np.asarray(pca.explained_variance[:settings.dims]),
                                            {"long_name": "fraction of the trajectory's variance along each direction"})
        else:
            directions, eigenvalues = _eigen_directions(job.run, info.name, self.shapes, settings.dims, job.device,
                                                        job.dtype, weights=settings.weights)
            extras["eigenvalue"] = (("axis",), eigenvalues, {"long_name": "Hessian eigenvalue of each direction"})
        ds = surface_analysis(self.closure, center, directions, kind, self.axes, extra=extra,
                              extra_targets=self.other_buffers if kind in ("interpolate", "plane") else None,
                              callback=callback, world=job.world if job.shard == "grid" else None)
        for name, value in extras.items():
            ds[name] = value
        if pca is not None:
            ds = ds.assign_coords(trajectory=("trajectory", pca.checkpoints))
        return ds


def run_surface_analysis(run: Any, settings: SurfaceSettings | None = None, *, checkpoints: str = "last",
                         **options: Any):
    """:func:`~landscape.analyses.driver.analyze` with a :class:`SurfaceAnalysis`, at the last checkpoint unless
    ``checkpoints`` says otherwise; ``options`` are the driver's (``force``, ``data_dir``, ``device``,
    ``progress``, ``shard``)."""
    return analyze(run, SurfaceAnalysis(settings), checkpoints=checkpoints, **options)


def check_same_architecture(model: torch.nn.Module, other: torch.nn.Module, *, what: str, reference: str) -> None:
    """Refuse a checkpoint ``what`` whose network differs from ``reference``'s in more than its weights: the
    surface evaluates every point with ``reference``'s model, so the far end would not be ``what``'s network."""
    from landscape.models import architecture_signature

    mine, theirs = architecture_signature(model), architecture_signature(other)
    if mine == theirs:
        return
    detail = f"{len(theirs)} modules against {len(mine)}"
    for a, b in zip(mine, theirs):
        if a != b:
            detail = (f"{a[0] or 'the model'}: {b[1]} {dict(b[2])} against {a[1]} {dict(a[2])}" if a[0] == b[0]
                      else f"module {b[0] or 'root'} against {a[0] or 'root'}")
            break
    raise LandscapeError(f"{what} is another architecture than {reference} ({detail}), though its tensors have the "
                         f"same shapes: the surface would evaluate its weights in {reference}'s network, so the path "
                         "would not end at its network; compare runs of one architecture.")


def _eigen_directions(run: Any, checkpoint: str, shapes: dict[str, tuple[int, ...]], count: int,
                      device: torch.device, dtype: torch.dtype, weights: str = "raw"
                      ) -> tuple[list[ParamDict], np.ndarray]:
    """The top ``count`` eigenvectors of the whole model's Hessian at ``weights`` (raw or EMA) saved for
    ``checkpoint``, as full parameter dicts, and their eigenvalues."""
    from landscape.analyses.eigenvectors import check_vectors_of, eigenvectors_path, load_eigenvectors

    wanted = {"weights": weights}
    path = eigenvectors_path(run, checkpoint, wanted)
    if not path.exists():
        ema = " --weights ema" if weights == "ema" else ""
        raise LandscapeError(
            f"No Hessian eigenvectors are saved for checkpoint {checkpoint} ({path}); compute them first with "
            f"'landscape analyze hessian {run.root} --top-k {max(count, 2)} --save-eigenvectors{ema}'.")
    saved = load_eigenvectors(path)
    check_vectors_of(saved, path, wanted)
    have = saved.vectors.get("largest")
    if have is None or have.shape[0] < count:
        raise LandscapeError(
            f"{path} holds {0 if have is None else have.shape[0]} largest eigenvector(s); --dims {count} needs "
            f"{count}: rerun the Hessian analysis with --top-k {count} or more and --save-eigenvectors.")
    unknown = [n for n in saved.shapes if n not in shapes or tuple(saved.shapes[n]) != tuple(shapes[n])]
    if unknown:
        raise LandscapeError(f"The eigenvectors in {path} do not fit the model's parameters (e.g. {unknown[0]!r}).")
    directions = []
    for k in range(count):
        vector = saved.direction(k, "largest")
        directions.append({n: (vector[n] if n in vector else torch.zeros(s)).to(device, dtype)
                           for n, s in shapes.items()})
    return directions, np.asarray(saved.eigenvalues["largest"][:count], dtype=np.float64)


def surface_summary(ds: Any) -> list[dict[str, Any]]:
    """One row per checkpoint of a surface Dataset, for a table: the loss at the checkpoint, the grid's lowest and
    highest loss, and for interpolation the loss at the far end and the barriers."""
    rows = []
    grid_dims = [d for d in ("a", "b") if d in ds.dims]
    for i, name in enumerate(ds["checkpoint"].values):
        entry = ds.isel(checkpoint=i)
        epoch = float(entry["epoch"])
        row: dict[str, Any] = {"checkpoint": str(name), "epoch": None if math.isnan(epoch) else int(epoch)}
        origin = entry["loss"].sel({d: 0.0 for d in grid_dims}) if all(
            (entry[d].values == 0.0).any() for d in grid_dims) else None
        row["loss at checkpoint"] = float(origin) if origin is not None else float("nan")
        row["min loss"] = float(entry["loss"].min())
        row["max loss"] = float(entry["loss"].max())
        if "loss_barrier" in entry:
            row["loss at end"] = float(entry["loss"].sel(a=1.0)) if (entry["a"].values == 1.0).any() else float("nan")
            row["loss barrier"] = float(entry["loss_barrier"])
            row["error barrier"] = float(entry["error_barrier"])
        row["seconds"] = float(entry["seconds"])
        rows.append(row)
    return rows

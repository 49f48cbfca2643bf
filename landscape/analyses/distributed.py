"""Analyses on several processes under ``torchrun``: a data-parallel evaluation set, or sharded checkpoints or grid
points.

``torchrun --nproc-per-node N -m landscape analyze hessian|sharpness|surface RUN ...`` starts N processes; each
analysis driver joins them into one process group (:func:`join`: NCCL on GPUs, gloo on CPUs, process ``r`` on GPU
``LOCAL_RANK``, the setup the trainer uses) and divides the work in one of three ways.

data-parallel (no ``--shard``)
    One checkpoint at a time. The evaluation set of :math:`N` examples is cut into contiguous slices, one per
    process (:func:`split_evaluation_set`); each process weights its batches by :math:`n_b / N` with the *whole*
    set's :math:`N` (or by their share of the whole set's counted targets,
    :meth:`~landscape.curvature.loss.LossFunction.batch_weights`), and every loss, accuracy count, gradient and Hessian-vector product is summed over the
    processes (:meth:`DataParallel.all_reduce`), so

    .. math:: L(\\theta) = \\sum_{r} \\sum_{b \\in \\text{slice}_r} \\frac{n_b}{N}\\, \\bar\\ell_b(\\theta)

    is the single-process operator, summed in another order (equal up to rounding). Every process draws the same
    probes from the same seed and gets bitwise the same all-reduced products, so the estimators take the same
    steps everywhere.
``--shard checkpoints``
    Each process takes whole checkpoints, dealt round-robin in step order (or, for Hessian eigenvalues warm-started
    along the series, one contiguous chunk each), with the whole evaluation set. Every
    number is computed by one process exactly as a single process computes it: the results file is identical
    value for value, except that a warm-started eigensolve at the first checkpoint of a chunk starts cold, so its
    eigenvalues agree with one process's to the requested tolerance, not bitwise (each entry records its start).
``--shard grid`` (surfaces)
    One checkpoint at a time; its grid points are cut into contiguous blocks, one per process, each point evaluated
    on the whole set; identical value for value.

Only the first process (rank 0) writes the results file, after each checkpoint (with ``--shard checkpoints``,
after each round of one checkpoint per process), so a re-run resumes from what was written. A failure in work that
each process does on its own (a sharded checkpoint or block of grid points, writing the file) is exchanged after
that piece of work, and every process raises it (:func:`raise_if_failed`), so the job stops with the failing
process's message and ``torchrun`` exits non-zero. A process that dies inside a collective operation (for
instance out of memory inside a data-parallel product) ends the job through ``torchrun``, which stops the others.

Without torchrun's environment there is one process and everything here is a no-op.
"""

from __future__ import annotations

import atexit
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence, TypeVar

import torch
import torch.distributed as dist

from landscape.errors import ConfigError, LandscapeError
from landscape.trainers.distributed import Distributed

Tensor = torch.Tensor
T = TypeVar("T")
R = TypeVar("R")

SHARD_MODES = ("checkpoints", "grid")

__all__ = [
    "SHARD_MODES", "DataParallel", "Distributed", "check_shard", "contiguous_range", "for_each_checkpoint", "join",
    "main_first", "map_sharded", "on_main", "processes_attrs", "raise_if_failed", "round_robin", "sharded_rounds",
    "split_evaluation_set",
]


# -- the process group ------------------------------------------------------------------------------------------
def join(device: str | torch.device | None = None) -> tuple[Distributed, torch.device]:
    """This process's place in the job and its device, joining the process group that ``torchrun`` describes.

    ``device`` is ``auto`` (``None``), ``cpu``, ``cuda`` or ``cuda:K``; under torchrun each process takes GPU
    ``LOCAL_RANK``. The group is created once per process (NCCL on GPUs, gloo on CPUs) and left at exit; a group
    created by the caller is used as it is. Without torchrun's environment: one process, no group.
    """
    from landscape.trainers.distributed import setup

    info, torch_device = setup(None if device is None else str(device))
    if dist.is_available() and dist.is_initialized():
        info.rank, info.world_size = dist.get_rank(), dist.get_world_size()
    if info.started_here:
        atexit.register(_leave)
    return info, torch_device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def check_shard(shard: str | None, allowed: Sequence[str], analysis: str) -> str | None:
    """``shard`` if ``analysis`` can shard that way (``None``: data-parallel), else a :class:`ConfigError`."""
    if shard is None or shard in allowed:
        return shard
    raise ConfigError(f"The {analysis} analysis cannot be sharded by {shard!r}; accepted are "
                      f"{' and '.join(allowed)} (or no --shard for a data-parallel evaluation set).")


def processes_attrs(world: Distributed, shard: str | None) -> dict[str, int | str]:
    """Attributes recording how a results file was last computed: ``processes`` and ``parallelism``."""
    parallelism = "single process" if not world.enabled else f"sharded {shard}" if shard else "data-parallel"
    return {"processes": world.world_size, "parallelism": parallelism}


# -- dividing the work ----------------------------------------------------------------------------------------------
def contiguous_range(n: int, rank: int, world_size: int) -> range:
    """Items ``[floor(r n / W), floor((r + 1) n / W))`` of ``n``: contiguous blocks, in rank order, covering all
    ``n`` once, their sizes differing by at most one."""
    return range(rank * n // world_size, (rank + 1) * n // world_size)


def round_robin(items: Sequence[T], world: Distributed) -> list[T]:
    """This process's items when they are dealt in turn: ``items[rank::world_size]``."""
    return list(items[world.rank::world.world_size])


@dataclass
class DataParallel:
    """One process's contiguous slice of an evaluation set of ``num_examples`` examples split over ``world``.

    A :class:`~landscape.curvature.loss.LossFunction` given one weights its batches by
    :math:`n_b /` ``num_examples`` and sums every loss, count, gradient and product with :meth:`all_reduce`.
    """

    num_examples: int
    world: Distributed
    targets: Tensor | None = None
    """The whole set's targets (every process holds them): a criterion whose mean counts targets otherwise than by
    example (``ignore_index``) weights each batch by its share of the whole set's count."""

    def all_reduce(self, tensor: Tensor) -> Tensor:
        """Sum ``tensor`` over the processes, in place; every process gets bitwise the same sum."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor


def split_evaluation_set(x: Tensor, y: Tensor, world: Distributed | None) -> tuple[Tensor, Tensor, DataParallel | None]:
    """This process's contiguous slice of ``(x, y)`` (:func:`contiguous_range`) and the :class:`DataParallel` that
    sums over the slices; ``(x, y, None)`` unchanged for one process."""
    if world is None or not world.enabled:
        return x, y, None
    if len(x) < world.world_size:
        raise LandscapeError(f"The evaluation set has {len(x)} examples, fewer than the {world.world_size} processes "
                             "it is split over; give --samples at least the number of processes.")
    part = contiguous_range(len(x), world.rank, world.world_size)
    return x[part.start:part.stop], y[part.start:part.stop], DataParallel(len(x), world, y)


# -- failures -------------------------------------------------------------------------------------------------------
def _message(error: BaseException | None) -> str | None:
    if error is None:
        return None
    return str(error) if isinstance(error, LandscapeError) else f"{type(error).__name__}: {error}"


def _raise_first(error: BaseException | None, messages: Sequence[str | None], world: Distributed) -> None:
    if error is not None:
        raise error
    for rank, message in enumerate(messages):
        if message is not None:
            raise LandscapeError(f"Process {rank} of {world.world_size} failed: {message}")


def raise_if_failed(error: BaseException | None, world: Distributed | None) -> None:
    """Collective: raise on every process if any process passes an ``error``.

    The failing process raises its own error (with its traceback); the others raise a :class:`LandscapeError` with
    the message of the first failing process. One process: ``error`` is raised if given.
    """
    if world is None or not world.enabled:
        if error is not None:
            raise error
        return
    messages: list[str | None] = [None] * world.world_size
    dist.all_gather_object(messages, _message(error))
    _raise_first(error, messages, world)


def on_main(fn: Callable[[], R], world: Distributed | None) -> R:
    """Collective: ``fn()`` on the first process only; its (picklable) value on every process, or its error raised
    on every process. For decisions the first process makes alone, such as which checkpoints are left to do."""
    if world is None or not world.enabled:
        return fn()
    value, error = None, None
    if world.is_main:
        try:
            value = fn()
        except Exception as e:  # every failure must reach the others, not only user errors
            error = e
    box = [(value, _message(error))]
    dist.broadcast_object_list(box, src=0)
    value, message = box[0]
    _raise_first(error, [message], world)
    return value


def main_first(fn: Callable[[], R], world: Distributed | None) -> R:
    """Collective: ``fn()`` on the first process, then on the others once it succeeded; each keeps its own value.

    For a step that creates a file when it is missing and reads it otherwise (saved directions): it is created once.
    """
    if world is None or not world.enabled:
        return fn()
    value, error = None, None
    if world.is_main:
        try:
            value = fn()
        except Exception as e:
            error = e
    box = [_message(error)]
    dist.broadcast_object_list(box, src=0)
    _raise_first(error, box, world)
    if not world.is_main:
        try:
            value = fn()
        except Exception as e:
            error = e
    raise_if_failed(error, world)
    return value  # type: ignore[return-value]


# -- sharded loops --------------------------------------------------------------------------------------------------
def map_sharded(fn: Callable[[T], R], items: Iterable[T], world: Distributed | None) -> list[R]:
    """Collective: ``[fn(item) for item in items]`` with the items cut into contiguous blocks, one per process.

    Every process gets the whole list, in item order; a failure on any process is raised on every process. ``fn``
    must do its work alone (no collective operations), and its results must be picklable.
    """
    items = list(items)
    if world is None or not world.enabled:
        return [fn(item) for item in items]
    mine: list[R] = []
    error = None
    try:
        mine = [fn(items[i]) for i in contiguous_range(len(items), world.rank, world.world_size)]
    except Exception as e:
        error = e
    parts: list[Any] = [None] * world.world_size
    dist.all_gather_object(parts, (mine, _message(error)))
    _raise_first(error, [message for _, message in parts], world)
    return [value for values, _ in parts for value in values]


def for_each_checkpoint(checkpoints: Sequence[T], compute: Callable[[T], R], write: Callable[[T, R], Any],
                        world: Distributed | None, *, shard: bool = False, contiguous: bool = False) -> None:
    """``write(c, compute(c))`` for every checkpoint ``c`` in order, ``write`` on the first process only.

    Without ``shard`` every process computes every checkpoint together (``compute`` may use collective operations:
    a data-parallel evaluation set, sharded grid points) and the first writes it. With ``shard`` the checkpoints are
    dealt round-robin, one per process per round, each computed by its process alone; after each round the entries
    are gathered on the first process, which writes them in order. After each write a failure anywhere (a sharded
    ``compute``, the write) is raised on every process, after the first has written every entry that succeeded.
    With ``shard`` and ``contiguous`` each process takes a contiguous chunk instead (:func:`sharded_rounds`), so
    that it computes neighbouring checkpoints one after another (warm starts); the writes then come in round order.
    """
    if world is None or not world.enabled:
        for checkpoint in checkpoints:
            write(checkpoint, compute(checkpoint))
        return
    if not shard:
        for checkpoint in checkpoints:
            entry = compute(checkpoint)
            error = None
            if world.is_main:
                try:
                    write(checkpoint, entry)
                except Exception as e:
                    error = e
            raise_if_failed(error, world)
        return
    size = world.world_size
    for batch in sharded_rounds(list(checkpoints), size, contiguous=contiguous):
        entry, error = None, None
        if world.rank < len(batch) and batch[world.rank] is not None:
            try:
                entry = compute(batch[world.rank])
            except Exception as e:
                error = e
        gathered: list[Any] | None = [None] * size if world.is_main else None
        dist.gather_object((entry, error is None), gathered, dst=0)
        if world.is_main:
            try:
                for checkpoint, (value, ok) in zip(batch, gathered):
                    if ok and checkpoint is not None:
                        write(checkpoint, value)
            except Exception as e:
                error = error or e
        raise_if_failed(error, world)


def sharded_rounds(items: list[T], world_size: int, *, contiguous: bool = False) -> list[list[T | None]]:
    """The rounds of a sharded loop: round ``i`` lists the item each process computes in it (``None``: nothing).

    Dealt round-robin, round ``i`` is ``items[i W:(i + 1) W]``; ``contiguous``: process ``r`` takes the
    :func:`contiguous_range` chunk ``r`` and computes its ``i``-th item in round ``i``.
    """
    if not contiguous:
        return [list(items[i:i + world_size]) for i in range(0, len(items), world_size)]
    chunks = [items[part.start:part.stop] for part in (contiguous_range(len(items), r, world_size)
                                                       for r in range(world_size))]
    rounds = max((len(chunk) for chunk in chunks), default=0)
    return [[chunk[i] if i < len(chunk) else None for chunk in chunks] for i in range(rounds)]

"""Data-parallel training on torch.distributed, set up from the environment that ``torchrun`` provides.

``torchrun --nproc-per-node N -m landscape train ...`` starts N processes with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address in their environment; :func:`setup` joins them into one process
group (NCCL on GPUs, gloo on CPUs). Without those variables everything here is a no-op for one process.

Each global batch is cut the same way whatever the number of processes (see
:mod:`landscape.trainers.batches`), and DistributedDataParallel averages the gradients, so N processes take
the same optimizer steps as one process up to floating-point summation order.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from landscape.errors import LandscapeError


@dataclass
class Distributed:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    started_here: bool = False  # this module created the process group and tears it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_int(name: str, default: int) -> int:
    """The whole number in the environment variable ``name`` (``default`` when unset or empty), as torchrun sets
    ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; anything else is one sentence."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise LandscapeError(f"{name}={value!r} in the environment is not a whole number; torchrun sets it to one, "
                             f"so start the job with torchrun or unset {name}.") from None


def end_with_launcher() -> None:
    """Ask Linux to send this process SIGTERM when the process that started it ends: torchrun starts each worker
    in a session of its own, so a SIGKILL of torchrun left them running (holding the run's lock) with nobody to
    collect them. SIGTERM stops a command as Ctrl-C does: what was saved stays, the lock goes. Elsewhere: nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    launcher = os.getppid()  # torchrun may be process 1 itself (a container's entry point)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, int(signal.SIGTERM), 0, 0, 0) != 0:  # PR_SET_PDEATHSIG
            return
    except (OSError, AttributeError):
        return
    if os.getppid() != launcher:  # the launcher ended just before the request: stop as it would have
        os.kill(os.getpid(), signal.SIGTERM)


def check_device(device: str | None, *, here: bool = True) -> str:
    """The device ``device`` names (``auto`` or None: ``cuda`` when a GPU is visible, else ``cpu``), refused in one
    sentence when it is unknown or (``here``) not on this machine: ``cpu``, ``cuda``, ``cuda:K`` or ``mps``."""
    want = "auto" if device is None else str(device).strip().lower()
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want not in ("cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", want):
        raise LandscapeError(f"Unknown device {device!r}; accepted are auto, cpu, cuda, cuda:K and mps.")
    missing = device_missing(want) if here else None
    if missing:
        raise LandscapeError(f"Device {device!r} was asked for but {missing}"
                             f"{'; use --device cpu' if not want.startswith('cuda:') else ''}.")
    return want


def device_missing(device: str) -> str | None:
    """Why this machine cannot run on ``device`` (a name :func:`check_device` accepts), or None when it can:
    the reason alone, so that a study's check and a dry run can say it as a note."""
    want = str(device).strip().lower()
    if want.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    if want.startswith("cuda:") and int(want[5:]) >= torch.cuda.device_count():
        return (f"only {torch.cuda.device_count()} CUDA GPU(s) are visible (cuda:0 to "
                f"cuda:{torch.cuda.device_count() - 1})")
    if want == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        return "no Apple GPU (MPS) is available"
    return None


def setup(device: str | None = None) -> tuple[Distributed, torch.device]:
    """Join the process group described by the environment and choose this process's device.

    ``device`` is ``auto`` (or None: CUDA when available, else CPU), ``cpu``, ``cuda`` or ``cuda:K``; under
    torchrun each process takes GPU ``LOCAL_RANK``.
    """
    world_size, rank, local_rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise LandscapeError(f"The environment describes no process of a job (WORLD_SIZE={world_size}, RANK={rank}, "
                             f"LOCAL_RANK={local_rank}); start the job with torchrun, or unset these variables.")
    want = check_device(device)
    if want == "cuda":
        want = f"cuda:{local_rank if world_size > 1 else torch.cuda.current_device()}"
    torch_device = torch.device(want)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    info = Distributed(rank=rank, world_size=world_size, local_rank=local_rank)
    if world_size > 1:
        end_with_launcher()
    if world_size > 1 and not dist.is_initialized():
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name, "").strip()]
        if missing:  # a WORLD_SIZE left in the environment, not a job torchrun started
            raise LandscapeError(f"WORLD_SIZE={world_size} in the environment asks for a job of several processes, but "
                                 f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; start the job "
                                 "with torchrun, or unset WORLD_SIZE, RANK and LOCAL_RANK for one process.")
        try:
            dist.init_process_group(backend="nccl" if torch_device.type == "cuda" else "gloo")
        except (RuntimeError, ValueError) as e:  # torch.distributed's errors derive from RuntimeError
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise LandscapeError(f"The processes of the job could not join ({reason}); start the job with torchrun, "
                                 "or unset WORLD_SIZE, RANK and LOCAL_RANK for one process.") from None
        info.started_here = True
    return info, torch_device


def teardown(info: Distributed) -> None:
    if info.started_here and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], info: Distributed, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_error(error: LandscapeError | None, info: Distributed) -> None:
    """Raise on every process if the main process hit a user error (so that no process waits forever)."""
    message = str(error) if error is not None else None
    if info.enabled:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if error is not None:
        raise error
    if message:
        raise LandscapeError(message)


def gather(obj: Any, info: Distributed) -> list[Any]:
    """Every process's ``obj``, in rank order (on every process)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: Distributed) -> None:
    if info.enabled:
        dist.barrier()

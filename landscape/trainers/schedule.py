"""When a run writes checkpoints, and which it keeps.

Steps count optimizer updates, 1-based: step ``s`` is the state after the ``s``-th update, and the end of
epoch ``e`` is step ``e * updates_per_epoch``. A schedule is a set of such steps:

- ``epoch``: the end of every epoch (the default);
- ``epochs:N``: the end of every N-th epoch;
- ``steps:N``: every N updates;
- ``log:N``: N steps spaced evenly in :math:`\\log s` between 1 and the last step, rounded and de-duplicated,
  so checkpoints are dense while the weights move fast and sparse later;
- a union of these joined by ``+`` (``epoch+log:40``).

The last step is always in the schedule, so every run ends with its final weights on disk.
"""

from __future__ import annotations

import math

from landscape.errors import ConfigError

SCHEDULE_HELP = "epoch, epochs:N, steps:N or log:N, or several joined with + (epoch+log:40)"
KEEP_HELP = "all or last:K"


def checkpoint_steps(spec: str, *, updates_per_epoch: int, epochs: int) -> list[int]:
    """The sorted steps at which a run with this schedule writes a checkpoint."""
    total = updates_per_epoch * epochs
    steps = {total}
    for part in (spec or "epoch").split("+"):
        kind, _, arg = part.strip().partition(":")
        n = _positive(arg, spec) if kind != "epoch" else 0
        if kind == "epoch" and not arg:
            steps.update(e * updates_per_epoch for e in range(1, epochs + 1))
        elif kind == "epochs":
            steps.update(e * updates_per_epoch for e in range(n, epochs + 1, n))
        elif kind == "steps":
            steps.update(range(n, total + 1, n))
        elif kind == "log":
            steps.update(log_spaced_steps(n, total))
        else:
            raise ConfigError(f"Unknown checkpoint schedule {spec!r}; accepted are {SCHEDULE_HELP}.")
    return sorted(s for s in steps if 1 <= s <= total)


def log_spaced_steps(n: int, total: int) -> list[int]:
    """``n`` integers in ``[1, total]`` spaced evenly in log scale (fewer when rounding makes duplicates)."""
    if n == 1 or total == 1:
        return [total]
    ratio = math.log(total) / (n - 1)
    if n <= total:
        return sorted({min(total, max(1, round(math.exp(i * ratio)))) for i in range(n)})
    # more points than steps (log:1000000000 looped a billion times): step k is taken when some i lands in it,
    # i.e. the first i with exp(i * ratio) >= k - 1/2 is still below k + 1/2; one pass over the steps
    taken = []
    for k in range(1, total + 1):
        i = 0 if k == 1 else max(0, math.ceil(math.log(k - 0.5) / ratio))
        while i > 0 and math.exp((i - 1) * ratio) >= k - 0.5:  # rounding in the logarithm, either way
            i -= 1
        while math.exp(i * ratio) < k - 0.5:
            i += 1
        if i <= n - 1 and round(math.exp(i * ratio)) == k:
            taken.append(k)
    return taken


def checkpoints_to_delete(keep: str, steps_on_disk: list[int]) -> list[int]:
    """The steps whose checkpoints the keep policy removes (``steps_on_disk`` sorted ascending)."""
    kind, _, arg = (keep or "all").strip().partition(":")
    if kind == "all" and not arg:
        return []
    if kind == "last":
        k = _positive(arg, keep, what="keep policy", accepted=KEEP_HELP)
        return steps_on_disk[:-k] if len(steps_on_disk) > k else []
    raise ConfigError(f"Unknown keep policy {keep!r}; accepted are {KEEP_HELP}.")


def _positive(arg: str, spec: str, *, what: str = "checkpoint schedule", accepted: str = SCHEDULE_HELP) -> int:
    try:
        n = int(arg)
    except ValueError:
        n = 0
    if n < 1:
        raise ConfigError(f"Unknown {what} {spec!r}; accepted are {accepted} with N a positive whole number.")
    return n

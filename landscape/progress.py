"""Progress bars on stderr: :func:`progress_bar` is tqdm (rate and time left) at a width every terminal can show.

A terminal that reports no size (a pseudo-terminal nobody sized, as ``script`` or a test harness opens) gives tqdm a
width and a height of 0, and it then draws nothing at all; such a terminal gets a fixed size instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24
NARROW = 60
"""Below this many columns a bar puts its time left first (``" 30% 00:02 left - epoch 1/3"``), where tqdm's cut keeps it."""


def terminal_columns(stream: Any = None) -> int:
    """The width of the terminal ``stream`` (stderr by default) writes to; 0 when it is not one or reports none."""
    return _terminal_size(stream)[0]


def _terminal_size(stream: Any = None) -> tuple[int, int]:
    """``(columns, lines)`` of the terminal ``stream`` writes to; 0 for what it is not or does not report."""
    stream = sys.stderr if stream is None else stream
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return 0, 0
    return max(0, size.columns), max(0, size.lines)


def progress_bar(iterable: Any = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr, following the terminal's size, or 100 columns and 24 lines for what
    it reports none of (tqdm then draws nothing: no width, or no row for the bar)."""
    from tqdm.auto import tqdm  # a notebook's widget in Jupyter

    kwargs.setdefault("file", sys.stderr)
    columns, lines = _terminal_size(kwargs["file"]) if _is_terminal(kwargs["file"]) else (0, 0)
    if "ncols" not in kwargs:
        if _is_terminal(kwargs["file"]) and (columns <= 0 or lines <= 0):  # a size half set (``stty cols 40``)
            kwargs.update(dynamic_ncols=False, ncols=columns or FALLBACK_COLUMNS, nrows=lines or FALLBACK_ROWS)
        else:
            kwargs.setdefault("dynamic_ncols", True)
    width = kwargs.get("ncols") or columns
    total = kwargs.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
    if 0 < width < NARROW and total and "bar_format" not in kwargs:
        # tqdm cuts its line at the width, and the time left comes last: a narrow terminal showed the name alone
        kwargs["bar_format"] = "{percentage:3.0f}% {remaining} left - {desc}"
    return tqdm(iterable, **kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False

"""Progress bars on stderr: :func:`progress_bar` is tqdm (rate and time left) at a width every terminal can show.

A terminal that reports no size (a pseudo-terminal nobody sized, as ``script`` or a test harness opens) gives tqdm a
width and a height of 0, and it then draws nothing at all; such a terminal gets a fixed size instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any

FALLBACK_COLUMNS, FALLBACK_ROWS = 100, 24


def terminal_columns(stream: Any = None) -> int:
    """The width of the terminal ``stream`` (stderr by default) writes to; 0 when it is not one or reports none."""
    stream = sys.stderr if stream is None else stream
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (AttributeError, OSError, ValueError):
        return 0


def progress_bar(iterable: Any = None, **kwargs: Any):
    """``tqdm(iterable, **kwargs)`` on stderr, following the terminal's size, or 100 x 24 where it reports none
    (tqdm then draws nothing: no width, and no row for the bar)."""
    from tqdm.auto import tqdm  # a notebook's widget in Jupyter

    kwargs.setdefault("file", sys.stderr)
    if "ncols" not in kwargs:
        if _is_terminal(kwargs["file"]) and terminal_columns(kwargs["file"]) <= 0:
            kwargs.update(dynamic_ncols=False, ncols=FALLBACK_COLUMNS, nrows=FALLBACK_ROWS)
        else:
            kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False

"""User-facing errors.

Anything raised as a :class:`LandscapeError` is a problem with the user's input (an unknown name, a missing
file, a corrupt checkpoint, a diverged run). The command line prints its message as one sentence and exits
non-zero without a traceback; library callers can catch it like any exception.
"""


class LandscapeError(Exception):
    """A problem with the input that the user can fix; its message is one complete sentence."""


class DataError(LandscapeError):
    """A dataset is unknown, or its files are missing or malformed."""


class CheckpointError(LandscapeError):
    """A checkpoint or run directory is missing, corrupt, unsafe or does not fit the model."""


class ConfigError(LandscapeError):
    """A configuration value or recipe is unknown or invalid."""


def caller_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller of this function point at the first frame
    outside the landscape package: the user's line that called into it, however deep the call went."""
    import os
    import sys

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level

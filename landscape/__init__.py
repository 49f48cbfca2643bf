"""landscape: train Vision Transformer variants with dense checkpoints and measure their loss landscape.

The public API (``import landscape as ls``; see :mod:`landscape.api`)::

    ls.hessian(model, data, top_k=5, trace=True)    ls.sharpness(model, data, rho=0.05)
    ls.surface(model, data, dims=2)                 ls.load_run("runs/NAME")
    ls.figure("hessian_vs_epoch", runs)             ls.results(ds, ..., label="baseline")

Every name is imported on first use, so ``import landscape`` loads neither torch nor matplotlib.
"""

from landscape.errors import LandscapeError  # noqa: F401
from landscape.version import __version__  # noqa: F401

_API = ("hessian", "sharpness", "surface", "load_run", "results", "figure", "evaluation_data")

__all__ = ["LandscapeError", "__version__", *_API, "figure_names"]


def __getattr__(name: str):
    if name in _API:
        from landscape import api

        return getattr(api, name)
    if name == "figure_names":
        from landscape.figures import FIGURES

        return tuple(FIGURES)
    raise AttributeError(f"module 'landscape' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

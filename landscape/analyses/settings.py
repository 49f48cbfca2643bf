"""What every analysis's settings share, and the one place they are checked.

Each analysis has a settings dataclass derived from :class:`EvaluationSettings` (``HessianSettings``,
``SharpnessSettings``, ``SurfaceSettings``). A settings object is checked when it is made: ``__post_init__`` calls
its :meth:`~EvaluationSettings.validate`, which raises one :class:`~landscape.errors.ConfigError` sentence for a bad
value and fills in the defaults that depend on other fields (a surface's ``dims`` and ``range``). So the command
line, the notebook API, a study and the measure functions all hold settings that were checked once, in one place,
and none of them checks again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from landscape.errors import ConfigError


@dataclass(kw_only=True)
class EvaluationSettings:
    """The fields every analysis's settings share: the fixed evaluation set (``samples`` examples of ``dataset``'s
    ``split``, chosen with ``seed``), the checkpoint ``weights`` (raw or ema) and the ``dtype``; ``batch_size``
    and the names in ``RUNTIME_ONLY`` trade memory for speed only and are left out of :meth:`determining`."""

    samples: int = 512
    split: str = "train"
    dataset: str | None = None
    img_size: int | None = None
    classes: int | None = None
    weights: str = "raw"
    dtype: str = "float32"
    seed: int = 0
    batch_size: int = 256

    RUNTIME_ONLY = ("batch_size",)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> Any:
        """Check every field (one sentence for the first bad one); an analysis's settings extend this with their
        own fields and call :meth:`check_evaluation` for the shared ones. Runs when the settings are made."""
        self.check_evaluation()

    def check_evaluation(self) -> None:
        """One-sentence errors for the shared fields."""
        if self.samples < 1:
            raise ConfigError(f"--samples must be at least 1, not {self.samples}.")
        if self.dtype not in ("float32", "float64"):
            raise ConfigError(f"Unknown dtype {self.dtype!r}; accepted are float32 and float64.")
        if self.weights not in ("raw", "ema"):
            raise ConfigError(f"Unknown weights {self.weights!r}; accepted are raw and ema.")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be a positive integer, not {self.batch_size}.")
        for name, value in (("--img-size", self.img_size), ("--classes", self.classes)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be a positive integer, not {value}.")
        if self.classes is not None and self.dataset not in (None, "synthetic"):
            raise ConfigError(f"--classes sets the classes of synthetic data only; {self.dataset} has its own.")
        if not 0 <= self.seed < 2 ** 32:
            raise ConfigError(f"--seed must be between 0 and 4294967295 (2**32 - 1), not {self.seed}.")

    def normalize_params(self) -> None:
        """``params`` that select every parameter (``""``, ``"*"``, spaces) become ``None``, so that they name, and
        continue, the same results file as no ``--params`` at all."""
        params = getattr(self, "params", None)
        if isinstance(params, str) and params.strip() in ("", "*"):
            self.params = None

    @property
    def torch_dtype(self):
        import torch

        return torch.float64 if self.dtype == "float64" else torch.float32

    def determining(self) -> dict[str, Any]:
        """The settings that determine the numbers (stored in the results and compared on a re-run).

        ``img_size`` and ``classes`` are left out while unset, so files written before they existed still match.
        """
        return {k: v for k, v in asdict(self).items()
                if k not in self.RUNTIME_ONLY and not (k in ("img_size", "classes") and v is None)}

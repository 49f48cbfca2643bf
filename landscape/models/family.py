"""What a model family declares: the one definition of "which variant is this run" is built from these
(:mod:`landscape.models.variants`); each family module (vit, grouped_mlp, shallow_mlp, mlit) declares its ``FAMILY``."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Family:
    """A model family: ``matches(name)`` says whether a registered name belongs to it; ``suffix`` is what its names
    add to the base architecture's name (``_grouped_mlp``); ``knobs`` are the keyword arguments that make one of its
    variants; ``label(kwargs)`` the printed name of a variant."""

    name: str
    matches: Callable[[str], bool]
    label: Callable[[dict[str, Any]], str]
    knobs: tuple[str, ...] = ()
    suffix: str = ""

    def base_name(self, name: str) -> str:
        """The registered name of the base architecture of ``name``."""
        return name[: -len(self.suffix)] if self.suffix and name.endswith(self.suffix) else name

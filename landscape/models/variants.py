"""Which variant a run is: the one definition, read by the study, the summary, figures, report, compare, dynamics
and import.

Each model family declares itself next to its models (``FAMILY`` in :mod:`.vit`, :mod:`.grouped_mlp`,
:mod:`.shallow_mlp`, :mod:`.mlit`): which registered names belong to it, the keyword arguments (*knobs*) that
make one variant of a base architecture differ from another, and the label the figures and the report print.

A run's variant (:func:`describe_variant`, from ``config.yaml``'s ``model.name`` and ``model.kwargs``) is

- ``key``, the identity every seed of the variant shares: the model name, its architecture arguments and its
  knobs (``vit_pico_patch4_32_grouped_mlp(depth=4,embed_dim=32)[group_size=2,init_scale=0.5]``). Two runs
  pool as seeds of one variant exactly when their keys agree, so two GroupedMLP runs that differ only in
  ``init_scale``, or two ViTs of different widths, are two variants;
- ``base``, the architecture the variant is derived from with its architecture arguments: a GroupedMLP or
  ShallowMLP run is compared with the baseline of the same base;
- ``label``, what the figures and the report print (``GroupedMLP g=2``, ``ShallowMLP random``);
- ``name``, the model name with its knobs (``compare``'s *model* column).

An imported run (its ``config.yaml`` has a ``source``) whose recovered shape (width, depth, heads, patch) is not
the shape of the registered name it was built under is named after that shape (``vit(D=64,depth=2,heads=2,
patch=4)``), so an imported 0.1M-parameter model is never shown, nor pooled, as ViT-B/16.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable

from landscape.models.family import Family

# Keyword arguments that do not change the architecture being compared (training-only settings).
TRAINING_ONLY = ("drop_path_rate", "drop_rate", "attn_drop_rate", "proj_drop_rate")
# The shape arguments an imported ViT is named after, with their short names.
SHAPE_ARGS = {"embed_dim": "D", "depth": "depth", "num_heads": "heads", "patch_size": "patch"}


def families() -> dict[str, Family]:
    """The declared families, most specific first (a GroupedMLP name also contains ``vit``)."""
    from landscape.models import grouped_mlp, mlit, shallow_mlp, vit

    return {f.name: f for f in (grouped_mlp.FAMILY, shallow_mlp.FAMILY, mlit.FAMILY, vit.FAMILY)}


# The order in which the summary, figures and report list families.
FAMILY_ORDER = ("baseline", "grouped", "shallow", "mlit", "other")


def family_of(name: str) -> Family | None:
    """The family the registered name ``name`` belongs to, or ``None``."""
    return next((f for f in families().values() if f.matches(name)), None)


def all_knobs() -> tuple[str, ...]:
    return tuple(dict.fromkeys(k for f in families().values() for k in f.knobs))


@dataclasses.dataclass(frozen=True)
class Variant:
    """What variant a run is; see the module docstring."""

    key: str
    name: str
    family: str
    base: str
    label: str
    group_size: int | None = None
    width_ratio: float | None = None
    mlp_init: str | None = None
    init_scale: float | None = None
    imported: bool = False


def _text(values: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in values.items())


def describe_variant(config: dict[str, Any], default_name: str = "model") -> Variant:
    """The :class:`Variant` of a run from its ``config.yaml`` (``model.name``, ``model.kwargs``, ``source``).

    ``default_name`` names the model when the config does not (a run directory's name).
    """
    model = config.get("model") or {}
    name = str(model.get("name") or default_name)
    kwargs = dict(model.get("kwargs") or {})
    family = family_of(name)
    knobs = {k: kwargs[k] for k in (family.knobs if family else all_knobs()) if k in kwargs}
    arch = {k: v for k, v in sorted(kwargs.items()) if k not in knobs and k not in TRAINING_ONLY}
    base_name = family.base_name(name) if family else name
    base = base_name + (f"({_text(arch)})" if arch else "")
    knob_text = f"[{_text(knobs)}]" if knobs else ""
    key = f"{name}({_text(arch)}){knob_text}" if arch else name + knob_text
    imported = bool(config.get("source"))
    short = name + knob_text
    label = family.label(kwargs) if family else key
    own_shape = _own_shape(base_name, kwargs) if imported else None
    if own_shape is not None:
        stem = "deit_distilled" if "distilled" in base_name else "vit"
        short = f"{stem}({own_shape}){family.suffix if family else ''}{knob_text}"
        label = f"{label} {stem}({own_shape})" if family and family.name != "baseline" else f"{stem}({own_shape})"
    group_size = width_ratio = mlp_init = init_scale = None
    if family is not None and family.name == "grouped":
        group_size = int(kwargs.get("group_size", 2))
        init_scale = float(kwargs["init_scale"]) if kwargs.get("init_scale") is not None else None
    elif family is not None and family.name == "shallow":
        width_ratio = float(kwargs.get("width_ratio", 0.5))
        mlp_init = str(kwargs.get("mlp_init", "sliced"))
    elif family is not None and family.name == "baseline":
        group_size = 1
    return Variant(key=key, name=short, family=family.name if family else "other", base=base, label=label,
                   group_size=group_size, width_ratio=width_ratio, mlp_init=mlp_init, init_scale=init_scale,
                   imported=imported)


def _own_shape(base_name: str, kwargs: dict[str, Any]) -> str | None:
    """``"D=64,depth=2,heads=2,patch=4"`` when ``kwargs`` give a shape other than the registered ``base_name``'s
    (or one that cannot be looked up), else ``None``."""
    given = {k: kwargs[k] for k in SHAPE_ARGS if k in kwargs}
    if not given:
        return None
    registered = registered_shape(base_name)
    if registered is not None and all(registered.get(k) == v for k, v in given.items()):
        return None
    shape = {**(registered or {}), **given}
    return ",".join(f"{short}={shape[k]}" for k, short in SHAPE_ARGS.items() if k in shape)


@functools.lru_cache(maxsize=64)
def _registered_shape_cached(name: str) -> tuple[tuple[str, Any], ...] | None:
    from landscape.models.vit import VIT_ARGS

    if name in VIT_ARGS:
        return tuple(sorted(VIT_ARGS[name].items()))
    try:  # a timm name: build it on the meta device (no memory, no weights) and read its shape
        import timm
        import torch

        with torch.device("meta"):
            model = timm.create_model(name)
        patch = model.patch_embed.patch_size
        return tuple(sorted({"embed_dim": int(model.embed_dim), "depth": len(model.blocks),
                             "num_heads": int(model.blocks[0].attn.num_heads),
                             "patch_size": int(patch[0] if isinstance(patch, (tuple, list)) else patch)}.items()))
    except Exception:  # not a ViT, or not registered: its shape is unknown
        return None


def registered_shape(name: str) -> dict[str, Any] | None:
    """Width, depth, heads and patch of the registered ViT ``name`` (``None`` when unknown)."""
    shape = _registered_shape_cached(name)
    return dict(shape) if shape is not None else None


def unique_labels(variants: Iterable[Variant]) -> dict[str, str]:
    """``{variant key: label}``: where two variants would share a label, the base architecture is appended, and
    where that still does not tell them apart, the key is used."""
    variants = {v.key: v for v in variants}
    by_label: dict[str, set[str]] = {}
    for v in variants.values():
        by_label.setdefault(v.label, set()).add(v.key)
    out = {}
    for key, v in variants.items():
        clash = len(by_label[v.label]) > 1
        out[key] = f"{v.label} ({v.base})" if clash and v.family != "other" else v.label
    taken: dict[str, int] = {}
    for label in out.values():
        taken[label] = taken.get(label, 0) + 1
    return {key: (key if taken[label] > 1 else label) for key, label in out.items()}

"""A study: variants x seeds -> train -> analyses -> figures -> report.

A study (:class:`StudySpec`) is a list of :class:`StudyVariant` (a model name and its keyword arguments) trained
with one recipe for each seed into ``OUT/runs/<variant>-s<seed>/``. :func:`run_study` trains every run, measures
the Hessian's top eigenvalue and trace at every checkpoint and the spectral density, sharpness and loss surfaces
at the final one (:class:`AnalysisSettings`), writes the dynamics, then the figures to ``OUT/figures/`` and the
report to ``OUT/report.md``. Every stage skips what is already done, so an interrupted study continues where it
stopped when run again. :func:`demo_study` is the study of ``landscape demo``.

This module only orchestrates and nothing imports it: reading runs back is :mod:`landscape.summary`, what variant a
run is :mod:`landscape.models.variants`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from landscape.errors import ConfigError, LandscapeError
from landscape.runs import Run


# == defining and running a study ================================================================================
@dataclasses.dataclass
class StudyVariant:
    """One model of a study: ``name`` names its run directories (``<name>-s<seed>``)."""

    name: str
    model: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class AnalysisSettings:
    """The analyses a study runs, with settings cheap enough for a CPU demo (raise them for a real study).

    All analyses use the same fixed subset of ``samples`` training examples (seed ``seed``) and the raw weights.

    - Hessian at the checkpoints of ``checkpoints`` (:data:`landscape.runs.CHECKPOINT_SPEC_HELP`) and at those of
      ``at`` (:meth:`hessian_checkpoints`): the ``top_k``
      largest eigenvalues each to a relative accuracy ``tol`` and the trace with ``trace_matvecs`` more products,
      deflated by the eigenvalues' Lanczos basis (``hessian.nc``); at the final checkpoint the spectral density by SLQ with ``density_probes`` x
      ``density_steps`` products (``hessian-density.nc``);
    - sharpness at the final checkpoint, at the radii ``rhos`` (plain, c = 1) and ``adaptive_rhos`` (adaptive,
      c = |w|), with ``sharpness_steps`` ascent steps and ``sharpness_draws`` antithetic pairs for the average;
    - loss surfaces at the final checkpoint along filter-normalised random directions: ``surface_points`` on a
      line and ``surface_points_2d`` squared on a plane, over ``[-surface_range, surface_range]``.

    "At the final one" above means at the checkpoints named by ``at`` (``final``, ``peak`` or both; see
    :meth:`at_checkpoints`).

    Curvature through training, in the same ``hessian.nc`` at the same checkpoints (``landscape analyze hessian``'s
    switches): ``per_block`` (each parameter group's top eigenvalue and trace), ``preconditioned`` (the optimizer's
    sharpness against its stability threshold; needs ``save_preconditioner: true`` in the overrides) and
    ``subspace`` (eigenvectors saved, the gradient's share in their span and their overlap between checkpoints).
    """

    samples: int = 64
    checkpoints: str = "all"
    top_k: int = 1
    tol: float = 1e-2
    trace_matvecs: int = 9
    density_probes: int = 2
    density_steps: int = 20
    rhos: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2)
    adaptive_rhos: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0)
    sharpness_steps: int = 5
    sharpness_draws: int = 4
    surface_points: int = 21
    surface_points_2d: int = 13
    surface_range: float = 1.0
    at: tuple[str, ...] = ("final",)
    seed: int = 0
    device: str | None = None  # None: the GPU when there is one, else the CPU
    per_block: bool = False
    preconditioned: bool = False
    subspace: bool = False

    def hessian_settings(self) -> list[Any]:
        """The :class:`~landscape.analyses.hessian.HessianSettings` of the curvature through training and of the
        density at the final checkpoint."""
        from landscape.analyses.hessian import HessianSettings

        common = dict(samples=self.samples, seed=self.seed)
        curvature = HessianSettings(top_k=self.top_k, tol=self.tol, trace=True, trace_matvecs=self.trace_matvecs,
                                    per_block=self.per_block, preconditioned=self.preconditioned, **common)
        density = HessianSettings(top_k=0, density=True, density_probes=self.density_probes,
                                  density_steps=self.density_steps, density_grid_size=400, density_scale="symlog",
                                  **common)
        return [curvature, density]

    def sharpness_settings(self) -> list[Any]:
        """The :class:`~landscape.analyses.sharpness.SharpnessSettings`, plain and adaptive."""
        from landscape.analyses.sharpness import SharpnessSettings

        plain = SharpnessSettings(rhos=self.rhos, steps=self.sharpness_steps, draws=self.sharpness_draws,
                                  samples=self.samples, seed=self.seed)
        return [plain, dataclasses.replace(plain, rhos=self.adaptive_rhos, adaptive=True)]

    def surface_settings(self) -> list[Any]:
        """The :class:`~landscape.analyses.surface.SurfaceSettings` of the line and the plane."""
        from landscape.analyses.surface import SurfaceSettings

        span = (-self.surface_range, self.surface_range)
        return [SurfaceSettings(directions="random", dims=dims, range=span, points=points, samples=self.samples,
                                seed=self.seed)
                for dims, points in ((1, self.surface_points), (2, self.surface_points_2d))]

    def at_checkpoints(self, run: Run) -> str:
        """The checkpoint spec of the density, sharpness and surfaces: ``at`` holds ``final`` (the last checkpoint)
        and/or ``peak`` (the checkpoint of the epoch at which the raw validation top-1 peaked, from
        ``metrics.csv``)."""
        infos = run.checkpoints()
        if not infos:
            return "last"
        epochs = set()
        if "final" in self.at:
            epochs.add(infos[-1].epoch)
        if "peak" in self.at:
            peak = peak_epoch(run)
            if peak is not None and any(i.epoch == peak for i in infos):
                epochs.add(peak)
        epochs.discard(None)
        if not epochs:
            return "last"
        return "epochs:" + ",".join(str(int(e)) for e in sorted(epochs))

    def hessian_checkpoints(self, run: Run) -> str:
        """The checkpoint spec of the Hessian through training: those of ``checkpoints`` and those of ``at``
        (:meth:`at_checkpoints`) together, so that ``every:5`` with ``at: [peak]`` also measures the peak when its
        epoch is not a multiple of 5. Named by step (a step checkpoint has no epoch); a run without checkpoints
        keeps ``checkpoints``, whose selection then says so."""
        if not run.checkpoints():
            return self.checkpoints
        chosen = {i.step for spec in (self.checkpoints, self.at_checkpoints(run)) for i in run.select_checkpoints(spec)}
        return "steps:" + ",".join(str(s) for s in sorted(chosen))


@dataclasses.dataclass
class StudySpec:
    """Variants x seeds, trained with one recipe plus overrides, analysed with :class:`AnalysisSettings`."""

    variants: list[StudyVariant]
    seeds: list[int]
    data: str = "digits"
    recipe: str | None = "digits"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    analysis: AnalysisSettings = dataclasses.field(default_factory=AnalysisSettings)
    name: str = "study"
    description: str = ""
    stack: bool = False  # train the seeds of each variant together as one batched model (landscape.trainers.stacked)

    def run_names(self) -> list[tuple[StudyVariant, int, str]]:
        return [(v, s, f"{v.name}-s{s}") for v in self.variants for s in self.seeds]


STUDIES_DIR = Path(__file__).parent / "studies"
_STUDY_KEYS = ("name", "description", "data", "recipe", "seeds", "overrides", "variants", "analysis", "templates",
               "train")
_VARIANT_KEYS = ("name", "model", "kwargs")
MAX_SEEDS = 10_000
"""The most seeds a study file may count (a run folder each)."""


def demo_study(data: str = "digits", *, seeds: int = 2, epochs: int | None = None, smoke: bool = False) -> StudySpec:
    """The study of ``landscape demo``: the study file ``landscape/studies/demo-<data>.yaml`` (baseline ViT,
    GroupedMLP (pairs), ShallowMLP (half width, sliced and random init) and an mLiT on ``digits`` (8x8, patch 2) or
    ``fashion-mnist`` (28x28, patch 4, a fixed 12,000-image training subset)) with ``seeds`` seeds and, when given,
    ``epochs`` epochs. ``smoke`` shrinks everything to the least that runs every stage (one epoch unless
    ``epochs``, 128 training images, a few products per analysis): a check that the demo works, not a result."""
    names = sorted(p.stem[len("demo-"):] for p in STUDIES_DIR.glob("demo-*.yaml"))
    if data not in names:
        raise ConfigError(f"The demo runs on {' or '.join(names)}, not {data!r}.")
    if seeds < 1:
        raise ConfigError(f"The demo needs at least one seed, got {seeds}.")
    spec = load_study(STUDIES_DIR / f"demo-{data}.yaml")
    spec.seeds = list(range(seeds))
    if epochs is not None:
        spec.overrides["epochs"] = int(epochs)
    if smoke:
        spec.overrides.update({"epochs": int(epochs or 1), "data.train_size": 128, "data.val_size": 64})
        spec.analysis = dataclasses.replace(
            spec.analysis, samples=16, top_k=1, trace_matvecs=2, density_probes=1, density_steps=4, rhos=(0.05,),
            adaptive_rhos=(0.5,), sharpness_steps=1, sharpness_draws=1, surface_points=5, surface_points_2d=3)
    return spec


# == study files =================================================================================================
MAX_STUDY_BYTES = 1 << 20
"""The largest study file read (a study of every variant and setting is a few kilobytes; 50 MB took minutes)."""


def _names_a_folder(name: str) -> bool:
    """Whether ``name`` can name one folder of the study: not empty, no slash, no leading dot, no surrounding
    spaces, no control character."""
    from landscape.io import has_control_character

    return bool(name) and not any(c in name for c in "/\\") and not name.startswith(".") and name == name.strip() \
        and not has_control_character(name)


def load_study(path: str | os.PathLike) -> StudySpec:
    """Read a study file (YAML): see :func:`study_from_dict` for its keys. Any problem is one sentence."""
    import yaml

    path = Path(path)
    bundled = STUDIES_DIR / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    if not path.exists() and path.parent == Path(".") and bundled.is_file():  # a study shipped with landscape
        path = bundled
    from landscape.io import refuse_special

    refuse_special(path, "a study file", error=ConfigError)  # a FIFO would block, /dev/zero fill the memory
    try:
        if path.is_file() and path.stat().st_size > MAX_STUDY_BYTES:
            raise ConfigError(f"Study file {path} is {path.stat().st_size / 2**20:.0f} MB; a study file is a few "
                              f"kilobytes of YAML (at most {MAX_STUDY_BYTES // 2**20} MB are read).")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = ", ".join(sorted(p.stem for p in STUDIES_DIR.glob("*.yaml")))
        raise ConfigError(f"Study file {path} does not exist (the studies shipped with landscape, named without a "
                          f"folder: {names}).") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder; give the study's YAML file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"Study file {path} cannot be read ({e.__class__.__name__}).") from None
    from landscape.config import DuplicateKey, safe_load_unique

    try:
        raw = safe_load_unique(text)
    except DuplicateKey as e:
        raise ConfigError(f"Study file {path}: {e}; YAML would keep only the last, so give it once.") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"Study file {path} is not valid YAML{at}.") from None
    except (RecursionError, ValueError) as e:  # nested past the parser's depth; a number YAML cannot convert
        raise ConfigError(f"Study file {path} is not valid YAML ({e.__class__.__name__}).") from None
    from landscape.config import YAML_VALUES, expanded_size

    if expanded_size(raw, YAML_VALUES) > YAML_VALUES:
        raise ConfigError(f"Study file {path} expands to more than {YAML_VALUES:,} values (aliases of aliases); "
                          "no study is that large: write it out without them.")
    return study_from_dict(raw, source=str(path))


def study_from_dict(raw: Any, *, source: str = "the study") -> StudySpec:
    """A :class:`StudySpec` from the mapping of a study file.

    Keys: ``name``; ``description``; ``data`` (a dataset name); ``recipe`` (a recipe name or YAML file; left out,
    the dataset's default, as ``landscape train`` takes);
    ``seeds`` (a list of seeds, or a count ``n`` meaning ``0..n-1``); ``overrides`` (config fields of
    ``landscape train --set``, e.g. ``epochs``, ``optim.lr``, ``data.train_size``); ``variants`` (a list of
    ``{name, model, kwargs}``; ``name`` names the run folders ``<name>-s<seed>``); ``analysis`` (fields of
    :class:`AnalysisSettings`); ``templates`` (ignored: a place for YAML anchors that variants reuse with
    ``<<: *anchor``). Unknown keys are refused, so a typo cannot silently fall back to a default.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping with the keys {', '.join(_STUDY_KEYS)}.")
    unknown = sorted(set(raw) - set(_STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{source} has unknown keys {', '.join(map(str, unknown))}; accepted are "
                          f"{', '.join(_STUDY_KEYS)}.")
    for key in ("data", "variants"):
        if key not in raw:
            raise ConfigError(f"{source} needs the key {key!r}.")
    variants = raw["variants"]
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{source}: 'variants' must be a non-empty list of {{name, model, kwargs}}.")
    parsed: list[StudyVariant] = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or "name" not in v or "model" not in v:
            raise ConfigError(f"{source}: variant {i + 1} must be a mapping with 'name' and 'model'.")
        extra = sorted(set(v) - set(_VARIANT_KEYS))
        if extra:
            raise ConfigError(f"{source}: variant {v['name']!r} has unknown keys {', '.join(map(str, extra))}; "
                              f"accepted are {', '.join(_VARIANT_KEYS)}.")
        if isinstance(v["name"], bool) or not isinstance(v["name"], (str, int)):
            raise ConfigError(f"{source}: variant {i + 1}'s name must be text (it names the run folders), not "
                              f"{v['name']!r}.")
        name, kwargs = str(v["name"]), v.get("kwargs") or {}
        if not _names_a_folder(name):
            raise ConfigError(f"{source}: variant name {name!r} cannot name a folder; use letters, digits and -.")
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{source}: the kwargs of variant {name!r} must be a mapping.")
        parsed.append(StudyVariant(name, str(v["model"]), dict(kwargs)))
    names = [v.name for v in parsed]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{source}: variant names must be unique; {', '.join(twice)} appears more than once.")
    seeds = raw.get("seeds", 1)
    if isinstance(seeds, bool) or not (isinstance(seeds, int) or (isinstance(seeds, list) and seeds)):
        raise ConfigError(f"{source}: 'seeds' must be a count or a non-empty list of integers, not {seeds!r}.")
    if isinstance(seeds, int):
        if not 1 <= seeds <= MAX_SEEDS:
            raise ConfigError(f"{source}: 'seeds' must be a count from 1 to {MAX_SEEDS:,}, not {seeds}.")
        seeds = list(range(seeds))
    if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s < 2 ** 63 for s in seeds) or \
            len(set(seeds)) < len(seeds):
        raise ConfigError(f"{source}: 'seeds' must be distinct non-negative integers, not {seeds!r}.")
    study_name = raw.get("name")
    if study_name is not None and (not isinstance(study_name, (str, int)) or not _names_a_folder(str(study_name))):
        raise ConfigError(f"{source}: the study name {study_name!r} cannot name a folder under runs/ (it names the "
                          "default output folder); use letters, digits and -.")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{source}: 'overrides' must be a mapping of config fields to values.")
    _refuse_study_owned_overrides(overrides, source)
    recipe = raw.get("recipe")
    if recipe is not None and (not isinstance(recipe, str) or not recipe.strip()):
        from landscape.trainers.recipes import recipe_names

        raise ConfigError(f"{source}: 'recipe' must name a recipe ({', '.join(recipe_names())}) or a YAML file, "
                          f"not {recipe!r}; leave it out for the dataset's default.")
    return StudySpec(variants=parsed, seeds=list(seeds), data=str(raw["data"]), recipe=recipe,
                     overrides=dict(overrides), analysis=_analysis_settings(raw.get("analysis") or {}, source),
                     name=str(raw.get("name") or Path(source).stem), description=str(raw.get("description") or ""),
                     stack=_train_settings(raw.get("train") or {}, source))


def _train_settings(raw: Any, source: str) -> bool:
    """The study file's ``train`` mapping: ``stack`` (true: each variant's seeds trained as one batched model)."""
    if not isinstance(raw, dict) or set(raw) - {"stack"} or not isinstance(raw.get("stack", False), bool):
        raise ConfigError(f"{source}: 'train' must be a mapping with the one key stack (true or false), not {raw!r}.")
    return raw.get("stack", False)


def _analysis_settings(raw: Any, source: str) -> AnalysisSettings:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: 'analysis' must be a mapping of analysis settings.")
    fields = {f.name: f for f in dataclasses.fields(AnalysisSettings)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{source}: unknown analysis settings {', '.join(map(str, unknown))}; accepted are "
                          f"{', '.join(fields)}.")
    values = {}
    for key, value in raw.items():
        default = getattr(AnalysisSettings, key, None) if key != "at" else ("final",)
        if isinstance(default, tuple) or key == "at":
            value = [value] if isinstance(value, (str, int, float)) else value
            if not isinstance(value, list):
                raise ConfigError(f"{source}: analysis setting {key!r} must be a list, not {value!r}.")
            value = tuple(value)
        values[key] = value
    settings = AnalysisSettings(**values)
    bad = sorted(set(settings.at) - {"final", "peak"})
    if bad or not settings.at:
        raise ConfigError(f"{source}: analysis 'at' accepts final and peak, not {', '.join(map(str, bad)) or '[]'}.")
    for key in ("samples", "top_k", "trace_matvecs", "density_probes", "density_steps", "sharpness_steps",
                "sharpness_draws", "surface_points", "surface_points_2d"):
        value = getattr(settings, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "top_k" else 1):
            raise ConfigError(f"{source}: analysis setting {key!r} must be a positive integer, not {value!r}.")
    for key in ("per_block", "preconditioned", "subspace"):
        if not isinstance(getattr(settings, key), bool):
            raise ConfigError(f"{source}: analysis setting {key!r} must be true or false, not {getattr(settings, key)!r}.")
    for key in ("rhos", "adaptive_rhos"):
        values_ = getattr(settings, key)
        if not values_ or not all(isinstance(r, (int, float)) and not isinstance(r, bool) and r > 0 for r in values_):
            raise ConfigError(f"{source}: analysis setting {key!r} must be a list of positive radii.")
        if len(set(values_)) != len(values_):
            raise ConfigError(f"{source}: analysis setting {key!r} must hold distinct radii, not {list(values_)}.")
    for key in ("surface_points", "surface_points_2d"):
        if getattr(settings, key) < 2:
            raise ConfigError(f"{source}: analysis setting {key!r} must be at least 2 points, not "
                              f"{getattr(settings, key)}.")
    if not (isinstance(settings.tol, (int, float)) and 0 < settings.tol <= 1):
        raise ConfigError(f"{source}: analysis setting 'tol' must be a relative accuracy in (0, 1], not "
                          f"{settings.tol!r}.")
    from landscape.runs import parse_checkpoint_spec

    try:  # the selection's form (which checkpoints exist is known once the runs are trained)
        parse_checkpoint_spec(str(settings.checkpoints))
    except LandscapeError as e:
        raise ConfigError(f"{source}: analysis setting 'checkpoints': {e}") from None
    if isinstance(settings.seed, bool) or not isinstance(settings.seed, int):
        raise ConfigError(f"{source}: analysis setting 'seed' must be an integer, not {settings.seed!r}.")
    if isinstance(settings.surface_range, bool) or not isinstance(settings.surface_range, (int, float)) or \
            not 0 < settings.surface_range < math.inf:
        raise ConfigError(f"{source}: analysis setting 'surface_range' must be a positive number (the surfaces span "
                          f"-range to range), not {settings.surface_range!r}.")
    try:  # what each analysis checks itself (radii, seeds, ...), now rather than after every run has trained
        settings.hessian_settings(), settings.sharpness_settings(), settings.surface_settings()
        if settings.device is not None:
            from landscape.trainers.distributed import check_device

            check_device(settings.device, here=False)  # a study for a GPU machine is checked on a laptop too
    except LandscapeError as e:
        raise ConfigError(f"{source}: analysis settings: {e}") from None
    return settings


# Config fields a study sets with keys of its own: an override of one would train every run with it, while the
# study's runs, names and check say otherwise (two "seeds" trained with one seed, the variants' models replaced).
_STUDY_OWNED = {"seed": "seeds", "data.name": "data", "model.name": "variants (model)"}


def _refuse_study_owned_overrides(overrides: dict[str, Any], source: str) -> None:
    from landscape.trainers.recipes import resolve_key

    for key, value in overrides.items():
        try:
            full = resolve_key(str(key))
        except ConfigError:
            continue  # an unknown field: the config check names it
        nested = {f"{full}.{k}" for k in value} if isinstance(value, dict) else set()
        for owned in sorted({full} | nested):
            if owned in _STUDY_OWNED:
                raise ConfigError(f"{source}: the overrides set {owned}, which the study sets with its own "
                                  f"'{_STUDY_OWNED[owned]}' key; give it there.")


def check_study(spec: StudySpec, *, here: bool = True) -> None:
    """Refuse a study that would fail or mean nothing, before anything trains: every run's config must resolve
    (recipe, dataset, overrides), every variant's model must build with its kwargs on the dataset's image shape
    (an unknown model, a group size that does not divide the depth), the optimizer and schedule must be timm's,
    every GroupedMLP or ShallowMLP variant needs the baseline it is compared with (same base architecture) in the
    study, and (``here``) the analyses' device must be on this machine."""
    if here and spec.analysis.device is not None:
        from landscape.trainers.distributed import check_device, device_missing

        missing = device_missing(check_device(spec.analysis.device, here=False))
        if missing:
            raise ConfigError(f"The study's analyses run on device {spec.analysis.device!r} (its analysis setting "
                              f"device), and this machine cannot: {missing}; set device: cpu, or run the study where "
                              "there is one.")
    from landscape.data import get_dataset_info
    from landscape.models import create_model
    from landscape.models.variants import describe_variant
    from landscape.trainers.loop import check_model_fits_data, check_optimization, resolve_model_kwargs

    configs = [train_config(spec, v, spec.seeds[0]) for v in spec.variants]
    check_optimization(configs[0])  # the overrides' optimizer and schedule, the same for every variant
    if any(c.task == "mae" for c in configs):  # every analysis of the study would refuse the runs after training
        raise ConfigError("The study pre-trains masked autoencoders (task: mae), whose runs no analysis measures (they "
                          "have no class logits); study the classifiers fine-tuned from such runs (landscape train "
                          "--init RUN).")
    if spec.analysis.preconditioned and not configs[0].save_preconditioner:
        raise ConfigError("The analysis setting preconditioned needs the optimizer state at every checkpoint: add "
                          "save_preconditioner: true to the study's overrides.")
    info = get_dataset_info(configs[0].data.name)
    trained = min(n for n in (info.train_size, *(c.data.train_size for c in configs)) if n is not None) \
        if info.train_size is not None else None  # the analyses take their examples among those trained on
    if info.name != "synthetic" and trained is not None and spec.analysis.samples > trained:
        raise ConfigError(f"The analysis setting samples ({spec.analysis.samples}) is more than the {trained} "
                          f"training images of {info.name} the runs train on, among which every analysis takes its "
                          f"examples; give samples: {trained} or fewer.")
    described = {}
    for variant, config in zip(spec.variants, configs):
        kwargs = resolve_model_kwargs(config, info)
        try:
            create_model(variant.model, **kwargs)
        except LandscapeError as e:
            raise ConfigError(f"Variant {variant.name!r}: {e}") from None
        except Exception as e:  # timm's own refusals of a kwarg
            reason = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            raise ConfigError(f"Variant {variant.name!r}: model {variant.model} cannot be built with "
                              f"{variant.kwargs} ({reason}).") from None
        try:  # what `train` checks before it makes the run: patch and image sizes, the data subset's size
            check_model_fits_data(config, kwargs)
        except LandscapeError as e:
            raise ConfigError(f"Variant {variant.name!r}: {_study_words(str(e))}") from None
        described[variant.name] = describe_variant({"model": {"name": variant.model, "kwargs": variant.kwargs}})
    baselines = {d.base for d in described.values() if d.family == "baseline"}
    for name, d in described.items():
        if d.family in ("grouped", "shallow") and d.base not in baselines:
            raise ConfigError(f"Variant {name!r} ({d.label}) has no baseline in the study: add a variant with model "
                              f"{d.base.split('(')[0]} and the same architecture arguments.")


def _study_words(sentence: str) -> str:
    """A sentence of `train`'s checks in a study file's terms: its options are the variants' kwargs and overrides."""
    return (sentence.replace("--model-arg ", "the variant's kwargs ").replace("a larger --img-size", "a larger "
            "data.img_size in the overrides").replace("--set data.", "overrides data."))


def resolved_study(spec: StudySpec) -> dict[str, Any]:
    """The study with every default filled in, as written to ``OUT/study.yaml``."""
    analysis = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(spec.analysis).items()}
    return {
        "name": spec.name, "description": spec.description, "data": spec.data, "recipe": spec.recipe,
        "seeds": list(spec.seeds), "overrides": dict(spec.overrides),
        "variants": [{"name": v.name, "model": v.model, "kwargs": dict(v.kwargs)} for v in spec.variants],
        "analysis": analysis, "train": {"stack": spec.stack},
    }


def peak_epoch(run: Run) -> int | None:
    """The epoch at which the run's raw validation top-1 peaked (the first one reaching it), from ``metrics.csv``."""
    from landscape.analyses.dynamics import WEIGHTS, epoch_table, peak_to_final

    try:
        table = epoch_table(run.read_metrics())
    except Exception:  # a damaged metrics.csv: no peak to analyse
        return None
    if table.empty or WEIGHTS["raw"] not in table:
        return None
    found = peak_to_final(table[WEIGHTS["raw"]].to_numpy(dtype=float), table.index.to_numpy())
    return None if math.isnan(found["peak_epoch"]) else int(found["peak_epoch"])


@dataclasses.dataclass(frozen=True)
class StudyEvent:
    """A progress report: ``stage`` (train, hessian, sharpness, surface, dynamics, figures, report, done) of the run
    ``run`` (empty for the whole study), a one-line ``message`` and the seconds the stage took."""

    stage: str
    run: str
    message: str
    seconds: float = 0.0


@dataclasses.dataclass
class StudyOutcome:
    """Where a finished study put things, and the wall time of each stage summed over runs (seconds)."""

    out: Path
    runs: list[Path]
    figures: dict[str, list[Path]]
    report: Path | None
    timings: dict[str, float]
    wall_time: float


Emit = Callable[[StudyEvent], None]


def train_config(spec: StudySpec, variant: StudyVariant, seed: int):
    """The resolved :class:`~landscape.config.TrainConfig` of one run of the study."""
    from landscape.trainers import build_config
    from landscape.trainers.recipes import default_recipe

    return build_config(spec.recipe or default_recipe(spec.data), model=variant.model, model_kwargs=variant.kwargs,
                        data=spec.data, options={"seed": seed}, overrides=spec.overrides)


def _refuse_other_run(run_dir: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    from landscape.config import config_differences

    differences = config_differences(saved, wanted)
    if differences:
        shown = "; ".join(differences[:4]) + (f"; and {len(differences) - 4} more" if len(differences) > 4 else "")
        raise LandscapeError(f"{run_dir} holds a run trained with other settings than the study asks for ({shown}); "
                             "delete it or give another --out.")


def _check_existing_runs(configs: Sequence[tuple[Any, Path]]) -> None:
    """Refuse at once a study whose folder holds a run trained with other settings (each run would be refused
    only when its turn came, after the study's record and the runs before it)."""
    from landscape.config import to_dict

    for config, run_dir in configs:
        run = Run(run_dir)
        if run.config_path.is_file():
            _refuse_other_run(run_dir, run.load_config(), to_dict(config))


_ANALYSIS_SELECTIONS = ("checkpoints", "at", "device")
"""Analysis settings that choose where or on what to measure, not what a result means: a study may change them
over results already measured."""


def _check_existing_analysis(out: Path, spec: StudySpec, *, run_dirs: Sequence[Path]) -> None:
    """Refuse at once a study whose folder holds results measured with other analysis settings than ``spec``'s
    (each analysis would refuse only after the runs before it, and after the folder's record was rewritten)."""
    import yaml

    try:
        saved = yaml.safe_load((out / "study.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return
    before = saved.get("analysis") if isinstance(saved, dict) else None
    if not isinstance(before, dict) or not any(any(Path(d, "analysis").glob("*.nc")) for d in run_dirs):
        return
    now = resolved_study(spec)["analysis"]
    changed = [f"{key} {before[key]!r} there vs {now[key]!r} now" for key in now
               if key not in _ANALYSIS_SELECTIONS and key in before and before[key] != now[key]]
    if changed:
        shown = "; ".join(changed[:3]) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise ConfigError(f"{out} holds results measured with other analysis settings ({shown}); run the study with "
                          "the settings it was measured with, or add --force to measure every run again with these.")


def ensure_trained(config, run_dir: Path, *, data_dir=None, emit: Emit | None = None) -> str:
    """Train ``config`` into ``run_dir`` unless it is already there: ``"skipped"`` when the run finished,
    ``"resumed"`` when it continued from ``state/last.pt``, ``"trained"`` otherwise.

    A directory holding a different run (another model, seed, epochs or optimiser) is refused rather than mixed.
    """
    from landscape.config import to_dict
    from landscape.trainers import train

    emit = emit or (lambda e: None)
    run = Run(run_dir)
    wanted = to_dict(config)
    if run.config_path.exists():
        saved = run.load_config()
        _refuse_other_run(run_dir, saved, wanted)
        if _finished(run, int(saved.get("epochs", config.epochs))):
            return "skipped"
        if run.state_path.exists():
            t0 = time.perf_counter()
            result = train(None, run_dir, resume=True, data_dir=data_dir, progress=False)
            emit(StudyEvent("train", run.root.name, _train_message(result.rows, "resumed"), time.perf_counter() - t0))
            return "resumed"
    t0 = time.perf_counter()
    result = train(config, run_dir, overwrite=True, data_dir=data_dir, progress=False)
    emit(StudyEvent("train", run.root.name, _train_message(result.rows, "trained"), time.perf_counter() - t0))
    return "trained"


def _finished(run: Run, epochs: int) -> bool:
    """Whether the run was trained to ``epochs``: its last checkpoint is there, or its metrics reach that epoch
    and its checkpoints were not kept (a folder of results: never trained again over its analyses)."""
    metrics = run.read_metrics()
    if metrics.empty or "epoch" not in metrics or not (metrics["epoch"] == epochs).any():
        return False
    if run.checkpoint_path(epoch=epochs).exists():
        return True
    return not run.checkpoints() and not run.state_path.exists()


def _train_message(rows: list[dict[str, Any]], verb: str) -> str:
    if not rows:
        return verb
    last = rows[-1]
    top1 = last.get("val_top1")
    ema = last.get("ema_val_top1")
    text = f"{verb}: {last.get('epoch')} epochs, final top-1 {top1:.1f}%" if top1 is not None else verb
    return text + (f" (EMA {ema:.1f}%)" if ema is not None else "")


def default_jobs() -> int:
    """Runs at once: one per CPU core (at most 4), since each run uses one thread."""
    return max(1, min(4, os.cpu_count() or 1))


def run_study(spec: StudySpec, out: str | os.PathLike, *, jobs: int = 1, threads: int = 1, data_dir=None,
              on_event: Emit | None = None, figures_out: str | os.PathLike | None = None, force: bool = False,
              formats: Sequence[str] = ("png", "pdf"), command: str | None = None,
              progress: bool = False) -> StudyOutcome:
    """Train and analyse every run of ``spec`` into ``OUT/runs/``, then write ``OUT/figures/`` and ``OUT/report.md``.

    ``jobs`` runs go at once, each in its own process with ``threads`` CPU threads (tiny models gain nothing from
    more threads, and several processes keep every core busy), and the same processes then read the results and
    draw the figures, several at once; ``jobs=1`` works in this process. The processes end with this one, however
    it ends. Finished
    training and finished analyses are skipped, so an interrupted study continues when run again; ``force``
    recomputes every analysis (training is never repeated). ``on_event`` receives a :class:`StudyEvent` after
    every stage. Figures are written in ``formats``; the PNGs are also copied to ``figures_out`` when given.
    ``progress`` draws a bar on stderr over every stage of every run (training, each analysis, dynamics) and the
    figures and the report, with the time left at the average pace so far; ``on_event`` output goes above it.

    The study is checked before anything trains (:func:`check_study`). Beside the runs go ``OUT/study.yaml`` (the
    resolved study, every default filled in), ``OUT/timings.csv`` (each stage's seconds: summed over the runs for
    training and the analyses, wall time for the whole) and ``OUT/environment.yaml`` (the machine, the library
    versions, ``jobs`` and ``threads``, and ``command`` when given). A second study in ``OUT`` at the same time is
    refused in one sentence before it writes anything (it rewrote ``study.yaml`` under the first one's results).
    """
    from landscape.io import check_run_name, folder_lock

    check_run_name(out)  # each run's folder would be refused, but only after the study's record is written
    from landscape.io import is_run_root

    for folder in (Path(out), *Path(out).resolve().parents[:2]):  # a run, or its checkpoints/ or analysis/
        if is_run_root(folder):
            where = "a training run" if folder == Path(out) else f"inside the training run {folder}"
            raise ConfigError(f"{out} is {where}; give the study its own folder (--out), beside the runs rather "
                              "than in one.")
    with folder_lock(out, "running a study in"):
        return _run_study(spec, Path(out), jobs=jobs, threads=threads, data_dir=data_dir, on_event=on_event,
                          figures_out=figures_out, force=force, formats=formats, command=command, progress=progress)


def _run_study(spec: StudySpec, out: Path, *, jobs: int, threads: int, data_dir, on_event: Emit | None,
               figures_out: str | os.PathLike | None, force: bool, formats: Sequence[str], command: str | None,
               progress: bool) -> StudyOutcome:
    """:func:`run_study` in ``out``, whose lock the caller holds."""
    emit = on_event or (lambda e: None)
    start = time.perf_counter()
    context = _process_context() if jobs > 1 else None  # the workers' imports start now, beside this process's
    from landscape.figures import write_figures
    from landscape.io import figures_folder, make_dirs
    from landscape.report import write_report
    from landscape.summary import load_results

    runs_dir = out / "runs"
    configs = [(train_config(spec, v, s), runs_dir / name) for v, s, name in spec.run_names()]  # fail early
    check_study(spec)
    _check_existing_runs(configs)  # before the folder's record is rewritten: a refused study leaves it as it was
    if not force:
        _check_existing_analysis(out, spec, run_dirs=[d for _, d in configs])
    _write_yaml(out / "study.yaml", resolved_study(spec))
    _write_yaml(out / "environment.yaml", _environment(jobs, threads, command))
    tasks = [(config, run_dir, spec.analysis, data_dir, threads, force) for config, run_dir in configs]
    if spec.stack:  # one task per variant: its seeds train together, then each run is analysed
        per_variant = len(spec.seeds)
        tasks = [([c for c, _ in configs[i:i + per_variant]], [d for _, d in configs[i:i + per_variant]],
                  spec.analysis, data_dir, threads, force) for i in range(0, len(configs), per_variant)]
    timings: dict[str, float] = {}

    bar = _stage_bar(len(configs) * (len(_ANALYSES) + 2) + 2) if progress else None

    def record(event: StudyEvent) -> None:
        timings[event.stage] = timings.get(event.stage, 0.0) + event.seconds
        if bar is None:
            emit(event)
            return
        with bar.external_write_mode(file=bar.fp):
            emit(event)
        if event.stage != "done":
            bar.update(1)

    run_dirs = [run_dir for _, run_dir in configs]
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            for task in tasks:
                _study_task(task, record)
        else:
            pool, events = stack.enter_context(_worker_pool(context, min(jobs, len(tasks))))
            _run_parallel(pool, events, tasks, record)
        runs_wall = time.perf_counter() - start
        t0 = time.perf_counter()
        inputs = _figure_inputs(run_dirs, formats)
        figures = _drawn_from(out / "figures", inputs)
        drawn = "already drawn from these results" if figures is not None else ""
        if jobs <= 1:
            results = load_results(run_dirs)
            if figures is None:
                figures = write_figures(results, out / "figures", formats=formats)
        else:  # the runs' results read and the figures drawn by the workers, several at once
            results = load_results(run_dirs, loader=pool.map)
            if figures is None:
                figures = _parallel_figures(pool, results, out / "figures", formats)
        if not drawn:
            _record_drawn(out / "figures", inputs, figures)
    record(StudyEvent("figures", "", f"{len(figures)} figures in {out / 'figures'}{f' ({drawn})' if drawn else ''}",
                      time.perf_counter() - t0))
    if figures_out is not None:  # the gallery a repository shows: the PNGs
        import shutil

        gallery = make_dirs(figures_folder(figures_out))
        for paths in figures.values():
            for p in paths:
                if p.suffix == ".png":
                    shutil.copyfile(p, gallery / p.name)
    t0 = time.perf_counter()
    (report_path, *_), hypotheses = write_report(results, out / "report.md", figures=figures, html=True)
    verdicts = ", ".join(f"{h.key} {h.verdict}" for h in hypotheses)
    record(StudyEvent("report", "", f"{report_path} ({verdicts})", time.perf_counter() - t0))
    if bar is not None:
        bar.close()
    wall = time.perf_counter() - start
    _write_timings(out / "timings.csv", timings, runs_wall, wall, len(run_dirs), jobs)
    return StudyOutcome(out=out, runs=run_dirs, figures=figures, report=report_path, timings=timings,
                        wall_time=wall)


_DRAWN = ".drawn-from.json"
"""The record, in a study's figures folder, of what its figures were drawn from."""


def _figure_inputs(run_dirs: Sequence[Path], formats: Sequence[str]) -> dict[str, Any]:
    """What a study's figures are drawn from: each run's config, metrics and results files (size and time of the
    last change), the formats, and the figure code itself."""
    import landscape.figures

    files = []
    for run_dir in run_dirs:
        for path in sorted([run_dir / "config.yaml", run_dir / "metrics.csv", *(run_dir / "analysis").glob("*.nc")]):
            try:
                st = path.stat()
            except OSError:
                continue
            files.append([str(path), st.st_size, st.st_mtime_ns])
    code = Path(landscape.figures.__file__).stat()
    return {"files": files, "formats": sorted(formats), "code": [code.st_size, code.st_mtime_ns]}


def _drawn_from(folder: Path, inputs: dict[str, Any]) -> dict[str, list[Path]] | None:
    """The figures of ``folder`` when they were drawn from exactly ``inputs`` and are all still there (a re-run
    of a finished study need not draw them again); ``None`` otherwise."""
    import json

    try:
        record = json.loads((folder / _DRAWN).read_text())
        if record["inputs"] != json.loads(json.dumps(inputs)):
            return None
        figures = {name: [folder / p for p in paths] for name, paths in record["figures"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not all(p.is_file() for paths in figures.values() for p in paths):
        return None
    return figures


def _record_drawn(folder: Path, inputs: dict[str, Any], figures: dict[str, list[Path]]) -> None:
    import json

    from landscape.io import atomic_write_text

    record = {"inputs": inputs, "figures": {name: [Path(p).name for p in paths] for name, paths in figures.items()}}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / _DRAWN, json.dumps(record))


def _write_yaml(path: Path, data: dict[str, Any]) -> None:
    import yaml

    from landscape.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def _environment(jobs: int, threads: int, command: str | None) -> dict[str, Any]:
    import platform

    from landscape.analyses.results import library_versions

    return {
        "command": command, "jobs": jobs, "threads_per_job": threads, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "processor": platform.processor() or platform.machine(),
        "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
        "libraries": {k: str(v) for k, v in library_versions().items()},
    }


def _write_timings(path: Path, timings: dict[str, float], runs_wall: float, wall: float, runs: int, jobs: int) -> None:
    """``timings.csv``: one row per stage (``seconds``: summed over the runs for the per-run stages, which overlap
    when ``jobs > 1``; wall time for the others)."""
    from landscape.io import atomic_write_text

    per_run = [stage for stage in ("train", "hessian", "sharpness", "surface", "dynamics") if stage in timings]
    lines = ["stage,seconds,kind"]
    lines += [f"{stage},{timings[stage]:.1f},summed over {runs} runs" for stage in per_run]
    lines.append(f"runs (train and analyses),{runs_wall:.1f},wall with {jobs} jobs")
    lines += [f"{stage},{timings[stage]:.1f},wall" for stage in ("figures", "report") if stage in timings]
    lines.append(f"total,{wall:.1f},wall")
    atomic_write_text(path, "\n".join(lines) + "\n")


def _stage_bar(total: int):
    """A tqdm bar over a study's stages (train, each analysis and dynamics per run; figures; report)."""
    from landscape.progress import progress_bar

    return progress_bar(total=total, desc="study", unit=" stage", smoothing=0, leave=False)


def _study_task(task, emit: Emit) -> None:
    """Train one run (unless done), then analyse its checkpoints (each analysis skips what it has done)."""
    config, run_dir, settings, data_dir, threads, force = task
    if isinstance(config, list):
        return _stacked_task(task, emit)
    run_dir = Path(run_dir)
    with _worker_threads(threads):
        t0 = time.perf_counter()
        if ensure_trained(config, run_dir, data_dir=data_dir, emit=emit) == "skipped":
            emit(StudyEvent("train", run_dir.name, "already trained", 0.0))
        analyze_run(Run(run_dir), settings, data_dir=data_dir, emit=emit, force=force)
        emit(StudyEvent("done", run_dir.name, f"run finished in {time.perf_counter() - t0:.0f} s", 0.0))


@contextlib.contextmanager
def _worker_threads(threads: int):
    """A study task's torch threads, restored after it, and the warnings a user of the study cannot act on off:
    torch registers its forward-mode (jvp) decompositions through torch.jit.script on first use and warns that
    jit.script is deprecated."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
            yield
    finally:
        torch.set_num_threads(previous)


def _stacked_task(task, emit: Emit) -> None:
    """Train one variant's runs together (those not done yet), then analyse each run."""
    configs, run_dirs, settings, data_dir, threads, force = task
    with _worker_threads(threads):
        t0 = time.perf_counter()
        ensure_trained_stacked(configs, [Path(d) for d in run_dirs], data_dir=data_dir, emit=emit)
        for run_dir in run_dirs:
            t1 = time.perf_counter()
            analyze_run(Run(run_dir), settings, data_dir=data_dir, emit=emit, force=force)
            emit(StudyEvent("done", Path(run_dir).name, f"run analysed in {time.perf_counter() - t1:.0f} s", 0.0))
        emit(StudyEvent("done", "", f"{len(run_dirs)} stacked runs finished in {time.perf_counter() - t0:.0f} s", 0.0))


def ensure_trained_stacked(configs, run_dirs: list[Path], *, data_dir=None, emit: Emit | None = None) -> None:
    """Train the runs not yet finished together (:func:`landscape.trainers.stacked.train_stacked`): fresh runs as
    one stack, runs with a saved state in one stack per step they stopped at. Finished runs are skipped; a
    directory holding a different run is refused. One ``train`` event per run, each charged its share of the
    stack's wall time."""
    from landscape.config import to_dict
    from landscape.trainers.stacked import train_stacked

    emit = emit or (lambda e: None)
    fresh, stopped = [], {}
    for config, run_dir in zip(configs, run_dirs):
        run = Run(run_dir)
        if run.config_path.exists():
            saved = run.load_config()
            _refuse_other_run(run_dir, saved, to_dict(config))
            if _finished(run, int(saved.get("epochs", config.epochs))):
                emit(StudyEvent("train", run.root.name, "already trained", 0.0))
                continue
            if run.state_path.exists():
                from landscape.trainers.state import load_state

                stopped.setdefault(load_state(run.state_path)["step"], []).append(run_dir)
                continue
        fresh.append((config, run_dir))
    stacks = [(None, dirs, True) for dirs in stopped.values()]
    if fresh:
        stacks.append(([c for c, _ in fresh], [d for _, d in fresh], False))
    for stack_configs, dirs, resume in stacks:
        t0 = time.perf_counter()
        results = train_stacked(stack_configs, dirs, resume=resume, overwrite=not resume, data_dir=data_dir,
                                progress=False)
        share = (time.perf_counter() - t0) / len(results)
        verb = f"{'resumed' if resume else 'trained'} stacked with {len(results)} seeds"
        for result in results:
            emit(StudyEvent("train", result.run.root.name, _train_message(result.rows, verb), share))


_worker_queue = None

_WORKER_MODULES = ("landscape.study", "landscape.trainers.loop", "landscape.trainers.stacked",
                   "landscape.analyses.driver", "landscape.analyses.hessian", "landscape.analyses.sharpness",
                   "landscape.analyses.surface", "landscape.analyses.dynamics", "landscape.summary",
                   "landscape.figures")
"""What a study's workers import: torch, timm, xarray and matplotlib underneath."""


def _process_context():
    """Where a study's worker processes come from. On Linux a fork server that imports :data:`_WORKER_MODULES`
    once (its start is not waited for here), so that each worker starts in milliseconds instead of re-importing
    them for seconds; elsewhere fresh interpreters (spawn). A worker is never forked from this process, which may
    hold threads or a GPU context."""
    import multiprocessing
    import sys

    if not sys.platform.startswith("linux"):
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver

    import signal

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(_WORKER_MODULES))
    try:  # the server ignores Ctrl-C (its imports would print a traceback); this process stops the workers itself
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: signals cannot be set here
        previous = None
    # Workers stopped on Ctrl-C or a failed run are killed (:func:`_worker_pool`), and the resource tracker, which
    # frees what they held, would warn about it as it ends, below the one sentence the user gets.
    quiet = "ignore::UserWarning:multiprocessing.resource_tracker"
    sys.warnoptions.append(quiet)
    try:
        forkserver.ensure_running()  # starts the resource tracker first, with these warning options
    finally:
        sys.warnoptions.remove(quiet)
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return context


def _init_worker(queue, environ: dict[str, str], study_pid: int) -> None:
    """A worker's start: the event queue, and the environment of the process that runs the study (a fork server's
    child would otherwise have that of the moment the server started; multiprocessing passes on the working
    directory and the import path itself). The worker ends with that process (:func:`_end_with`)."""
    global _worker_queue
    _worker_queue = queue
    os.environ.clear()
    os.environ.update(environ)
    _end_with(study_pid)


def _end_with(pid: int) -> None:
    """Kill this process as soon as process ``pid`` (the one running the study) has ended, however it ended.

    Without this a killed study leaves its workers running their task and then waiting forever, holding the run's
    lock, so that running the study again is refused. Every write is atomic, so the kill loses nothing saved."""
    import signal
    import threading

    def watch() -> None:
        try:
            handle = os.pidfd_open(pid)  # Linux: readable once the process has ended
        except (AttributeError, OSError):
            handle = None
        if handle is not None:
            import select

            select.select([handle], [], [])
        else:
            from landscape.io import pid_alive

            while pid_alive(pid):
                time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="landscape-study-watch", daemon=True).start()


def _worker(task) -> None:
    _study_task(task, _worker_queue.put)


@contextlib.contextmanager
def _quiet_broken_pool():
    """Leave out the traceback that the pool's management thread prints when it finds its workers killed: before
    Python 3.12 it sets a "broken pool" error on futures that are already cancelled and dies of InvalidStateError
    (harmless: the study has already failed with its own sentence)."""
    import threading
    from concurrent.futures import InvalidStateError

    previous = threading.excepthook

    def hook(args) -> None:
        if not issubclass(args.exc_type, InvalidStateError):
            previous(args)

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous


@contextlib.contextmanager
def _worker_pool(context, jobs: int):
    """``jobs`` worker processes and the queue on which their :class:`StudyEvent` come back."""
    from concurrent.futures import ProcessPoolExecutor

    events = context.SimpleQueue()  # a put is written before the task returns; small messages arrive whole
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                               initargs=(events, dict(os.environ), os.getpid()))
    try:
        yield pool, events
    except BaseException:  # Ctrl-C or a failed run: stop now, not after the tasks already handed out
        workers = list((getattr(pool, "_processes", None) or {}).values())
        manager = getattr(pool, "_executor_manager_thread", None)  # shutdown(wait=False) forgets it
        with _quiet_broken_pool():
            pool.shutdown(wait=False, cancel_futures=True)
            for worker in workers:  # every write is atomic: a killed worker loses nothing saved
                worker.kill()
            _kill_unlisted_workers(context)
            pool.shutdown(wait=True)
            if manager is not None:
                manager.join(timeout=30)
        raise
    else:
        pool.shutdown(wait=True)
    finally:
        events.close()


def _kill_unlisted_workers(context) -> None:
    """Kill every process the fork server started for this study that the pool does not list: one whose start a
    Ctrl-C interrupted (forked, but its pid never handed back) would otherwise outlive the study, fail to open the
    event queue this process has removed, and print a traceback below the study's last sentence."""
    import signal

    from multiprocessing import forkserver

    server = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if context.get_start_method() != "forkserver" or not server:
        return
    for attempt in range(2):  # a start still under way forks its process a moment later
        for pid in _children(server):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if attempt == 0:
            time.sleep(0.2)


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (Linux: from ``/proc``; none where it cannot be read)."""
    found = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()  # the name, in parentheses, may hold spaces
                if int(fields[1]) == pid:
                    found.append(int(entry.name))
    return found


def _run_parallel(pool, events, tasks, emit: Emit) -> None:
    """Run the study tasks in the pool's processes, passing their events on as they come."""
    from concurrent.futures import FIRST_COMPLETED, wait

    pending = {pool.submit(_worker, task) for task in tasks}
    while pending:
        finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
        _drain(events, emit)
        for future in finished:
            error = future.exception()
            if error is not None:
                for other in pending:
                    other.cancel()
                raise error
    _drain(events, emit)


def _draw_figure(results, out_dir: Path, formats: Sequence[str], name: str) -> list[Path]:
    """One figure of the gallery, drawn in a worker (:func:`landscape.figures.write_figures`)."""
    from landscape.figures import write_figures

    return write_figures(results, out_dir, formats=formats, names=[name]).get(name, [])


def _parallel_figures(pool, results, out_dir: Path, formats: Sequence[str]) -> dict[str, list[Path]]:
    """The gallery with one figure per task in the pool's processes, in the order of
    :data:`landscape.figures.FIGURES`."""
    from landscape.figures import FIGURES

    futures = {name: pool.submit(_draw_figure, results, out_dir, tuple(formats), name) for name in FIGURES}
    written = {}
    for name, future in futures.items():
        paths = future.result()
        if paths:
            written[name] = paths
    return written


def _drain(events, emit: Emit) -> None:
    while not events.empty():  # this process is the only reader
        emit(events.get())


def analyze_run(run: Run, settings: AnalysisSettings, *, data_dir=None, emit: Emit | None = None,
                force: bool = False) -> None:
    """Every analysis of one run with ``settings``: the Hessian's top eigenvalue and trace at the selected
    checkpoints; its spectral density, sharpness and loss surfaces at the final one; the dynamics. ``force``
    recomputes results made with other settings instead of refusing them."""
    from landscape.analyses.dynamics import write_dynamics

    emit = emit or (lambda e: None)
    kept_results = not run.checkpoints() and any(run.analysis_dir.glob("*.nc"))
    if kept_results and force:
        raise LandscapeError(f"{run.root} keeps its results but not its checkpoints, so --force cannot measure them "
                             "again; train the study into another --out to measure anew.")
    for stage, analysis in _ANALYSES.items():
        t0 = time.perf_counter()
        if kept_results:  # a folder of results (checkpoints not kept): what it holds is what the study reports
            emit(StudyEvent(stage, run.root.name, "checkpoints not kept: read from the results files", 0.0))
            continue
        message = analysis(run, settings, data_dir, force)
        emit(StudyEvent(stage, run.root.name, message, time.perf_counter() - t0))
    t0 = time.perf_counter()
    ds, _ = write_dynamics(run)
    drop = ds["peak_to_final_drop"]
    text = ", ".join(f"{w} {float(drop.sel(weights=w)):.2f}" for w in ds["weights"].values)
    emit(StudyEvent("dynamics", run.root.name, f"peak-to-final drop (points): {text}", time.perf_counter() - t0))


def _hessian(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.driver import analyze
    from landscape.analyses.hessian import HessianAnalysis

    measured: list[int] = []
    options = dict(data_dir=data_dir, force=force, device=settings.device, on_plan=measured.append)
    curvature, density = settings.hessian_settings()
    ds = analyze(run, HessianAnalysis(curvature, save_eigenvectors=settings.subspace and settings.top_k > 0),
                 checkpoints=settings.hessian_checkpoints(run), **options)
    analyze(run, HessianAnalysis(density), checkpoints=settings.at_checkpoints(run), **options)
    last = ds.isel(checkpoint=-1)
    return (f"{ds.sizes['checkpoint']} checkpoints; final top eigenvalue {float(last['eigenvalue_largest'][0]):.3g}, "
            f"trace {float(last['trace']):.3g}{_already(measured)}")


def _sharpness(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.driver import analyze
    from landscape.analyses.sharpness import SharpnessAnalysis

    measured: list[int] = []
    options = dict(checkpoints=settings.at_checkpoints(run), data_dir=data_dir, force=force, device=settings.device,
                   on_plan=measured.append)
    plain, adaptive = settings.sharpness_settings()
    ds = analyze(run, SharpnessAnalysis(plain), **options)
    ads = analyze(run, SharpnessAnalysis(adaptive), **options)
    last, alast = ds.isel(checkpoint=-1), ads.isel(checkpoint=-1)
    return (f"worst case at rho={settings.rhos[-1]:g}: {float(last['worst_case'][-1]):.3g} nats, adaptive at "
            f"rho={settings.adaptive_rhos[-1]:g}: {float(alast['worst_case'][-1]):.3g} nats{_already(measured)}")


def _surface(run: Run, settings: AnalysisSettings, data_dir, force: bool = False) -> str:
    from landscape.analyses.driver import analyze
    from landscape.analyses.surface import SurfaceAnalysis

    measured: list[int] = []
    for surface in settings.surface_settings():
        analyze(run, SurfaceAnalysis(surface), checkpoints=settings.at_checkpoints(run), data_dir=data_dir,
                force=force, device=settings.device, on_plan=measured.append)
    return (f"1D line of {settings.surface_points} points, 2D plane of {settings.surface_points_2d}² points"
            f"{_already(measured)}")


def _already(measured: list[int]) -> str:
    """What a stage's line adds when its analyses found every checkpoint already in their results files (the
    driver's ``on_plan`` is called only when there is something to measure)."""
    return "" if measured else " (already measured: read from the results files)"


_ANALYSES: dict[str, Callable[..., str]] = {
    "hessian": _hessian,
    "sharpness": _sharpness,
    "surface": _surface,
}

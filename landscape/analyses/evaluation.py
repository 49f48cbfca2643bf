"""The fixed evaluation set of a run, read from its config and checked against its model.

An analysis measures a model on a fixed evaluation set (:class:`landscape.curvature.loss.EvaluationSet`); which
examples those are for a run (its dataset, image size, synthetic options) is read here from the run's
``config.yaml`` and its last checkpoint, and recorded in the results' attrs.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from landscape.errors import LandscapeError

Tensor = torch.Tensor


def analysis_data_for_run(
    run: Any,
    samples: int,
    *,
    seed: int = 0,
    split: str = "train",
    dataset: str | None = None,
    data_dir: Any = None,
    img_size: int | None = None,
    classes: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The fixed evaluation set of a run: ``samples`` examples of its dataset, seeded, in a fixed order; of the
    training split, only among the images the run trained on when it trained on a subset (``data.train_size``).

    The dataset (name, image size, synthetic options) comes from the run's ``config.yaml`` (``data.name``,
    ``data.img_size``, ``data.options``) unless ``dataset`` / ``img_size`` / ``classes`` are given; synthetic data
    takes the model's channels, image size and classes where they are not given. Before anything is loaded the
    data is checked against the model's input channels, image size and classes
    (:func:`landscape.data.check_data_fits`). Returns ``x`` float32 ``(N, C, H, W)`` normalised with the
    evaluation transform and ``y`` int64 ``(N,)`` (:func:`landscape.data.analysis_subset`).
    """
    from landscape.data import analysis_subset, check_data_fits

    from landscape.data import check_data_record
    from landscape.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    name, img_size, options, facts = _resolve_analysis_data(run, dataset, img_size, classes)
    check_data_fits(name, img_size=img_size, options=options, data_dir=data_dir, **facts)
    check_data_record(run.load_data_record(), name, split, where=str(run.root), data_dir=data_dir, **options)
    if name == "synthetic":
        options.setdefault("count", max(samples, 1024))
    trained = (run.load_config().get("data") or {})
    within = trained.get("train_size") if split == "train" and name == trained.get("name") and name != "synthetic" \
        and isinstance(trained.get("train_size"), int) else None  # the images the run trained on, at any seed
    x, y = analysis_subset(name, samples, seed=seed, split=split, data_dir=data_dir, img_size=img_size,
                           within=within, **options)
    if len(y) < samples:  # a smaller set than asked for would be recorded under the larger number
        of = (f"the {len(y)} training images the run trained on (data.train_size)" if within is not None
              and within == len(y) else f"the {len(y)} examples of the {split} split of {name}")
        raise LandscapeError(f"--samples {samples} is more than {of}; give --samples {len(y)} or fewer.")
    if facts["model_classes"] is not None and len(y) and int(y.max()) >= facts["model_classes"]:
        raise LandscapeError(f"{name} has labels up to {int(y.max())}, but the model predicts "
                             f"{facts['model_classes']} classes; give a dataset of {facts['model_classes']} classes "
                             "with --data, or --data synthetic.")
    return x, y


def analysis_data_attrs(run: Any, dataset: str | None = None, img_size: int | None = None,
                        classes: int | None = None) -> dict[str, Any]:
    """What a results file's evaluation data is, for its attrs: ``data`` (name), ``data_img_size``,
    ``data_options`` and, for synthetic data, ``data_note`` saying that it is not the model's own data."""
    name, size, options, _ = _resolve_analysis_data(run, dataset, img_size, classes)
    attrs: dict[str, Any] = {"data": name, "data_img_size": size if size is not None else "", "data_options": options}
    if name == "synthetic":
        attrs["data_note"] = ("synthetic data: seeded class prototypes plus Gaussian noise of the model's input "
                              "shape, not the data the model was trained on; no dataset was read")
    return attrs


def _resolve_analysis_data(run: Any, dataset: str | None, img_size: int | None,
                           classes: int | None) -> tuple[str, int | None, dict[str, Any], dict[str, Any]]:
    """``(dataset name, image size, synthetic options, model facts)`` for the evaluation data of ``run``."""
    from landscape.runs import Run

    run = run if isinstance(run, Run) else Run.open(run)
    data = run.load_config().get("data") or {}
    name = dataset or data.get("name")
    if not name:
        raise LandscapeError(
            f"Run {run.root} does not say which dataset it was trained on (no data.name in config.yaml); "
            "name the dataset with --data (--data synthetic needs no files)."
        )
    if classes is not None and name != "synthetic":
        raise LandscapeError(f"--classes sets the classes of synthetic data only; {name} has its own classes.")
    from_config = not dataset or dataset == data.get("name")
    if img_size is None and from_config:
        img_size = data.get("img_size")
    options: dict[str, Any] = {}
    if name == "synthetic" and from_config and isinstance(data.get("options"), dict):
        options = dict(data["options"])
        img_size = img_size or options.get("img_size")
        options.pop("img_size", None)
    facts = run_model_facts(run)
    if name == "synthetic":
        options.setdefault("in_chans", facts["model_in_chans"] or 1)
        if classes is not None:
            options["num_classes"] = classes
        options.setdefault("num_classes", facts["model_classes"] or 10)
        img_size = img_size or facts["model_img_size"]
    return name, img_size, options, facts


def run_model_facts(run: Any) -> dict[str, int | None]:
    """The input channels, image size and classes of the model of ``run``'s last checkpoint (``None`` where the
    model does not say: a model taking any image size, or a run without checkpoints), built on the meta device."""
    from landscape.checkpoints import header_kwargs

    facts: dict[str, int | None] = {"model_in_chans": None, "model_img_size": None, "model_classes": None}
    infos = run.checkpoints()
    if not infos:
        return facts
    try:
        kwargs = header_kwargs(infos[-1])
        key = (infos[-1].model, json.dumps(kwargs, sort_keys=True, default=repr))
    except Exception:  # noqa: BLE001  (loading the checkpoint reports an unbuildable model in one sentence)
        return facts
    if key not in _MODEL_FACTS:
        _MODEL_FACTS[key] = _model_facts(infos[-1].model, kwargs, facts)
    return dict(_MODEL_FACTS[key])


_MODEL_FACTS: dict[tuple[str, str], dict[str, int | None]] = {}
""":func:`run_model_facts` by model name and architecture arguments: a process analysing many runs of a few
models builds each once."""


def _model_facts(name: str, kwargs: dict[str, Any], facts: dict[str, int | None]) -> dict[str, int | None]:
    from landscape.models import create_model

    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except Exception:  # noqa: BLE001  (loading the checkpoint reports an unbuildable model in one sentence)
        return facts
    conv = next((m for m in model.modules() if isinstance(m, torch.nn.Conv2d)), None)
    facts["model_in_chans"] = conv.in_channels if conv is not None else None
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None and getattr(patch_embed, "strict_img_size", True) and not getattr(
            patch_embed, "dynamic_img_size", False):
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        facts["model_img_size"] = int(size[0]) if len(set(size)) == 1 else None
    num_classes = getattr(model, "num_classes", None)
    facts["model_classes"] = int(num_classes) if isinstance(num_classes, int) and num_classes > 0 else None
    return facts


def evaluation_data(run: Any, settings: Any, data_dir: Any = None, results: Any = None) -> tuple[Tensor, Tensor]:
    """:func:`analysis_data_for_run` for an analysis's settings (``samples``, ``seed``, ``split``, ``dataset``,
    ``img_size``, ``classes``); the data's description (:func:`analysis_data_attrs`) goes into the attrs of
    ``results`` (an :class:`~landscape.analyses.results.AnalysisResults`, or ``None`` off the main process)."""
    from landscape.analyses.results import netcdf_attrs

    data = dict(dataset=settings.dataset, img_size=getattr(settings, "img_size", None),
                classes=getattr(settings, "classes", None))
    x, y = analysis_data_for_run(run, settings.samples, seed=settings.seed, split=settings.split,
                                 data_dir=data_dir, **data)
    if results is not None:
        results.attrs.update(netcdf_attrs(analysis_data_attrs(run, **data)))
    return x, y

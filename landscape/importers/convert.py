"""``landscape import``: a foreign checkpoint, read, filtered and rebuilt, checked and written as a run directory."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from landscape.checkpoints import load_state_dict_strict, save_checkpoint
from landscape.config import config_hash
from landscape.data import check_data_fits, dataset_names
from landscape.errors import CheckpointError, LandscapeError
from landscape.io import STALE_AFTER_S, WriteError, check_run_name, file_sha256, pid_alive, temporary_stem
from landscape.importers.filters import StateDict
from landscape.importers.read import read_foreign_checkpoint, read_logits_pair
from landscape.importers.recover import TIMM_NORM_EPS, ModelSpec, create_model, first_line, resolve_model
from landscape.runs import Run


def build_for_import(spec: ModelSpec) -> torch.nn.Module:
    """Build ``spec`` to be loaded; a LayerNorm epsilon that the model zoo cannot take is dropped with a note."""
    try:
        return _build_uninitialised(spec.name, spec.kwargs)
    except LandscapeError:
        if "norm_eps" not in spec.kwargs:
            raise
    eps = spec.kwargs.pop("norm_eps")
    spec.notes.append(
        f"the source's LayerNorm epsilon is {eps:g} but the model is built with timm's {TIMM_NORM_EPS:g}: "
        "logits differ where a token's features have a variance not far above these"
    )
    return _build_uninitialised(spec.name, spec.kwargs)


def _build_uninitialised(name: str, kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model without timm's weight initialisation, which the strict load overwrites entirely (ViT-B: ~5 s)."""
    try:
        return create_model(name, **kwargs, weight_init="skip")
    except LandscapeError as e:
        if "weight_init" not in str(e):
            raise
    return create_model(name, **kwargs)


def load_into_model(spec: ModelSpec, state: StateDict, *, source: str) -> torch.nn.Module:
    """Build ``spec`` and load ``state`` strictly; any key mismatch is one :class:`CheckpointError` block."""
    model = build_for_import(spec)
    load_state_dict_strict(model, state, source=source)
    _check_sharing(model, state, source)
    return model.eval()


def _check_sharing(model: torch.nn.Module, state: StateDict, source: str) -> None:
    """Every name of a shared parameter must hold the same values in the file (else loading kept only the last)."""
    names_by_param: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        names_by_param.setdefault(id(tensor), []).append(name)
    for names in names_by_param.values():
        first = state[names[0]]
        for other in names[1:]:
            if not torch.equal(state[other], first):
                raise CheckpointError(
                    f"The weights in {source} give {names[0]} and {other} different values, but the model "
                    "shares one parameter between them; build the model without sharing."
                )


@dataclass
class ImportResult:
    """What :func:`import_checkpoint` wrote."""

    run: Run
    checkpoint: Path
    format: str
    model: str
    model_kwargs: dict[str, Any]
    num_params: int
    has_ema: bool
    data: str
    notes: list[str]
    builder: str | None = None
    facts: dict[str, dict[str, Any]] = field(default_factory=dict)


def guess_dataset(num_classes: int, in_chans: int, img_size: int | None) -> str:
    """The dataset an imported model was most likely trained on, from its classes, channels and image size."""
    if in_chans == 1 and num_classes == 10:
        return "digits" if img_size == 8 else "mnist"
    if in_chans == 3 and num_classes == 10:
        return "cifar10"
    if in_chans == 3 and num_classes == 100:
        return "cifar100"
    return "imagefolder"


def import_data_config(spec: ModelSpec, data: str | None, img_size: int | None, classes: int | None,
                       data_dir: str | os.PathLike | None = None) -> tuple[dict[str, Any], list[str]]:
    """The ``data`` section of an imported run and its notes; refuses data that does not fit the model.

    ``synthetic`` data takes the model's channels, image size and classes unless ``img_size`` / ``classes``
    say otherwise.
    """
    kwargs = spec.kwargs
    model_size, in_chans, num_classes = kwargs.get("img_size"), kwargs.get("in_chans", 3), kwargs.get("num_classes")
    notes: list[str] = []
    name = data or guess_dataset(num_classes or 0, in_chans, model_size)
    if data is None:
        notes.append(f"dataset {name!r} guessed from classes, channels and image size; set it with --data "
                     "(--data synthetic analyses the model with no dataset on disk)")
    if classes is not None and name != "synthetic":
        raise LandscapeError(f"--classes sets the classes of synthetic data only; {name} has its own classes.")
    options: dict[str, Any] = {}
    if name == "synthetic":
        options = {"in_chans": in_chans, "num_classes": classes or num_classes or 10}
    size = img_size or model_size
    check_data_fits(name, img_size=size, options=options, model_in_chans=in_chans, model_img_size=model_size,
                    model_classes=num_classes, data_dir=data_dir)
    config: dict[str, Any] = {"name": name, "img_size": size}
    if options:
        config["options"] = options
    if name != "synthetic":  # the source's own statistics are not in the file: a model trained on others is
        from landscape.data import get_dataset_info  # measured off the inputs it learned

        info = get_dataset_info(name)
        if info.mean and info.std:
            stats = lambda values: ", ".join(f"{v:.4g}" for v in values)  # noqa: E731
            notes.append(f"the analyses feed {name} images normalised as landscape trains on them (mean "
                         f"{stats(info.mean)}, std {stats(info.std)}); a model trained on other statistics (e.g. mean "
                         "0.5, std 0.5) is measured on inputs unlike its own (--check-logits takes its own inputs, "
                         "so it cannot tell)")
        if info.train_size:  # a landscape run's examples come from the subset it trained on; the source's is unknown
            notes.append(f"the analyses take their examples from all {info.train_size:,} training images of {name}, "
                         "not knowing which of them the source trained on: a model trained on a subset is measured "
                         "mostly on images it never saw (its loss there is higher)")
    return config, notes


LOGITS_RTOL = 1e-4
TRIVIAL_LOGITS = 1e-6  # below this largest reference logit, a logits check tells nothing


def verify_logits(model: torch.nn.Module, x: torch.Tensor, expected: torch.Tensor, *, source: str,
                  facts: dict[str, dict[str, Any]] | None = None, weights_dtype: torch.dtype | None = None) -> float:
    """The largest absolute difference between ``model(x)`` and ``expected``; refused above the tolerance.

    The tolerance is :data:`LOGITS_RTOL` times the largest expected logit: float32 models from two codebases agree
    to about 1e-6 of that, a wrong head count or pooling differs by a good fraction of it (an untrained model's
    logits are small, so a floor of 1 would let a wrong head count through). A source that computed in half
    precision (its logits or ``weights_dtype`` float16/bfloat16) rounds at a far coarser level: the tolerance is
    then :data:`HALF_LOGITS_ULPS` units of that precision. Logits that are all about zero (a zero-initialised
    head) cannot tell models apart: the caller notes it.
    """
    if x.ndim != 4 or expected.ndim != 2 or x.shape[0] != expected.shape[0] or x.shape[0] == 0:
        raise CheckpointError(f"{source} must hold an input (N, C, H, W) and logits (N, classes) of the same N of at "
                              f"least 1, not {tuple(x.shape)} and {tuple(expected.shape)}.")
    if not (x.is_floating_point() and expected.is_floating_point()):
        raise CheckpointError(f"{source} must hold floating-point input and logits, not {str(x.dtype)[6:]} and "
                              f"{str(expected.dtype)[6:]}.")
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is not None and tuple(x.shape[-2:]) != tuple(size) and not getattr(model.patch_embed, "dynamic_img_size",
                                                                                 False):
        raise CheckpointError(f"The input in {source} is {x.shape[-2]}x{x.shape[-1]} pixels but the imported model "
                              f"takes {size[0]}x{size[1]} images; save the source's logits at that size, or give the "
                              "source's size with --model-arg img_size=N.")
    try:
        with torch.no_grad():
            out = model.eval()(x.float())
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:  # timm's patch embedding asserts its size
        raise CheckpointError(f"The imported model cannot take the input in {source} ({first_line(e)}).") from None
    out = getattr(out, "logits", out)
    if tuple(out.shape) != tuple(expected.shape):
        raise CheckpointError(f"The imported model gives logits of shape {tuple(out.shape)}, but {source} holds "
                              f"{tuple(expected.shape)}.")
    diff = float((out.double() - expected.double()).abs().max())
    half = sorted({d for d in (expected.dtype, weights_dtype) if d in (torch.float16, torch.bfloat16)}, key=str)
    rtol = max([LOGITS_RTOL] + [HALF_LOGITS_ULPS * torch.finfo(d).eps for d in half])
    tol = rtol * float(expected.double().abs().max())
    if not diff <= tol:
        guessed = [f"{k}={f['value']!r}" for k, f in (facts or {}).items() if f.get("how") == "guessed"]
        hint = (f"the guessed {', '.join(guessed)} may be wrong: override with --model-arg KEY=VALUE" if guessed
                else "check the --model-arg values and the format")
        hint += (" (the weights cannot tell the activation or the kind of norm either: the model is built with "
                 "timm's exact GELU and LayerNorm, and a source with others cannot be imported)")
        precision = (f" (allowing for {', '.join(str(d).removeprefix('torch.') for d in half)} rounding)"
                     if half else "")
        raise CheckpointError(f"The imported model's logits differ from those in {source} by up to {diff:.3g} "
                              f"(tolerance {tol:.3g}{precision}), so it is not the source's model; {hint}.")
    return diff


HALF_LOGITS_ULPS = 4
"""The logits tolerance for a half-precision source, in units of its precision (bfloat16: 4 x 2^-7, 3% of the
largest logit; float16: 4 x 2^-10): rounding at every layer adds up to one or two units (bfloat16 ViTs: about 1%),
a wrong head count to several."""


def weights_dtype(state: StateDict) -> torch.dtype | None:
    """The floating-point dtype of a state dict's tensors (the lowest precision when mixed)."""
    dtypes = {t.dtype for t in state.values() if isinstance(t, torch.Tensor) and t.is_floating_point()}
    return min(dtypes, key=lambda d: torch.finfo(d).bits, default=None) if dtypes else None


def _check_dataset(name: str) -> None:
    names = dataset_names()
    if name not in names:
        raise LandscapeError(f"Unknown dataset {name!r}; accepted are {', '.join(names)}.")


def _remove_interrupted_imports(out: Path) -> list[Path]:
    """Remove the unfinished copies (``.OUT.PID.RANDOM.importing``) that imports into ``out`` killed before their
    rename left next to it; a live process's copy stays unless untouched for :data:`landscape.io.STALE_AFTER_S`."""
    stem = temporary_stem(out)
    pattern = re.compile(rf"^\.{re.escape(stem)}\.(?:(\d+)\.)?[^.]+\.importing$")
    removed = []
    for path in out.parent.glob(f".{glob.escape(stem)}.*.importing"):
        match = pattern.match(path.name)
        if not match or not path.is_dir() or path.is_symlink():
            continue
        with contextlib.suppress(OSError):
            pid = match.group(1)
            if (pid is None or pid_alive(int(pid))) and time.time() - path.stat().st_mtime < STALE_AFTER_S:
                continue
            shutil.rmtree(path)
            removed.append(path)
    return removed


_COUNT_ARGS = {"img_size": 1, "patch_size": 1, "in_chans": 1, "num_classes": 0, "embed_dim": 1, "depth": 1,
               "num_heads": 1, "reg_tokens": 0, "group_size": 1}
"""Model arguments that are counts, with their smallest value."""


def check_model_args(model_args: dict[str, Any] | None) -> dict[str, Any]:
    """``--model-arg`` values an imported run can record and rebuild: architecture arguments only (what a checkpoint
    header may hold, :data:`landscape.checkpoints.ARCHITECTURE_ARGS`), counts as whole numbers; else one sentence
    before anything is read or written."""
    from landscape.checkpoints import ARCHITECTURE_ARGS, architecture_kwargs

    model_args = dict(model_args or {})
    refused = sorted(k for k in model_args if k not in ARCHITECTURE_ARGS)
    if refused:
        raise LandscapeError(
            f"--model-arg {', '.join(refused)} cannot be recorded with an imported run (its checkpoint would be "
            "refused by every later command); accepted are the architecture arguments, for instance num_heads, "
            "img_size, global_pool, group_size, norm_eps.")
    for key, least in _COUNT_ARGS.items():
        value = model_args.get(key)
        if key in model_args and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise LandscapeError(f"--model-arg {key}={value!r} must be a whole number of at least {least}.")
    return architecture_kwargs(model_args, source="--model-arg")


IMPORT_STAGES = ("reading the file", "building the model", "checking logits", "loading EMA weights", "writing the run")


def import_checkpoint(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    format: str | None = None,
    model: str | None = None,
    model_args: dict[str, Any] | None = None,
    data: str | None = None,
    img_size: int | None = None,
    classes: int | None = None,
    check_logits: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: Callable[[str], Any] | None = None,
) -> ImportResult:
    """Turn a foreign checkpoint into a run directory ``out`` with one checkpoint (step 0) and its config.

    ``progress`` is called with the name of each stage of :data:`IMPORT_STAGES` as it starts (a progress bar).

    Everything is checked (read, filter, recover, build, strict load of raw and EMA weights, the logits against
    ``check_logits`` or a reference output the file holds, the data against the model's input and classes)
    before anything is written; the run is then written into a temporary sibling directory renamed onto ``out``
    at the end. ``out`` must not exist or be an empty directory.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LandscapeError(f"{out} already exists; choose a new --out directory for the imported run.")
    check_run_name(out)
    if data is not None:
        _check_dataset(data)
    model_args = check_model_args(model_args)

    stage = progress or (lambda name: None)
    stage(IMPORT_STAGES[0])
    foreign = read_foreign_checkpoint(source, format)
    stage(IMPORT_STAGES[1])
    spec = resolve_model(foreign, model, model_args)
    label = str(foreign.path)
    if spec.kwargs.get("num_classes") == 0:
        raise CheckpointError(
            f"{label} holds no classifier (no head.weight, or classifier.weight in Hugging Face names): a backbone "
            "alone has no classification loss to measure; import a checkpoint with its head.")
    raw_model = load_into_model(spec, foreign.state_dict, source=label)
    stage(IMPORT_STAGES[2])
    notes = list(spec.notes)
    if foreign.extra.get("submodule"):
        notes.append(f"the network is the file's {foreign.extra['submodule']}.* tensors" +
                     (f"; left out: {', '.join(x + '.*' for x in foreign.extra['left_out'])}"
                      if foreign.extra.get("left_out") else ""))
    source_dtype = weights_dtype(foreign.state_dict)
    if source_dtype is not None and source_dtype != torch.float32:
        notes.append(f"weights stored in {str(source_dtype).removeprefix('torch.')}: analysed in float32 (or "
                     "--dtype), to which they convert exactly" if torch.finfo(source_dtype).bits < 32 else
                     f"weights stored in {str(source_dtype).removeprefix('torch.')}: kept in float32 (rounded)")
    checks = []
    if "reference" in foreign.extra:
        x, expected = foreign.extra.pop("reference")
        diff = verify_logits(raw_model, x, expected, source=f"{label} (its reference_logits)", facts=spec.facts,
                             weights_dtype=source_dtype)
        checks.append({"against": "reference_logits in the file", "inputs": int(x.shape[0]), "max_abs_diff": diff,
                       "largest": float(expected.abs().max())})
    if check_logits is not None:
        x, expected = read_logits_pair(check_logits)
        diff = verify_logits(raw_model, x, expected, source=str(check_logits), facts=spec.facts,
                             weights_dtype=source_dtype)
        checks.append({"against": str(Path(check_logits).resolve()), "inputs": int(x.shape[0]), "max_abs_diff": diff,
                       "largest": float(expected.abs().max())})
    for check in checks:
        notes.append(f"logits verified against {check['against']}: largest difference {check['max_abs_diff']:.2g} "
                     f"over {check['inputs']} inputs" + ("; but every reference logit is about 0 (a zero-initialised "
                                                         "head?), so the check cannot tell models apart"
                                                         if check["largest"] < TRIVIAL_LOGITS else ""))
    confirmed = [c for c in checks if c["largest"] >= TRIVIAL_LOGITS]
    if confirmed:  # the logits settle what the weights left open: the guesses stand confirmed, not guessed
        for fact in spec.facts.values():
            if fact.get("how") == "guessed":
                fact.update(how="confirmed", by=confirmed[0]["against"])
        notes = [n.replace(", or --check-logits FILE to verify", "; confirmed by the logits check") for n in notes]
    if not checks and not foreign.hints.get("arch"):  # nothing stated the network and nothing checked it
        notes.append("activation and norm taken to be timm's exact GELU and LayerNorm (the weights cannot tell "
                     "them); --check-logits FILE verifies the import")
    ema_state = None
    stage(IMPORT_STAGES[3])
    if foreign.ema_state_dict is not None:
        ema_state = load_into_model(spec, foreign.ema_state_dict, source=f"{label} (EMA weights)").state_dict()
    state = raw_model.state_dict()
    for weights, what in ((state, "weights"), (ema_state or {}, "EMA weights")):
        bad = next((k for k, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())), None)
        if bad is not None:
            raise CheckpointError(f"{label} holds NaN or infinite values in its {what} ({bad}); there is no loss "
                               "landscape to measure around them.")
    num_params = sum(p.numel() for p in raw_model.parameters())

    data_config, data_notes = import_data_config(spec, data, img_size, classes, data_dir)
    data_name = data_config["name"]
    notes += data_notes

    weights_file = foreign.weights_file or foreign.path
    source_info = {
        "file": str(Path(source).resolve()),
        "format": foreign.format,
        "sha256": file_sha256(weights_file) if weights_file.is_file() else None,
        "weights": ["raw", "ema"] if ema_state is not None else ["raw"],
        "weights_dtype": str(source_dtype).removeprefix("torch.") if source_dtype is not None else None,
        "architecture": spec.facts,
        **{k: v for k, v in foreign.extra.items() if k != "container"},
    }
    if checks:
        source_info["logits_checks"] = checks
    if weights_file != foreign.path:
        source_info["weights_file"] = str(weights_file.resolve())
    model_config: dict[str, Any] = {"name": spec.label or spec.name, "kwargs": spec.kwargs}
    if spec.label:
        model_config["builder"] = spec.name
    config = {
        "model": model_config,
        "data": data_config,
        "seed": 0,
        "source": source_info,
    }

    stage(IMPORT_STAGES[4])
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_interrupted_imports(out)
    tmp: Path | None = None
    try:
        while True:  # named before it exists, so that a SIGTERM just after the mkdir still finds it below
            tmp = out.parent / f".{temporary_stem(out)}.{os.getpid()}.{secrets.token_hex(6)}.importing"
            try:
                tmp.mkdir()
                break
            except FileExistsError:
                tmp = None
        run = Run.create(tmp)
        run.save_config(config)
        checkpoint = run.checkpoint_path(epoch=0)
        save_checkpoint(
            checkpoint, state, model=spec.name, model_kwargs=spec.kwargs, epoch=0, step=0, metrics={},
            config_hash=config_hash(config), ema_state_dict=ema_state,
            extra={"source": source_info, **({"model_label": spec.label} if spec.label else {})},
        )
        try:
            if out.exists():
                out.rmdir()
            os.replace(tmp, out)
        except OSError as e:  # another process wrote into out meanwhile (ENOTEMPTY, EEXIST): its run stays
            if out.exists() and (not out.is_dir() or any(out.iterdir())):
                raise LandscapeError(f"{out} was created by another process while this import ran; it was left "
                                     "as that process wrote it: choose a new --out directory.") from None
            raise e
    except WriteError as e:  # the machine's failure, said of the folder asked for, not of the hidden staging one
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
            raise WriteError(f"{str(e).replace(str(tmp), str(out))} Nothing of the import was kept.", path=out) \
                from None
        raise
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    run = Run(out)
    return ImportResult(
        run=run, checkpoint=out / checkpoint.relative_to(tmp), format=foreign.format, model=spec.label or spec.name,
        model_kwargs=spec.kwargs, num_params=num_params, has_ema=ema_state is not None, data=data_name,
        notes=notes, builder=spec.name, facts=spec.facts,
    )

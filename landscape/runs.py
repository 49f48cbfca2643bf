"""The run directory: where a training run and its analyses live.

```
RUN/
  config.yaml          everything needed to rebuild model, data and recipe
  metrics.csv          one row per evaluation
  checkpoints/         epoch-0001.safetensors, step-00000500.safetensors, ...
  state/last.pt        optimizer, scheduler, RNG states: for resume only
  preconditioner/      epoch-0001.safetensors, ...: Adam's second moment at each checkpoint (save_preconditioner)
  analysis/            hessian.nc, sharpness.nc, surface-*.nc, dynamics.nc
```

A directory is a run when it has ``config.yaml`` or a ``checkpoints/`` folder; an imported checkpoint
becomes a run with one checkpoint and no metrics.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

from landscape.checkpoints import CheckpointInfo, read_checkpoint_info
from landscape.config import load_yaml, save_yaml
from landscape.io import atomic_write_text
from landscape.errors import CheckpointError, LandscapeError
from landscape.io import RUN_ENTRIES, WriteError, describe_os_error, make_dirs

CHECKPOINT_SPEC_HELP = "all, last, every:N (every Nth checkpoint and the last), epochs:1,10,50 or steps:100,200"


class Run:
    """Paths and tables of one run directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)

    # -- layout ------------------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def state_path(self) -> Path:
        return self.state_dir / "last.pt"

    @property
    def analysis_dir(self) -> Path:
        return self.root / "analysis"

    def analysis_path(self, name: str) -> Path:
        """``analysis/<name>.nc``."""
        return self.analysis_dir / f"{name}.nc"

    @property
    def name(self) -> str:
        return self.root.resolve().name

    # -- creating and opening ------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | os.PathLike, *, overwrite: bool = False) -> "Run":
        """Make a new run directory.

        An existing run is refused unless ``overwrite``; a folder holding anything that is not a run is always
        refused. ``overwrite`` removes only what a run writes (config, metrics, checkpoints, state, analyses,
        figures, reports and their temporary files): dot-files and anything else stay. A folder left by a run
        that failed before its first training state (at most its first metrics row and checkpoint) is reused.
        The caller holds the run's lock (:class:`landscape.io.RunLock`), so no other process is writing it.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise LandscapeError(f"{root} exists and is not a directory.")
        if root.exists():
            if not looks_like_run(root):
                raise LandscapeError(
                    f"{root} already holds files that are not a landscape run; choose another --out folder."
                )
            if not is_empty_run(root) and not overwrite:
                raise LandscapeError(
                    f"Run directory {root} already exists; continue it with --resume or replace it with --overwrite."
                )
            _remove_run_files(root)
        run = cls(root)
        make_dirs(run.checkpoints_dir)
        return run

    @classmethod
    def open(cls, root: str | os.PathLike) -> "Run":
        """Open an existing run directory, or refuse with a sentence saying what a run directory is."""
        from landscape.io import special_file

        root = Path(root)
        if root.exists() and not root.is_dir():
            what = special_file(root) or "a file"
            raise CheckpointError(f"{root} is {what}, not a run directory; give the folder that holds config.yaml "
                                  "and checkpoints/.")
        if not root.is_dir():
            from landscape.io import dangling

            raise CheckpointError(f"Run directory {root} does not exist{dangling(root)}.")
        run = cls(root)
        if not run.config_path.exists() and not run.checkpoints_dir.is_dir():
            raise CheckpointError(
                f"{root} is not a run directory (it has neither config.yaml nor checkpoints/); "
                "make one with 'landscape train' or 'landscape import'."
            )
        return run

    # -- config ----------------------------------------------------------------------------------------------
    def load_config(self) -> dict[str, Any]:
        if not self.config_path.exists():
            _refuse_dangling(self.config_path)
            return {}
        config = load_yaml(self.config_path)
        if not config:  # an emptied file: read as defaults, it would describe another run than the one trained
            raise LandscapeError(f"{self.config_path} is empty; the run's settings are lost (copy them from another "
                                 "run's config.yaml or train it again).")
        check_run_config(config, self.config_path)
        return config

    def save_config(self, config: Any) -> None:
        save_yaml(config, self.config_path)

    # -- the data it was trained on ---------------------------------------------------------------------------
    @property
    def data_record_path(self) -> Path:
        """``RUN/data.json``: the dataset and a fingerprint of each split (:func:`landscape.data.data_record`)."""
        return self.root / "data.json"

    def save_data_record(self, record: dict[str, Any] | None) -> None:
        if record is not None:
            atomic_write_text(self.data_record_path, json.dumps(record, indent=1) + "\n")

    def load_data_record(self) -> dict[str, Any] | None:
        """The saved record, or ``None`` (a run from before records, an imported run, data read file by file); a
        damaged one is one sentence."""
        from landscape.io import refuse_special

        path = self.data_record_path
        if not path.exists():
            return None
        refuse_special(path, "a data record", error=CheckpointError)
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError, RecursionError):
            raise CheckpointError(f"{path} is damaged; delete it (the data will then not be checked).") from None
        if not isinstance(record, dict):
            raise CheckpointError(f"{path} is damaged; delete it (the data will then not be checked).")
        return record

    # -- checkpoints -----------------------------------------------------------------------------------------
    def checkpoint_path(self, *, epoch: int | None = None, step: int | None = None) -> Path:
        """``epoch-0001.safetensors`` for end-of-epoch checkpoints, ``step-00001234.safetensors`` otherwise."""
        if epoch is not None:
            return self.checkpoints_dir / f"epoch-{epoch:04d}.safetensors"
        if step is None:
            raise ValueError("checkpoint_path needs an epoch or a step")
        return self.checkpoints_dir / f"step-{step:08d}.safetensors"

    def checkpoints(self) -> list[CheckpointInfo]:
        """Every checkpoint of the run, sorted by step (then epoch, then name)."""
        if not self.checkpoints_dir.is_dir():
            return []
        infos = [_named_as_it_says(read_checkpoint_info(p)) for p in self.checkpoints_dir.glob("*.safetensors")]
        return sorted(infos, key=lambda i: (i.step, i.epoch if i.epoch is not None else -1, i.path.name))

    def check_checkpoint_model(self, info: CheckpointInfo) -> None:
        """Refuse a checkpoint whose header names another model or other model arguments than the run's
        config.yaml, or other losses than its row of metrics.csv (a file copied in from another run, of another
        size or seed, or a damaged header): its weights would be measured as this run's."""
        model = (self.load_config().get("model") or {}) if self.config_path.exists() else {}
        names = {model.get(k) for k in ("name", "builder") if isinstance(model, dict) and model.get(k)}
        another = "the checkpoint belongs to another run or its header is damaged (move it out of checkpoints/)"
        if names and info.model not in names:
            raise CheckpointError(f"{info.path} holds a {info.model} but {self.config_path} trains a "
                                  f"{sorted(names)[0]}; {another}.")
        kwargs = model.get("kwargs") if isinstance(model, dict) else None
        if isinstance(kwargs, dict) and isinstance(info.model_kwargs, dict):
            differ = [k for k in kwargs if k in info.model_kwargs and info.model_kwargs[k] != kwargs[k]]
            if differ:
                k = differ[0]
                raise CheckpointError(f"{info.path} holds a {info.model} with {k}={info.model_kwargs[k]!r} but "
                                      f"{self.config_path} trains one with {k}={kwargs[k]!r}; {another}.")
        row = self._metrics_row(info.step, info.epoch if info.epoch is not None else (info.metrics or {}).get("epoch"))
        for k in ("train_loss", "val_loss"):
            saved, recorded = (info.metrics or {}).get(k), row.get(k)
            if isinstance(saved, float) and isinstance(recorded, float) and math.isfinite(saved) and \
                    math.isfinite(recorded) and not math.isclose(saved, recorded, rel_tol=1e-9, abs_tol=0.0):
                raise CheckpointError(f"{info.path} was saved with {k} {saved:.6g}, but {self.metrics_path} "
                                      f"records {recorded:.6g} at its step {info.step}; {another}.")

    def _metrics_row(self, step: int, epoch: Any) -> dict[str, Any]:
        """The row ``metrics.csv`` records in ``epoch`` at ``step`` (a mid-epoch checkpoint's too: the trainer logs
        a row at every checkpoint), or an empty dict (no epoch known, no such row, no readable table: what cannot be
        read is said by its own readers)."""
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            return {}
        try:
            table = self.read_metrics()
        except LandscapeError:
            return {}
        if "step" not in table or "epoch" not in table:
            return {}
        rows = table[(table["epoch"] == epoch) & (table["step"] == step)]
        return {k: float(v) for k, v in rows.iloc[-1].items()} if len(rows) else {}

    def select_checkpoints(self, spec: str = "all") -> list[CheckpointInfo]:
        """Choose checkpoints by ``spec``: see :data:`CHECKPOINT_SPEC_HELP`."""
        infos = self.checkpoints()
        if not infos:
            raise CheckpointError(f"Run {self.root} has no checkpoints.")
        return select_checkpoints(infos, spec)

    # -- metrics ---------------------------------------------------------------------------------------------
    def read_metrics(self):
        """metrics.csv as a pandas DataFrame (empty if the run has no history, as for imported checkpoints)."""
        import pandas as pd

        if not self.metrics_path.exists():
            _refuse_dangling(self.metrics_path)
            return pd.DataFrame()
        from landscape.io import refuse_special

        refuse_special(self.metrics_path, "a metrics table", error=CheckpointError)
        damaged = f"{self.metrics_path} is damaged"
        advice = "restore it, or delete it and resume the run to write it again"
        problem = _csv_layout_problem(self.metrics_path)
        if problem:
            raise CheckpointError(f"{damaged} ({problem}); {advice}.")
        try:
            table = pd.read_csv(self.metrics_path)
        except pd.errors.EmptyDataError:
            raise CheckpointError(f"{damaged} (it is empty); {advice}.") from None
        except (UnicodeDecodeError, pd.errors.ParserError, ValueError) as e:
            raise CheckpointError(f"{damaged} (not a CSV table: {type(e).__name__}); {advice}.") from None
        except OSError as e:
            raise CheckpointError(f"{self.metrics_path} cannot be read ({e.strerror or e}).") from None
        if "epoch" not in table:
            raise CheckpointError(f"{damaged} (it has no epoch column); {advice}.")
        for column in table.columns:  # every column a trainer writes is a number
            if len(table) and not pd.api.types.is_numeric_dtype(table[column]):
                raise CheckpointError(f"{damaged} (its {column} column holds values that are not numbers); {advice}.")
        import numpy as np

        for column in ("epoch", "step"):
            values = table[column].to_numpy(dtype=float) if column in table else np.array([])
            if np.any(np.abs(values[np.isfinite(values)]) >= 2.0 ** 63):
                raise CheckpointError(f"{damaged} (its {column} column holds a count no run reaches); {advice}.")
        if "step" in table:  # one training writes one row per evaluation: a second one of other values is not its
            table = table.drop_duplicates()
            twice = table[table.duplicated(subset=["epoch", "step"], keep=False)].dropna(subset=["epoch", "step"])
            if len(twice):
                epoch, step = twice.iloc[0][["epoch", "step"]]
                raise CheckpointError(f"{damaged} (epoch {epoch:g}, step {step:g} appears in two rows of other "
                                      f"values); {advice}.")
        return table

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Rewrite metrics.csv atomically with ``rows`` (columns in first-seen order)."""
        import csv

        columns: list[str] = []
        for row in rows:
            for key in row:
                if key not in columns:
                    columns.append(key)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in columns})
        atomic_write_text(self.metrics_path, buf.getvalue())


def looks_like_run(root: Path) -> bool:
    """Everything in ``root`` is something a run writes, or a dot-file (its lock, its temporary files, a user's
    own ``.git`` or notes, which are never deleted)."""
    return all(p.name in RUN_ENTRIES or p.name.startswith(".") for p in root.iterdir())


def is_empty_run(root: Path, *, analyses: bool = True) -> bool:
    """No training state and no analysis result, and at most the first checkpoint and row: nothing a retry could
    lose (a run that failed before its first checkpoint, was killed while writing its config, or was killed before
    the training state that follows its first checkpoint). ``analyses=False`` leaves the analysis results out (a
    run that would be empty but for them: ``--resume`` refuses it, naming them)."""
    if not looks_like_run(root):
        return False
    if (root / "state" / "last.pt").exists() or (analyses and any((root / "analysis").glob("*.nc"))):
        return False
    checkpoints = list((root / "checkpoints").glob("*.safetensors"))
    # killed between its first checkpoint and its first training state (written after it, with the row before
    # both): a retry, which trains from the start with the same settings, writes that row and checkpoint again.
    # A run made otherwise (imported weights, a hand-made run: no metrics row) holds weights nothing reproduces.
    return not checkpoints or (len(checkpoints) == 1 and _metrics_rows(root) == 1)


def _metrics_rows(root: Path) -> int:
    """The number of rows in ``root/metrics.csv`` (0 when absent; -1 when unreadable: not known)."""
    try:
        with open(root / "metrics.csv", "rb") as f:
            return max(0, sum(1 for line in f if line.strip()) - 1)
    except FileNotFoundError:
        return 0
    except OSError:
        return -1


def _remove_run_files(root: Path) -> None:
    """Delete what a run writes in ``root`` (and the temporary files of its writes); nothing else."""
    try:
        for entry in root.iterdir():
            if entry.name in RUN_ENTRIES:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
            elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
                entry.unlink()
    except OSError as e:
        raise WriteError(f"Could not clear the run directory {root} ({describe_os_error(e)}).", path=root,
                         error=e) from None


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


def parse_checkpoint_spec(spec: str) -> tuple[str, list[int]]:
    """``(kind, numbers)`` of a checkpoint selection (:data:`CHECKPOINT_SPEC_HELP`): ``("all", [])``,
    ``("last", [])``, ``("every", [N])``, ``("epochs"|"steps", [...])``; a malformed one is a
    :class:`CheckpointError` sentence. Which checkpoints exist is not looked at."""
    given = spec
    spec = "all" if spec is None else str(spec).strip()
    if spec in ("all", "last"):
        return spec, []
    kind, _, arg = spec.partition(":")
    try:
        numbers = [int(x) for x in re.split(r"[,\s]+", arg) if x]
    except ValueError:
        numbers = []
    if (kind == "every" and len(numbers) == 1 and numbers[0] >= 1) or (kind in ("epochs", "steps") and numbers):
        return kind, numbers
    raise CheckpointError(f"Unknown checkpoint selection {given!r}; accepted are {CHECKPOINT_SPEC_HELP}.")


def select_checkpoints(infos: list[CheckpointInfo], spec: str) -> list[CheckpointInfo]:
    """Filter sorted checkpoints by a spec string (all, last, every:N, epochs:..., steps:...)."""
    kind, numbers = parse_checkpoint_spec(spec)
    if kind == "all":
        return list(infos)
    if kind == "last":
        return infos[-1:]
    if kind == "every":
        chosen = infos[::numbers[0]]
        if infos and infos[-1] not in chosen:
            chosen.append(infos[-1])
        return chosen
    attr = "epoch" if kind == "epochs" else "step"
    have = {getattr(i, attr): i for i in infos}
    missing = [w for w in numbers if w not in have]
    if missing:
        avail = sorted(k for k in have if k is not None)
        raise CheckpointError(
            f"No checkpoint at {kind[:-1]} {', '.join(map(str, missing))}; available: "
            f"{', '.join(map(str, avail[:30]))}{' ...' if len(avail) > 30 else ''}."
        )
    return [have[w] for w in sorted(set(numbers))]


_CHECKPOINT_NAME = re.compile(r"^(epoch|step)-(\d+)$")


def _named_as_it_says(info: CheckpointInfo) -> CheckpointInfo:
    """``info``, refused when its file name (``epoch-0003``, ``step-00001234``) and its header disagree: a
    checkpoint copied over another would otherwise be analysed as the one its name says."""
    match = _CHECKPOINT_NAME.match(info.path.stem)
    if match:
        kind, number = match.group(1), int(match.group(2))
        header = info.epoch if kind == "epoch" else info.step
        if header != number:
            raise CheckpointError(
                f"{info.path} is named {kind} {number} but its header says {kind} {header}; it was copied or renamed "
                "over another checkpoint: restore it, or move it out of checkpoints/.")
    return info


def _csv_layout_problem(path: Path) -> str | None:
    """What makes ``path`` no table pandas would read as written (``None`` when it is one): a column name given
    twice (pandas renames the second, and a reader takes the wrong one) or a row longer than the header (pandas
    takes the extra fields as an index, shifting every column)."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                return None
            repeated = sorted({c for c in header if header.count(c) > 1})
            if repeated:
                return f"its column {repeated[0]!r} is named twice"
            for number, row in enumerate(rows, start=2):
                if len(row) > len(header):
                    return f"line {number} has {len(row)} fields for {len(header)} columns"
    except (UnicodeDecodeError, csv.Error, OSError, ValueError):
        return None  # pandas says what it makes of it
    return None


def _refuse_dangling(path: Path) -> None:
    """Refuse a run file that is a symbolic link to nowhere (a loop, a missing target): read as absent, the run
    would be described without it, silently."""
    from landscape.io import dangling

    if dangling(path):
        raise CheckpointError(f"{path} is there but cannot be read{dangling(path)}; restore it or remove the link.")


def check_run_config(config: dict[str, Any], path: Any) -> None:
    """Refuse a run's config.yaml whose sections or counts have the wrong type: every reader would fail on it later
    in its own way (or, for counts, write what no results file can hold)."""
    for section in ("model", "data", "optim", "schedule", "ema", "augment", "checkpoint"):
        if section in config and config[section] is not None and not isinstance(config[section], dict):
            raise LandscapeError(f"{path} is damaged: its {section} section is {config[section]!r}, not a mapping of "
                                 "settings; restore it from another run's config.yaml or train the run again.")
    kwargs = (config.get("model") or {}).get("kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise LandscapeError(f"{path} is damaged: its model.kwargs is {kwargs!r}, not a mapping of arguments; restore "
                             "it from another run's config.yaml or train the run again.")
    for key in ("seed", "epochs", "batch_size"):
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not
                                  (-(2 ** 63) if key == "seed" else 1) <= value < 2 ** 63):
            raise LandscapeError(f"{path} is damaged: its {key} is {value!r}, not a whole number a run can have; "
                                 "restore it from another run's config.yaml or train the run again.")


def describe_path(path: str | os.PathLike) -> list[tuple[str, list[dict[str, Any]]]]:
    """What ``landscape inspect`` shows: titled tables for a checkpoint file or a run directory."""
    path = Path(path)
    if not path.exists():
        from landscape.io import dangling

        raise CheckpointError(f"{path} does not exist{dangling(path)}; give a checkpoint file or a run directory.")
    from landscape.io import refuse_special

    refuse_special(path, "a checkpoint file or a run directory", error=CheckpointError)
    if path.is_file() and path.suffix == ".nc":
        return _results_tables(path)
    if path.is_file():
        info = read_checkpoint_info(path)
        return [(f"checkpoint {path}", [_checkpoint_row(info)]), *_metrics_table(info.metrics)]
    run = Run.open(path)
    infos = run.checkpoints()
    config = run.load_config()
    model = (config.get("model") or {}).get("name") or (infos[-1].model if infos else "-")
    data = (config.get("data") or {}).get("name", "-")
    header = [{
        "run": str(path),
        "model": model,
        "data": data,
        "checkpoints": len(infos),
        "params": infos[-1].num_params if infos else "-",
        "metrics rows": len(run.read_metrics()),
        "analyses": ", ".join(sorted(p.stem for p in run.analysis_dir.glob("*.nc"))) or "-",
    }]
    tables = [(f"run {path}", header)]
    if infos:
        tables.append(("checkpoints", [_checkpoint_row(i) for i in infos]))
    return tables


def _results_tables(path: Path) -> list[tuple[str, list[dict[str, Any]]]]:
    """An analysis results file: its kind, settings and checkpoints, and its variables with their units."""
    import json

    from landscape.analyses.results import read_results

    ds = read_results(path)
    try:
        settings = json.loads(ds.attrs.get("settings") or "{}")
    except (TypeError, ValueError, RecursionError):
        settings = {}
    checkpoints = [str(c) for c in ds["checkpoint"].values] if "checkpoint" in ds.dims else []
    header = [{"results": str(path), "analysis": ds.attrs.get("analysis", "-"),
               "checkpoints": (", ".join(checkpoints) if len(checkpoints) <= 3 else
                               f"{len(checkpoints)} ({checkpoints[0]} ... {checkpoints[-1]})") or "-",
               "settings": ", ".join(f"{k}={v}" for k, v in settings.items()) if isinstance(settings, dict) else "-"}]
    variables = [{"variable": name, "dims": ", ".join(map(str, var.dims)) or "-",
                  "units": var.attrs.get("units", "-"), "long_name": var.attrs.get("long_name", "-")}
                 for name, var in ds.data_vars.items()]
    return [(f"results {path} (open with xarray.open_dataset)", header), ("variables", variables)]


def _checkpoint_row(info: CheckpointInfo) -> dict[str, Any]:
    sizes = dict(info.model_kwargs)
    row: dict[str, Any] = {
        "name": info.path.name,
        # the registered builder and every argument it was called with, so that the call builds this network (an
        # import of a 2-block ViT is built by vit_base_patch16_224 with depth=2; mlp_ratio, group_size, mlp_init
        # tell variants apart: the name alone would describe another model)
        "model": info.model + (f"({', '.join(f'{k}={v!r}' for k, v in sizes.items())})" if sizes else ""),
        "epoch": info.epoch,
        "step": info.step,
        "params": info.num_params,
        "ema": "yes" if info.has_ema else "no",
    }
    for key in ("val_top1", "ema_val_top1", "val_loss"):
        if key in info.metrics:
            row[key] = info.metrics[key]
    return row


def _metrics_table(metrics: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    if not metrics:
        return []
    return [("metrics at save time", [{"metric": k, "value": v} for k, v in metrics.items()])]

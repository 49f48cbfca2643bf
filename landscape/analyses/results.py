"""Analysis results on disk: one xarray Dataset per analysis and run, grown one checkpoint at a time.

``RUN/analysis/<name>.nc`` (netCDF4 written with h5netcdf; ``xarray.open_dataset(path)`` opens it) holds every
analysed checkpoint along the ``checkpoint`` dimension, whose coordinate is the checkpoint's name
(``epoch-0010``), with the coordinates ``epoch`` (float; NaN for a checkpoint saved between epochs) and
``step`` (int) on the same dimension, sorted by step. Its attributes record

- ``analysis``: the analysis name; ``settings``: the settings that determine the numbers, as JSON;
  ``seed``: the seed;
- ``library_versions``: JSON of the versions of landscape, torch, timm, numpy, scipy and xarray;
  ``created`` / ``updated``: UTC times; ``host``: the machine's name.

Every attribute is a string or a number (dicts are JSON-encoded), as netCDF requires.

Resuming. :class:`AnalysisResults` writes the whole file again after each finished checkpoint (temporary file,
fsync, rename), so a crash loses at most the checkpoint in progress and never leaves a half-written file.
Several analyses of one run may compute at once: each append takes the lock of the ``analysis/`` folder, reads
the file again and merges its entry into what is there, so no process's checkpoints are lost; while an analysis
holds its file open, no ``landscape train`` may write the run (:mod:`landscape.io`).
Checkpoints already in the file are skipped on a re-run. A file made with other settings is refused (the
numbers would not be comparable) unless ``force``, which recomputes: it drops every entry made with other
settings, and recomputes the selected checkpoints even when settings agree.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import xarray as xr

from landscape.io import RunLock, atomic_write_bytes, exclusive_file_lock, remove_stale_temporaries, special_file
from landscape.errors import LandscapeError

ENGINE = "h5netcdf"
CHECKPOINT_DIM = "checkpoint"


# -- attributes ---------------------------------------------------------------------------------------------------
def library_versions() -> dict[str, str]:
    """The versions of the libraries that shape the numbers."""
    import importlib.metadata as md

    import scipy
    import torch

    from landscape.version import __version__

    versions = {
        "landscape": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "xarray": xr.__version__,
    }
    for name in ("timm", "h5netcdf"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _json_value(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def settings_json(settings: Mapping[str, Any]) -> str:
    """Settings as canonical JSON (sorted keys), the form stored and compared."""
    return json.dumps(dict(settings), sort_keys=True, default=_json_value)


def netcdf_attrs(attrs: Mapping[str, Any]) -> dict[str, str | int | float]:
    """Make attributes netCDF-safe: strings and numbers as they are, booleans as 0/1, ``None`` as ``""``,
    anything else (dicts, lists) as JSON."""
    out: dict[str, str | int | float] = {}
    for key, value in attrs.items():
        if isinstance(value, bool) or isinstance(value, np.bool_):
            out[key] = int(value)
        elif isinstance(value, (int, np.integer)):
            out[key] = int(value)
        elif isinstance(value, (float, np.floating)):
            out[key] = float(value)
        elif isinstance(value, str):
            out[key] = value
        elif value is None:
            out[key] = ""
        else:
            out[key] = json.dumps(value, sort_keys=True, default=_json_value)
    return out


def analysis_attrs(name: str, settings: Mapping[str, Any], seed: int) -> dict[str, str | int | float]:
    """The attributes of an analysis file: name, settings (JSON), seed, library versions, time and host."""
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return netcdf_attrs({
        "analysis": name,
        "settings": settings_json(settings),
        "seed": int(seed),
        "library_versions": library_versions(),
        "created": now,
        "updated": now,
        "host": socket.gethostname(),
    })


# -- where a result lives ----------------------------------------------------------------------------------------
def results_name(kind: str, settings: Mapping[str, Any]) -> str:
    """The results file name (without ``.nc``) of analysis ``kind`` with ``settings``.

    Settings that make a different measurement of the same kind get a file of their own, so that they live side
    by side in one run instead of replacing each other: ``-density`` (a Hessian with only the spectral density),
    ``-ggn``/``-fisher``/``-empirical-fisher`` (another curvature matrix), ``-per-batch-N`` (with per-batch eigenvalues),
    ``-adaptive`` (adaptive sharpness), ``-ema`` (the EMA weights), ``-params-<slug>`` (a ``--params`` pattern).
    The default settings keep the plain name (``hessian``, ``sharpness``, ``surface-random-2d``). ``kind`` may
    carry its own distinctions already (``surface-random-2d``). The name only keeps results apart; what a file
    holds is read from its attributes (:func:`landscape.summary.gather_results`).
    """
    name = kind
    if kind == "hessian" and settings.get("density") and not settings.get("top_k") and not settings.get("trace"):
        name += "-density"
    if settings.get("matrix", "hessian") != "hessian":
        name += f"-{settings['matrix']}"
    if settings.get("per_batch"):
        name += f"-per-batch-{int(settings['per_batch'])}"
    if settings.get("adaptive"):
        name += "-adaptive"
    if settings.get("weights", "raw") != "raw":
        name += f"-{settings['weights']}"
    if settings.get("params"):
        name += f"-params-{_slug(str(settings['params']))}"
    return name


def _slug(text: str) -> str:
    """``text`` reduced to lower-case letters, digits and single dashes (at most 40 characters)."""
    import re

    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40].strip("-")
    return slug or "pattern"


def results_path(run: Any, kind: str, settings: Mapping[str, Any]) -> Path:
    """``RUN/analysis/<results_name(kind, settings)>.nc``."""
    return Path(run.analysis_path(results_name(kind, settings)))


# -- reading ------------------------------------------------------------------------------------------------------
def read_results(path: str | os.PathLike) -> xr.Dataset | None:
    """The Dataset stored at ``path``, loaded into memory (the file is closed again), or ``None`` if absent."""
    from landscape.io import dangling, refuse_special

    path = Path(path)
    if not path.exists():
        if dangling(path):  # read as absent, its results would be left out without a word
            raise LandscapeError(f"{path} is there but cannot be read{dangling(path)}; remove the link, or "
                                 "recompute the results with landscape analyze ... --force.")
        return None
    refuse_special(path, "an analysis file", advice="delete it")
    try:
        _refuse_external_storage(path)
        with xr.open_dataset(path, engine=ENGINE) as ds:
            return ds.load()
    except LandscapeError:
        raise
    except Exception as e:  # h5py/h5netcdf raise several types for a damaged file
        raise LandscapeError(
            f"{path} is not a readable analysis file ({type(e).__name__}); delete it, or recompute it with "
            "landscape analyze ... --force."
        ) from None


def _refuse_external_storage(path: Path) -> None:
    """Refuse an HDF5 file whose variables keep their data in other files (HDF5 external storage): no analysis
    writes one, and reading it opens whatever they name (a pipe blocked every reader forever)."""
    import h5py

    with h5py.File(path, "r") as f:
        found: list[str] = []
        f.visititems(lambda name, item: found.append(name) if isinstance(item, h5py.Dataset) and item.external
                     else None)
    if found:
        raise LandscapeError(f"{path} keeps its {found[0]!r} in other files (HDF5 external storage), which no "
                             "analysis writes; delete it, or recompute it with landscape analyze ... --force.")


def finished_checkpoints(path: str | os.PathLike) -> list[str]:
    """Names of the checkpoints already in the file at ``path`` (empty when there is none)."""
    ds = read_results(path)
    if ds is None or CHECKPOINT_DIM not in ds.dims:
        return []
    return [str(c) for c in ds[CHECKPOINT_DIM].values]


def checkpoint_entry(ds: xr.Dataset, *, name: str, epoch: int | None, step: int) -> xr.Dataset:
    """Give a one-checkpoint Dataset the ``checkpoint`` dimension and its ``epoch``/``step`` coordinates."""
    ds = ds.expand_dims({CHECKPOINT_DIM: [name]})
    return ds.assign_coords(
        epoch=(CHECKPOINT_DIM, np.array([np.nan if epoch is None else float(epoch)])),
        step=(CHECKPOINT_DIM, np.array([int(step)], dtype=np.int64)),
    )


def combine_checkpoints(datasets: list[xr.Dataset]) -> xr.Dataset:
    """Concatenate per-checkpoint Datasets along ``checkpoint`` (later entries replace earlier ones of the same
    name), sorted by step; dimensions of different lengths are padded with NaN."""
    if not datasets:
        raise ValueError("nothing to combine")
    # Names as Python strings: a coordinate read from a file is fixed-width ('<U10') and would cut longer ones.
    datasets = [ds.assign_coords({CHECKPOINT_DIM: np.array([str(n) for n in ds[CHECKPOINT_DIM].values], dtype=object)})
                for ds in datasets]
    first_seen = list(dict.fromkeys(str(n) for ds in datasets for n in ds[CHECKPOINT_DIM].values))
    # each dataset contributes the checkpoints no later entry replaces, as one piece (not one piece per checkpoint:
    # appending to a long series then costs one concatenation of two pieces, not one per checkpoint)
    pieces, taken = [], set()
    for ds in reversed(datasets):
        names = [str(n) for n in ds[CHECKPOINT_DIM].values]
        keep = []
        for i in reversed(range(len(names))):
            if names[i] not in taken:
                keep.append(i)
                taken.add(names[i])
        if keep:
            pieces.append(ds.isel({CHECKPOINT_DIM: keep[::-1]}))
    # in the order of their first-seen checkpoints: attributes come from the first piece that has them, which is then
    # the entry of the first-seen checkpoint that has them, as when every checkpoint was a piece of its own
    first = {name: i for i, name in enumerate(first_seen)}
    pieces.sort(key=lambda piece: min(first[str(n)] for n in piece[CHECKPOINT_DIM].values))
    combined = xr.concat(pieces, dim=CHECKPOINT_DIM, join="outer", data_vars="all", coords="different",
                         compat="equals", combine_attrs="override")
    position = {str(n): i for i, n in enumerate(combined[CHECKPOINT_DIM].values)}
    combined = combined.isel({CHECKPOINT_DIM: [position[n] for n in first_seen]})  # in order of first appearance
    order = np.argsort(combined["step"].values, kind="stable")
    return combined.isel({CHECKPOINT_DIM: order})


def stored_path(path: Path, run: Path) -> str:
    """``path`` as a results file's settings record it: resolved, relative to ``run``'s resolved folder, with ``/``
    separators (``../runB/checkpoints/epoch-0010.safetensors``), so that runs moved together keep their meaning."""
    return Path(os.path.relpath(Path(path).resolve(), Path(run).resolve())).as_posix()


def stored_path_file(stored: str, run: Path) -> Path:
    """The file a path of :func:`stored_path` names, for the run in ``run`` (an absolute stored path as it is)."""
    return Path(os.path.normpath(Path(run).resolve() / stored))


def netcdf_bytes(ds: xr.Dataset) -> bytes:
    """``ds`` as the bytes of a netCDF4 file (h5netcdf), its attributes made netCDF-safe.

    The file is built in memory and written by Python afterwards: h5py, when the disk fills under it, prints pages
    of errors and can crash the process, while a plain write fails with one ``OSError``."""
    ds = ds.copy()
    ds.attrs = netcdf_attrs(ds.attrs)
    for var in ds.variables.values():
        var.attrs = netcdf_attrs(var.attrs)
    return bytes(ds.to_netcdf(engine=ENGINE))


def write_results(ds: xr.Dataset, path: str | os.PathLike) -> None:
    """Write ``ds`` to ``path`` atomically (netCDF4 via h5netcdf); a full disk or a read-only folder is one
    :class:`~landscape.io.WriteError` sentence and leaves the previous file as it was."""
    atomic_write_bytes(Path(path), netcdf_bytes(ds))


# -- the resumable file -------------------------------------------------------------------------------------------
def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """``(inode, size, mtime in ns)`` of the file at ``path`` (``None`` when there is none): every write of a results
    file replaces it (:func:`write_results` renames a new file over it), so a changed file has a new signature."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _stored_seed(attrs: Mapping[str, Any]) -> int | None:
    """A results file's ``seed`` attribute as a whole number (``None`` when absent or damaged)."""
    try:
        seed = attrs["seed"]
        return int(seed) if float(seed) == int(seed) else None
    except (KeyError, TypeError, ValueError, OverflowError):
        return None


class AnalysisResults:
    """The results file of one analysis of one run, appended one finished checkpoint at a time.

    ``settings`` are the values that determine the numbers (not which checkpoints are selected, nor the
    device). Opening refuses an existing file made with other settings, naming the differences, unless
    ``force``; see the module notes for what ``force`` recomputes.
    """

    def __init__(self, path: str | os.PathLike, name: str, settings: Mapping[str, Any], seed: int, *,
                 force: bool = False):
        self.path = Path(path)
        self.name = name
        self.settings = dict(settings)
        self.seed = int(seed)
        self.force = force
        self.attrs = analysis_attrs(name, self.settings, self.seed)
        self._seen = _file_signature(self.path)  # taken before the read: a write in between only costs a re-read
        try:
            self.dataset: xr.Dataset | None = read_results(self.path)
        except LandscapeError:
            if not force or special_file(self.path) is not None:
                raise
            self.dataset = None  # damaged: --force replaces it with these results at the first write
        kind = self.dataset.attrs.get("analysis") if self.dataset is not None else name
        if kind != name and not force:
            raise LandscapeError(f"{self.path} is not a landscape {name} results file (its 'analysis' attribute is "
                                 f"{kind!r}); move it away, or add --force to replace it with these results.")
        if self.dataset is not None and not self._same_settings(self.dataset.attrs):
            if not force:
                raise LandscapeError(
                    f"{self.path} was computed with other settings ({self._differences(self.dataset.attrs)}); "
                    "rerun with the same settings to continue it, or add --force to recompute it with the new ones."
                )
            self.dataset = None
        if self.dataset is not None:
            self.attrs["created"] = self.dataset.attrs.get("created", self.attrs["created"])
        self._recomputed: set[str] = set()
        # A file in a run's analysis/ folder: no training may write the run meanwhile (other analyses may).
        self._run_lock = RunLock(self.path.parent.parent, shared=True) if self.path.parent.name == "analysis" else None
        remove_stale_temporaries(self.path.parent)

    def _same_settings(self, attrs: Mapping[str, Any]) -> bool:
        stored = attrs.get("settings")
        return isinstance(stored, str) and stored == settings_json(self.settings) and _stored_seed(attrs) == self.seed

    def _differences(self, attrs: Mapping[str, Any]) -> str:
        try:
            stored = json.loads(attrs.get("settings", "{}"))
            stored = stored if isinstance(stored, dict) else {}
        except (TypeError, ValueError, RecursionError):
            stored = {}
        stored["seed"] = _stored_seed(attrs)
        current = json.loads(settings_json(self.settings))
        current["seed"] = self.seed
        keys = sorted(set(stored) | set(current))
        diffs = [f"{k} {stored.get(k)!r} there vs {current.get(k)!r} now" for k in keys if stored.get(k) != current.get(k)]
        return "; ".join(diffs[:6]) or "unreadable settings"

    @property
    def finished(self) -> list[str]:
        """Checkpoints in the file that this run keeps (with ``force``, those recomputed in this session)."""
        if self.dataset is None:
            return []
        names = [str(c) for c in self.dataset[CHECKPOINT_DIM].values]
        return [n for n in names if not self.force or n in self._recomputed]

    def is_finished(self, checkpoint_name: str) -> bool:
        return checkpoint_name in self.finished

    def revise(self, change: Any) -> xr.Dataset | None:
        """Rewrite the file as ``change(dataset)`` returns it (``None``: as it is), under the lock of
        :meth:`append`, from the file as it is on disk then (other processes may have appended meanwhile)."""
        with exclusive_file_lock(self.path.parent):
            on_disk = read_results(self.path)
            if on_disk is None or not self._same_settings(on_disk.attrs):
                return self.dataset
            revised = change(on_disk)
            if revised is not None:
                revised.attrs = dict(on_disk.attrs)
                revised.attrs["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
                write_results(revised, self.path)
                self._seen = _file_signature(self.path)
                on_disk = revised
        self.dataset = on_disk
        return on_disk

    def append(self, entry: xr.Dataset, *, name: str, epoch: int | None, step: int) -> xr.Dataset:
        """Add one checkpoint's results (a Dataset without the ``checkpoint`` dimension) and write the file."""
        new = checkpoint_entry(entry, name=name, epoch=epoch, step=step)
        with exclusive_file_lock(self.path.parent):
            # Another analysis of the same run may have appended since this one read the file: merge, don't replace.
            base = self.dataset
            unchanged = self._seen is not None and _file_signature(self.path) == self._seen
            on_disk = None if unchanged else read_results(self.path)  # as this process left it: nothing to merge
            if on_disk is not None and self._same_settings(on_disk.attrs):
                base = on_disk if base is None else combine_checkpoints([base, on_disk])
            elif on_disk is not None:  # --force replaces the file this process found, never one another process
                # wrote since (two --force analyses with other settings: the last writer won without a word)
                advice = ("wait for that process to finish, then rerun with --force to replace it with these" if
                          self.force else "rerun with the file's settings to add to it, or with --force to replace "
                          "it with these")
                raise LandscapeError(
                    f"{self.path} was written with other settings by another process while this analysis ran "
                    f"({self._differences(on_disk.attrs)}); it was left as that process wrote it and this analysis's "
                    f"results were not saved: {advice}."
                )
            combined = new if base is None else combine_checkpoints([base, new])
            self.attrs["updated"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            combined.attrs = dict(self.attrs)
            write_results(combined, self.path)
            self._seen = _file_signature(self.path)
        self.dataset = combined
        self._recomputed.add(name)
        return combined


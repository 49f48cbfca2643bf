"""The ``landscape`` command line. Thin: parse, call one library function, print.

Any :class:`~landscape.errors.LandscapeError` becomes one sentence on stderr and exit code 1; click's own
usage errors exit with 2. Nothing here computes anything.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import click

from landscape.version import __version__
from landscape.errors import LandscapeError

def _data_dir(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    """A data folder that is not a file; named as the environment variable when it came from there."""
    if value is not None and value.exists() and not value.is_dir():
        source = ctx.get_parameter_source(param.name)
        given = ("LANDSCAPE_DATA_DIR" if source == click.core.ParameterSource.ENVIRONMENT else "--data-dir")
        raise click.BadParameter(f"{value} is a file, not a folder of datasets.", ctx=ctx,
                                 param_hint=f"'{given}'")
    return value


DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    envvar="LANDSCAPE_DATA_DIR",
    default=None,
    callback=_data_dir,
    help="Folder holding the datasets' official files (default: $LANDSCAPE_DATA_DIR).",
)

LOG_OPTION = click.option(
    "--log", "log", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
    help="Also send the scalars to TensorBoard (event files in the run directory: tensorboard --logdir runs/) or "
         "W&B (repeatable).",
)


def check_log(log: tuple[str, ...]) -> None:
    """Refuse an unavailable tracker before any work is done."""
    from landscape.tracking import check_backends

    check_backends(log)


def _log_results(run_dir, log: tuple[str, ...], ds, path: Path, selected: set[str]) -> None:
    """Send the scalars of the selected checkpoints of ``ds`` (results file ``path``) to the ``log`` trackers."""
    from landscape.tracking import ScalarLogger

    tracker = ScalarLogger(run_dir.root, log, suffix=Path(path).stem)
    try:
        tracker.log_results(ds, Path(path).stem, selected)
    finally:
        tracker.close()


def EVALUATION_DATA_OPTIONS(f):
    """--data, --img-size and --classes of an analysis: passed on as the settings' dataset, img_size, classes."""
    f = click.option("--classes", type=click.IntRange(min=1), default=None,
                     help="Classes of --data synthetic [default: the model's].")(f)
    f = click.option("--img-size", type=click.IntRange(min=1), default=None,
                     help="Image side the data is resized to [default: the run's; synthetic: the model's].")(f)
    return click.option("--data", "dataset", default=None, metavar="NAME",
                        help="Dataset to evaluate on [default: the run's]; synthetic needs no files and takes the "
                             "model's shape.")(f)


_ONE_SET_OPTIONS = {
    "rhos": "several radii go in one, comma-separated: --rho 0.01,0.05",
    "checkpoints": "several go in one: epochs:1,10,50 or steps:100,200",
    "params": "several patterns go in one, comma-separated: '*attn*,*mlp*'",
}
"""Options whose value is a set (radii, checkpoints, parameters), with how to ask for several: given twice, the
second reads as "these too", but click keeps only the last."""


class LandscapeCommand(click.Command):
    """A click command that refuses an option of :data:`_ONE_SET_OPTIONS` given twice (``--rho 0.01 --rho 0.05``
    would measure 0.05 alone without a word); other options keep click's rule, the last one counts (a script's
    common options followed by an override)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not ctx.resilient_parsing and not set(args) & set(ctx.help_option_names):  # --help still helps
            opts, _, order = self.make_parser(ctx).parse_args(args=list(args))
            names = [p.name for p in order if isinstance(p, click.Option) and p.name in _ONE_SET_OPTIONS]
            for param in order:
                if isinstance(param, click.Option) and param.name in _ONE_SET_OPTIONS and names.count(param.name) > 1:
                    raise click.UsageError(f"{max(param.opts, key=len)} was given more than once, and only the last "
                                           f"would count; {_ONE_SET_OPTIONS[param.name]}.", ctx)
            for param in self.params:  # '' is the current folder to pathlib: `--out "$OUT"` with OUT unset wrote there
                given = opts.get(param.name)
                values = given if isinstance(given, (list, tuple)) else [given]
                if not isinstance(param.type, click.Path):
                    continue
                what = max(param.opts, key=len) if isinstance(param, click.Option) else param.human_readable_name
                if any(isinstance(v, str) and not v.strip() for v in values):
                    raise click.UsageError(f"{what} is empty; give a path ('.' for the current folder).", ctx)
                folder = next((v for v in values if isinstance(v, str) and v.endswith(("/", os.sep))), None)
                if folder is not None and not param.type.dir_okay:  # `--out results/` wrote a file named results
                    default = param.default if isinstance(param.default, (str, os.PathLike)) else None
                    example = f", e.g. {folder}{Path(default).name}" if default else ""
                    raise click.UsageError(f"{what} {folder} names a folder (it ends with '/'), and {what} is a file; "
                                           f"give a file name{example}.", ctx)
        return super().parse_args(ctx, args)


class LandscapeGroup(click.Group):
    """A click group that turns user errors into one sentence and a non-zero exit, with no traceback."""

    command_class = LandscapeCommand
    group_class = type  # subgroups are LandscapeGroups too

    def invoke(self, ctx: click.Context):
        import warnings

        # torch registers its forward-mode rules through torch.jit.script on first use and warns that it is
        # deprecated: nothing a user of these commands can act on
        warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
        try:
            return super().invoke(ctx)
        except LandscapeError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)
        except ImportError as e:  # a library that cannot be loaded here (a memory limit below torch's, a broken install)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
            click.echo(f"Error: a library could not be loaded ({reason}); a memory limit (ulimit -v) below what torch "
                       "maps, or a damaged installation: raise the limit or reinstall.", err=True)
            ctx.exit(1)
        except MemoryError:  # the machine's memory, not a bug: what was asked does not fit
            click.echo("Error: the machine ran out of memory; ask for less (fewer --samples, a smaller --batch-size "
                       "or --img-size, a smaller model); everything saved before stays as it was.", err=True)
            ctx.exit(1)
        except RuntimeError as e:
            if "can't allocate memory" not in str(e) and "out of memory" not in str(e).lower():
                raise
            click.echo("Error: the machine ran out of memory (torch could not allocate a tensor); ask for less "
                       "(fewer --samples, a smaller --batch-size or --img-size, a smaller model); everything saved "
                       "before stays as it was.", err=True)
            ctx.exit(1)
        except BrokenPipeError:  # the reader of the output left (`landscape inspect RUN | head`): nothing to say,
            # and nobody to say it to; exit as a program killed by SIGPIPE does, with stdout closed quietly
            try:
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            except OSError:
                pass
            ctx.exit(128 + signal.SIGPIPE)
        except OSError as e:  # the machine's failures that no write path caught: still one sentence, no traceback
            from landscape.io import describe_os_error

            where = f" on {e.filename}" if getattr(e, "filename", None) else ""
            click.echo(f"Error: the operating system refused an operation{where} ({describe_os_error(e)}).", err=True)
            ctx.exit(1)
        except KeyboardInterrupt as e:  # Ctrl-C, SIGTERM, a closed terminal: every write is atomic, so what
            # was saved stays whole
            then = "running the same command again continues from there"
            if ctx.invoked_subcommand == "train":
                made = _TRAINING_INTO is not None and (_TRAINING_INTO / "state" / "last.pt").is_file()
                then = ("continue the run with landscape train --resume RUN" if made else
                        "no training state was saved yet, so run the same command again")
            signum = getattr(e, "signum", signal.SIGINT)
            what = "Interrupted" if signum == signal.SIGINT else f"Stopped by {signal.Signals(signum).name}"
            try:
                click.echo(f"\n{what}: everything saved before stays as it was; {then}.", err=True)
            except OSError:  # the terminal that would show it is gone (SIGHUP)
                pass
            ctx.exit(128 + signum)


_TRAINING_INTO: Path | None = None
"""The run folder `landscape train` is writing, once known: an interrupt's advice depends on whether it holds a run."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the program is, so that it ends as Ctrl-C does: the write under way is
    abandoned whole (writes are atomic), locks are released, and one sentence says so."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> list[int]:
    """Turn SIGTERM and SIGHUP into :class:`Stopped` in this process (where they still have their default action:
    a worker pool or a caller that set its own handler keeps it); returns the signals it took."""
    def stop(signum, frame):
        raise Stopped(signum)

    taken = []
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, stop)
            taken.append(sig)
    return taken


@click.group(cls=LandscapeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Train Vision Transformer variants with dense checkpoints and measure the geometry of their loss landscape."""


def _count(n: int, noun: str) -> str:
    """``1 seed``, ``2 seeds``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print dicts as an aligned plain-text table: ``columns``, or every key of the rows in the order first seen
    (a note only some rows carry, such as "worst case still rising", is a column)."""
    if not rows:
        return
    columns = columns or list(dict.fromkeys(key for row in rows for key in row))
    cells = [[str(c) for c in columns]] + [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    for n, row in enumerate(cells):
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
        if n == 0:
            click.echo("  ".join("-" * w for w in widths))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if value is None:
        return "-"
    return str(value)


# -- data ---------------------------------------------------------------------------------------------------
@cli.command()
@DATA_DIR_OPTION
@click.option("--download", "download", metavar="NAME", default=None,
              help="Fetch the official files of dataset NAME (mnist, fashion-mnist, cifar10, cifar100) into the data "
                   "folder, checking their published checksums.")
def datasets(data_dir: Path | None, download: str | None) -> None:
    """List the datasets, whether their files are found, and their sizes."""
    from landscape.data import dataset_status, download_dataset

    if download is not None:
        if data_dir is None:
            raise LandscapeError("--download needs a data folder: give --data-dir DIR or set LANDSCAPE_DATA_DIR.")
        click.echo(f"downloaded {download} into {download_dataset(download, data_dir)}")
    print_table(dataset_status(data_dir))


# -- runs and checkpoints -------------------------------------------------------------------------------------
@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
def inspect(path: Path) -> None:
    """Show a checkpoint or a run: model, epoch/step, parameter count, metrics."""
    from landscape.runs import describe_path

    for title, rows in describe_path(path):
        click.echo(title)
        print_table(rows)
        click.echo("")


# == models: `landscape models` =================================================================================
@cli.command()
@click.argument("names", nargs=-1)
def models(names: tuple[str, ...]) -> None:
    """List the models (or only NAMES): parameters, GMACs at the default input size, unique MLPs."""
    from landscape.models import MACS_CONVENTION, model_table

    print_table(model_table(list(names) or None))
    click.echo("")
    click.echo(MACS_CONVENTION)


# == end models ==


# == training: `landscape train` ================================================================================
def _key_values(pairs: tuple[str, ...]) -> dict:
    from landscape.config import parse_override

    return dict(parse_override(p) for p in pairs)


_RECIPES = sorted(p.stem for p in (Path(__file__).parent / "trainers" / "recipes").glob("*.yaml"))


@cli.command(context_settings={"show_default": True})
@click.option("--recipe", default=None, help=f"{', '.join(_RECIPES)}, or a YAML file (default: digits for digits "
              "or synthetic data, else small-images).")
@click.option("--model", default=None, help="Registered or timm model name (default: the recipe's model).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument of the model (repeatable), e.g. --model-arg depth=6.")
@click.option("--data", default=None, help="Dataset name (default: the recipe's); see 'landscape datasets'.")
@click.option("--img-size", type=int, default=None, help="Image side the data is resized to (default: native).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Run directory to create (default: runs/DATA-MODEL-seedSEED).")
@click.option("--epochs", type=int, default=None, help="Number of epochs.")
@click.option("--batch-size", type=int, default=None, help="Global batch of one update (all processes, all accumulation steps).")
@click.option("--lr", type=float, default=None, help="Peak learning rate.")
@click.option("--seed", type=int, default=None, help="Seed of the initial weights, data order and augmentation.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override any config field (repeatable): lr=1e-3, optim.grad_clip=1, every=log:50, keep=last:5.")
@click.option("--init", type=click.Path(path_type=Path), default=None,
              help="Start from the last checkpoint of this run (or this checkpoint file): fine-tuning.")
@click.option("--resume", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Continue this run from its last saved state, with its saved config.")
@click.option("--extend-to", type=click.IntRange(min=1), default=None, metavar="EPOCHS",
              help="With --resume: train the run (finished or not) up to this many epochs in all. The learning-rate "
                   "schedule is recomputed for the new total from the start and followed from where the run is, so "
                   "only the remaining epochs see the new rates; config.yaml records extended_from and extended_at.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:K (under torchrun: each process's GPU).")
@DATA_DIR_OPTION
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per epoch (on a terminal).")
@LOG_OPTION
def train(recipe, model, model_args, data, img_size, out, epochs, batch_size, lr, seed, overrides, init, resume,
          extend_to, overwrite, device, data_dir, dry_run, progress, log=()) -> None:
    """Train a model with dense checkpoints into a run directory.

    \b
    landscape train --data digits                                   (seconds on a CPU)
    landscape train --model vit_pico_patch4_32 --data fashion-mnist --recipe small-images --set epochs=30
    landscape train --resume runs/NAME                              (after a crash or a kill)
    landscape train --resume runs/NAME --extend-to 200              (more epochs for a finished run)
    torchrun --nproc-per-node 4 -m landscape train --recipe paper-a-imagenet --data-dir /data
    """
    import os

    import yaml

    from landscape.config import to_dict
    from landscape.trainers import build_config, recipe_names, warmup_note
    from landscape.trainers import train as run_training

    main_process = os.environ.get("RANK", "0") == "0"
    if resume is not None:
        given = [name for name, value in [("--recipe", recipe), ("--model", model), ("--model-arg", model_args),
                 ("--data", data), ("--img-size", img_size), ("--out", out), ("--epochs", epochs),
                 ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed), ("--set", overrides),
                 ("--init", init), ("--overwrite", overwrite)] if value]
        if given:
            more = " (for more epochs give --extend-to N)" if epochs or any(
                o.split("=")[0].strip() == "epochs" for o in overrides) else ""
            raise LandscapeError(f"--resume continues a run with the config saved in it; drop {', '.join(given)}{more}.")
        if dry_run:  # the config the resume would train with; the run is not touched
            from landscape.trainers.loop import resumed_config
            from landscape.trainers.distributed import check_device

            config = resumed_config(resume, extend_to, data_dir=data_dir)
            check_device(device, here=False)
            click.echo(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
            _device_note(device, "the run trains")
            return
        config, out = None, resume
    else:
        if extend_to is not None:
            raise LandscapeError("--extend-to raises the epochs of an existing run; give it with --resume RUN.")
        if recipe is None:
            from landscape.trainers.recipes import default_recipe

            recipe = default_recipe(data)
        elif not recipe.strip():
            raise LandscapeError(f"--recipe is empty; give a recipe name ({', '.join(recipe_names())}) or a YAML file.")
        options = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "img_size": img_size}
        extra = {"init": str(init)} if init is not None else {}
        config = build_config(recipe, model=model, model_kwargs=_key_values(model_args), data=data,
                              options=options, overrides={**extra, **_key_values(overrides)})
        if dry_run:
            from landscape.trainers import check_config
            from landscape.trainers.distributed import check_device

            check_config(config)
            check_device(device, here=False)  # a name no machine has is refused; one this machine lacks noted
            click.echo(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
            click.echo(f"# recipes: {', '.join(recipe_names())}")
            if note := warmup_note(config):
                click.echo(f"Note: {note}", err=True)
            _device_note(device, "the run trains")  # a dry run for another machine: the run itself refuses it here
            return
        out = out or Path("runs") / f"{config.data.name}-{config.model.name}-seed{config.seed}"
        if (note := warmup_note(config)) and main_process:
            click.echo(f"Note: {note}", err=True)

    def print_row(row: dict) -> None:
        shown = ["epoch", "step", "train_loss", "val_loss", "val_top1", "ema_val_top1", "lr", "images_per_s"]
        click.echo("  ".join(f"{k} {_fmt(row[k])}" for k in shown if row.get(k) is not None), err=True)

    global _TRAINING_INTO
    _TRAINING_INTO = Path(out)
    result = run_training(config, out, resume=resume is not None, overwrite=overwrite, device=device,
                          data_dir=data_dir, progress=progress, on_row=print_row, extend_to=extend_to, log=log)
    if main_process:
        final = result.final
        keys = ("val_top1", "ema_val_top1") if final.get("val_top1") is not None else ("val_loss",)
        scores = ", ".join(f"{k} {_fmt(final[k])}" for k in keys if final.get(k) is not None) or "no evaluation"
        n = len(result.checkpoints)
        click.echo(f"Run written to {result.run.root} ({n} checkpoint{'s' if n != 1 else ''}; final {scores}).")

# == end training ==


# == analyses: `landscape analyze ...` ==========================================================================
@cli.group(cls=LandscapeGroup)
def analyze() -> None:
    """Measure the loss landscape at a run's checkpoints (results in RUN/analysis/)."""


# -- analyze hessian --
# The options every analyze command shares (each keeps its own place in its command's --help).
def CHECKPOINTS_OPTION(default: str = "all", what: str = "Which checkpoints"):
    return click.option("--checkpoints", default=default, show_default=True,
                        help=f"{what}: all, last, every:N, epochs:1,10,50 or steps:100,200.")


WEIGHTS_OPTION = click.option("--weights", type=click.Choice(["raw", "ema"]), default="raw", show_default=True,
                              help="Raw or EMA weights of each checkpoint.")
SAMPLES_OPTION = click.option("--samples", type=click.IntRange(min=1), default=512, show_default=True,
                              help="Examples of the training set in the fixed evaluation set.")
DTYPE_OPTION = click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
                            help="Precision of the model and every product (float64: slower, for checks).")
DEVICE_OPTION = click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:K.")


def SEED_OPTION(what: str):
    return click.option("--seed", type=int, default=0, show_default=True, help=f"Seed of the evaluation set and {what}.")


def FORCE_OPTION(files: str | None = None):
    where = f" of these settings ({files})" if files else ""
    return click.option("--force", is_flag=True, help=f"Recompute checkpoints already in the results file{where}.")


def BATCH_SIZE_OPTION(help: str = "Examples per forward pass (memory only)."):
    return click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True, help=help)


def SHARD_OPTION(*modes: str):
    grid = ", or a block of each checkpoint's grid points" if "grid" in modes else ""
    return click.option("--shard", type=click.Choice(list(modes)), default=None,
                        help=f"Under torchrun: each process takes whole checkpoints{grid} [default: each checkpoint's "
                             "evaluation set is split over the processes].")


_EVALUATION_FIELDS = ("samples", "weights", "seed", "dtype", "batch_size", "dataset", "img_size", "classes")


def _evaluation(options: dict) -> dict:
    """Take the shared evaluation settings (samples, weights, seed, dtype, batch size, data) out of ``options``."""
    return {name: options.pop(name) for name in _EVALUATION_FIELDS}


def _analyze(run: Path, analysis, summary, *, checkpoints: str, force: bool, data_dir: Path | None, device: str,
             shard: str | None, log: tuple[str, ...] = (), on_plan=None) -> None:
    """Run ``analysis`` over the checkpoints of ``run``, print ``summary``'s table of the selected ones, send them
    to the ``log`` trackers and say where the results are."""
    from landscape.analyses.driver import analyze
    from landscape.runs import Run

    run_dir = Run.open(run)
    check_log(log)
    from landscape.trainers.distributed import env_int

    if shard is not None and env_int("WORLD_SIZE", 1) <= 1:
        click.echo(f"Note: --shard {shard} shares the work between the processes torchrun starts; in one process "
                   f"it has nothing to share (start it with torchrun --nproc-per-node N).", err=True)
    ds = analyze(run_dir, analysis, checkpoints=checkpoints, force=force, data_dir=data_dir, device=device,
                 progress=sys.stderr.isatty(), shard=shard, on_plan=on_plan)
    if ds is None:  # not the first of several processes: it prints
        return
    selected = {info.name for info in run_dir.select_checkpoints(checkpoints)}
    print_table([row for row in summary(ds) if row["checkpoint"] in selected])
    path = analysis.results_path(run_dir)
    _log_results(run_dir, log, ds, path, selected)
    click.echo(f"Results in {path}")


@analyze.command("hessian")
@click.argument("run", type=click.Path(path_type=Path))
@CHECKPOINTS_OPTION()
@WEIGHTS_OPTION
@click.option("--top-k", type=click.IntRange(min=0), default=5, show_default=True,
              help="Number of extreme eigenvalues (0: none).")
@click.option("--which", type=click.Choice(["largest", "smallest", "both"]), default="largest", show_default=True,
              help="Largest, most negative, or both ends of the spectrum.")
@click.option("--tol", type=click.FloatRange(min=0, min_open=True, max=1), default=1e-3, show_default=True,
              help="Relative accuracy of each eigenvalue (its error bound over its size).")
@click.option("--trace", is_flag=True, help="Estimate the trace, with a standard error (see --trace-method).")
@click.option("--trace-method", type=click.Choice(["lanczos", "hutch++"]), default="lanczos", show_default=True,
              help="lanczos: Hutchinson deflated by the eigenvalues' Krylov basis (Hutch++ with --top-k 0).")
@click.option("--trace-matvecs", type=click.IntRange(min=1, max=100_000), default=99, show_default=True,
              help="Products the trace estimate takes (its error shrinks as one over their square root).")
@click.option("--density", is_flag=True, help="Estimate the spectral density (stochastic Lanczos quadrature).")
@click.option("--density-probes", type=click.IntRange(min=1, max=100_000), default=4, show_default=True,
              help="Random start vectors of the density, averaged.")
@click.option("--density-steps", type=click.IntRange(min=1, max=100_000), default=80, show_default=True,
              help="Lanczos steps (products) per density probe: the resolution of the density.")
@SAMPLES_OPTION
@click.option("--params", "params", default=None, metavar="PATTERN",
              help="Only these parameters: glob ('*attn*', 'blocks.3.*'), module prefix ('blocks.3') or 're:REGEX'; "
                   "several comma-separated (a comma inside a regex's {} or [] does not cut it).")
@SEED_OPTION("the probes")
@FORCE_OPTION("RUN/analysis/hessian*.nc")
@DTYPE_OPTION
@DEVICE_OPTION
@BATCH_SIZE_OPTION("Examples per forward pass; at least --samples keeps the gradient graph (faster, more memory).")
@click.option("--product", type=click.Choice(["auto", "kept-graph", "double-backward", "forward-over-reverse"]),
              default="auto", show_default=True,
              help="How Hessian-vector products are computed; auto keeps the graph when the samples are one batch.")
@click.option("--matrix", type=click.Choice(["hessian", "ggn", "fisher", "empirical-fisher"]), default="hessian",
              show_default=True,
              help="Curvature matrix: Hessian, generalised Gauss-Newton, true Fisher (equal to the GGN for "
                   "cross-entropy) or empirical Fisher.")
@click.option("--fisher-samples", type=click.IntRange(min=1, max=100_000), default=None,
              help="With --matrix fisher: labels drawn per example from the model [default: exact expectation].")
@click.option("--per-batch", type=click.IntRange(min=1), default=None, metavar="N",
              help="Also the largest eigenvalue on each batch of N examples (Park & Kim 2022).")
@click.option("--save-eigenvectors", is_flag=True,
              help="Also write the eigenvectors to RUN/analysis/hessian-eigenvectors/<checkpoint>.safetensors "
                   "(hessian-ema-eigenvectors/, hessian-ggn-eigenvectors/, ... for other weights, matrices, --params), "
                   "and record the gradient's share in their span and their overlap with the previous checkpoint's.")
@click.option("--per-block", is_flag=True,
              help="Also the top eigenvalue (and with --trace the trace) of the Hessian restricted to each parameter "
                   "group: patch embedding, each block's attention and MLP, norms, head.")
@click.option("--preconditioned", is_flag=True,
              help="Also the sharpness the optimizer sees (Adam: top eigenvalue of P^-1/2 H P^-1/2) against its "
                   "stability threshold; needs a run trained with --set save_preconditioner=true.")
@SHARD_OPTION("checkpoints")
@click.option("--warm/--cold", default=False, show_default=True,
              help="Start each eigensolve from the previous checkpoint's Ritz vectors (the same eigenvalues to --tol; "
                   "fewer products only when checkpoints are very close: benchmarks/series.md) or from random ones.")
@DATA_DIR_OPTION
@EVALUATION_DATA_OPTIONS
@LOG_OPTION
def analyze_hessian(run: Path, top_k: int, which: str, tol: float, trace: bool, trace_method: str, density: bool,
                    params: str | None, product: str, matrix: str, fisher_samples: int | None, per_batch: int | None,
                    save_eigenvectors: bool, per_block: bool = False, preconditioned: bool = False, warm: bool = False,
                    trace_matvecs: int = 99, density_probes: int = 4, density_steps: int = 80, **options) -> None:
    """Top eigenvalues, trace and spectral density of the loss Hessian at each checkpoint.

    \b
    On several GPUs: torchrun --nproc-per-node 8 -m landscape analyze hessian RUN [--shard checkpoints]
    """
    from landscape.analyses.hessian import HessianAnalysis, HessianSettings, describe_plan, hessian_summary

    _refuse_options_without({"--trace": trace, "--density": density}, {
        "trace_method": "--trace", "trace_matvecs": "--trace", "density_probes": "--density",
        "density_steps": "--density"})
    settings = HessianSettings(top_k=top_k, which=which, tol=tol, trace=trace, trace_method=trace_method,
                               trace_matvecs=trace_matvecs, density=density, density_probes=density_probes,
                               density_steps=density_steps, params=params, product=product, matrix=matrix,
                               fisher_samples=fisher_samples, per_batch=per_batch, per_block=per_block,
                               preconditioned=preconditioned, **_evaluation(options))
    analysis = HessianAnalysis(settings, save_eigenvectors=save_eigenvectors, warm_start=warm)
    _analyze(run, analysis, hessian_summary, **options,
             on_plan=lambda n: click.echo(describe_plan(settings, n, warm_start=warm, groups=analysis.groups,
                                                             parameters=analysis.parameters)))
# -- end analyze hessian --


def _refuse_options_without(flags: dict[str, bool], needs: dict[str, str]) -> None:
    """Refuse an option given on the command line whose flag is off (``needs`` maps a parameter to the flag it
    shapes; ``flags`` says which flags are on): ``--trace-matvecs 500`` without ``--trace`` measured no trace
    without a word."""
    ctx = click.get_current_context()
    for name, flag in needs.items():
        if not flags[flag] and ctx.get_parameter_source(name) not in (None, click.core.ParameterSource.DEFAULT):
            option = "--" + name.replace("_", "-")
            raise click.UsageError(f"{option} shapes the estimate {flag} asks for, and {flag} was not given: add "
                                   f"{flag}, or leave {option} out.", ctx)

# -- analyze sharpness / surface --
def _float_list(ctx, param, value: str) -> tuple[float, ...]:
    try:
        parts = value.replace(" ", "").split(",")
        if len(parts) > 1 and "" in parts:  # "0.1,,0.2": a value left out by mistake
            raise ValueError
        values = tuple(float(v) for v in parts if v)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of numbers, e.g. 0.01,0.05,0.1.") from None
    if not values:
        raise click.BadParameter("give at least one radius, e.g. 0.05.")
    return values


@analyze.command("sharpness")
@click.argument("run", type=click.Path(path_type=Path))
@CHECKPOINTS_OPTION()
@click.option("--rho", "rhos", default="0.01,0.05,0.1", show_default=True, callback=_float_list,
              help="Radii, comma-separated; all measured in one call.")
@click.option("--p", "p", type=click.Choice(["2", "inf"]), default="2", show_default=True,
              help="Norm of the neighbourhood ||delta / c||_p <= rho.")
@click.option("--adaptive", is_flag=True, help="Adaptive sharpness: c = |w| + eta instead of c = 1 (SAM).")
@click.option("--eta", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="eta of the adaptive scale (0 keeps it invariant to neuron-wise rescaling).")
@click.option("--steps", type=click.IntRange(min=1), default=40, show_default=True,
              help="Points (one gradient each) of the worst-case search: for p=2 half secant-Lanczos model, half "
                   "Auto-PGD; for inf Auto-PGD. 40 reach 99% of the maximum on test quadratics; 1: SAM's step alone.")
@click.option("--restarts", type=click.IntRange(min=0), default=0, show_default=True,
              help="Further Auto-PGD runs of --steps points each from random points of the ball.")
@click.option("--random-start", is_flag=True, help="Start Auto-PGD from a random point of the ball.")
@click.option("--m", "m", type=click.IntRange(min=1), default=None,
              help="Also m-sharpness: the worst case per batch of m examples, averaged.")
@click.option("--draws", type=click.IntRange(min=0), default=10, show_default=True,
              help="Antithetic Gaussian pairs of the average-case sharpness (0: skip it).")
@SAMPLES_OPTION
@WEIGHTS_OPTION
@click.option("--params", "params", default=None, metavar="PATTERN",
              help="Only perturb these parameters: glob ('*attn*'), module prefix ('blocks.3') or 're:REGEX'; several "
                   "comma-separated (a comma inside a regex's {} or [] does not cut it).")
@SEED_OPTION("the draws")
@FORCE_OPTION("RUN/analysis/sharpness*.nc")
@DTYPE_OPTION
@BATCH_SIZE_OPTION()
@DEVICE_OPTION
@SHARD_OPTION("checkpoints")
@DATA_DIR_OPTION
@EVALUATION_DATA_OPTIONS
@LOG_OPTION
def analyze_sharpness(run: Path, rhos: tuple[float, ...], p: str, adaptive: bool, eta: float, steps: int,
                      restarts: int, random_start: bool, m: int | None, draws: int, params: str | None,
                      **options) -> None:
    """Worst-case (SAM or adaptive), m-, average-case and first-order sharpness at each checkpoint.

    \b
    On several GPUs: torchrun --nproc-per-node 8 -m landscape analyze sharpness RUN [--shard checkpoints]
    """
    from landscape.analyses.sharpness import SharpnessAnalysis, SharpnessSettings, sharpness_summary

    settings = SharpnessSettings(rhos=rhos, p=p, adaptive=adaptive, eta=eta, steps=steps, restarts=restarts,
                                 random_start=random_start, m=m, draws=draws, params=params, **_evaluation(options))
    _analyze(run, SharpnessAnalysis(settings), sharpness_summary, **options)


@analyze.command("surface")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--directions", default="random", show_default=True,
              help="random, interpolate:RUN2[@EPOCH], plane:RUN2,RUN3, pca or eigen.")
@click.option("--dims", type=click.Choice(["1", "2"]), default=None,
              help="1D or 2D slice [default: 1 for interpolate, else 2].")
@click.option("--range", "value_range", default=None, metavar="START:STOP",
              help="Grid range in direction units [default: -1:1; 0:1 for interpolate; -0.5:1.5 for plane].")
@click.option("--points", type=click.IntRange(min=2, max=10_001), default=51, show_default=True, help="Grid points per axis.")
@CHECKPOINTS_OPTION("last", "Centres of the slices")
@SAMPLES_OPTION
@WEIGHTS_OPTION
@click.option("--one-dim", type=click.Choice(["zero", "filter", "weight"]), default="zero", show_default=True,
              help="Random directions on biases and norms: zero (Li et al.'s paper, their code's --xignore biasbn), "
                   "normalised as a whole, or d = w (their code's default).")
@click.option("--qkv", type=click.Choice(["head", "row"]), default="head", show_default=True,
              help="Filter of the fused qkv weight: one head's q/k/v block, or one row (Li et al.).")
@click.option("--tokens", type=click.Choice(["token", "tensor"]), default="token", show_default=True,
              help="Filter of pos_embed and class tokens: one per token, or the whole (1, N, D) tensor (Li et al.'s "
                   "code).")
@SEED_OPTION("the random directions")
@FORCE_OPTION()
@DTYPE_OPTION
@BATCH_SIZE_OPTION()
@DEVICE_OPTION
@SHARD_OPTION("checkpoints", "grid")
@DATA_DIR_OPTION
@EVALUATION_DATA_OPTIONS
@LOG_OPTION
def analyze_surface(run: Path, directions: str, dims: str | None, value_range: str | None, points: int, one_dim: str,
                    qkv: str, tokens: str, **options) -> None:
    """Loss and accuracy on a 1D or 2D grid around each checkpoint: RUN/analysis/surface-<directions>-<dims>d.nc.

    \b
    On several GPUs: torchrun --nproc-per-node 8 -m landscape analyze surface RUN [--shard grid|checkpoints]
    """
    from landscape.analyses.surface import SurfaceAnalysis, SurfaceSettings, surface_summary

    settings = SurfaceSettings(directions=directions, dims=int(dims) if dims else None, range=value_range,
                               points=points, one_dim=one_dim, qkv=qkv, tokens=tokens, **_evaluation(options))
    _analyze(run, SurfaceAnalysis(settings), surface_summary, **options)
# -- end analyze sharpness / surface --

# -- analyze dynamics --
@analyze.command("dynamics")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
def analyze_dynamics(runs: tuple[Path, ...]) -> None:
    """Peak epoch, peak and final top-1, peak-to-final drop (raw and EMA) and the generalisation gap of each run.

    Written to RUN/analysis/dynamics.nc; with several runs, also the mean and standard deviation over the seeds
    of each variant.
    """
    from landscape.analyses.dynamics import SCALARS, across_seeds, write_dynamics
    from landscape.runs import Run
    from landscape.summary import repeated_seeds

    named = {}
    for path in runs:  # a run named twice (`RUN RUN`, `runs/x runs/./x`) is one run, not two seeds of it
        named.setdefault(path.resolve(), path)
    datasets, rows = [], []
    for path in named.values():
        ds, written = write_dynamics(Run.open(path))
        datasets.append(ds)
        for w in ds["weights"].values:
            rows.append({"run": str(path), "variant": ds.attrs["variant"], "seed": ds.attrs["seed"], "weights": str(w),
                         **{k: float(ds[k].sel(weights=w)) for k in SCALARS},
                         "final gap": float(ds["generalization_gap"][-1])})
        click.echo(f"wrote {written}", err=True)
    print_table(rows)
    for sentence in repeated_seeds((str(ds.attrs["variant"]), str(ds.attrs["variant"]), ds.attrs.get("seed"), path)
                                   for ds, path in zip(datasets, named.values())):
        click.echo(f"Warning: {sentence}", err=True)
    if len(datasets) > 1:
        summary = across_seeds(datasets).to_dataframe().dropna(subset=["n_seeds"]).reset_index()
        click.echo("\nacross seeds (mean, standard deviation)")
        print_table([{"variant": r["variant"], "weights": r["weights"], "seeds": int(r["n_seeds"]),
                      **{k: f"{r[k + '_mean']:.4g}" + (f" ± {r[k + '_std']:.2g}" if r["n_seeds"] > 1 else "")
                         for k in SCALARS}}
                     for r in summary.to_dict("records")])
# -- end analyze dynamics --
# == end analyses ==


# == foreign checkpoints: `landscape import`, `landscape compare` ===============================================
@cli.command("import")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Run directory to create (must not exist, or be empty).")
@click.option("--format", "format_", default=None, metavar="FORMAT",
              help="Source format: timm, deit, hf or torchvision (default: detected from the file).")
@click.option("--model", "--as", "model", default=None, metavar="NAME",
              help="Registered model to load the weights into (default: recovered from the tensors).")
@click.option("--model-arg", "model_args", multiple=True, metavar="KEY=VALUE",
              help="Model keyword argument overriding the recovered one, e.g. num_heads=12 (repeatable).")
@click.option("--data", default=None, metavar="NAME",
              help="Dataset the analyses of this run use (default: guessed from classes, channels, image size); "
                   "synthetic needs no files and takes the model's shape.")
@click.option("--img-size", type=click.IntRange(min=1), default=None,
              help="Image side the data is resized to (default: the model's).")
@click.option("--classes", type=click.IntRange(min=1), default=None,
              help="Classes of --data synthetic (default: the model's).")
@click.option("--check-logits", type=click.Path(dir_okay=False, path_type=Path), default=None, metavar="FILE",
              help="Verify the imported model's logits: FILE holds {'input': (N,C,H,W), 'logits': (N,classes)} "
                   "tensors of the source model, written with torch.save or safetensors.")
@DATA_DIR_OPTION
def import_command(source: Path, out: Path, format_: str | None, model: str | None, model_args: tuple[str, ...],
                   data: str | None, img_size: int | None, classes: int | None, check_logits: Path | None,
                   data_dir: Path | None) -> None:
    """Bring a checkpoint from timm, DeiT, Hugging Face or torchvision in as a run with one checkpoint.

    SOURCE is a weights file (.pth, .pt, .bin, .safetensors, timm train.py checkpoints included) or a
    model directory (Hugging Face: config.json + model.safetensors or pytorch_model.bin; timm Hub export).
    Architecture facts the file states (timm train.py args, config.json) are read; the ones the tensors leave
    open (head count, pooling) are guessed and named in a note, with the --model-arg that overrides them.
    """
    from landscape.config import parse_override
    from landscape.importers import IMPORT_STAGES, import_checkpoint

    bar = None
    if sys.stderr.isatty():  # a ViT-B file takes tens of seconds: say which stage, with the time left
        from landscape.progress import progress_bar

        bar = progress_bar(total=len(IMPORT_STAGES), unit=" stage", leave=False)

    def stage(name: str) -> None:
        if bar is not None:
            bar.update(IMPORT_STAGES.index(name) - bar.n)
            bar.set_description(name)

    try:
        result = import_checkpoint(source, out, format=format_, model=model,
                                   model_args=dict(parse_override(a) for a in model_args), data=data,
                                   img_size=img_size, classes=classes, check_logits=check_logits, data_dir=data_dir,
                                   progress=stage)
    finally:
        if bar is not None:
            bar.close()
    print_table([{
        "run": str(result.run.root), "format": result.format, "model": result.model,
        "params": result.num_params, "ema": "yes" if result.has_ema else "no", "data": result.data,
    }])
    if result.builder and result.builder != result.model:
        click.echo(f"built by: {result.builder} with the kwargs below (its name alone would be another size)")
    click.echo("kwargs: " + ", ".join(f"{k}={v}" for k, v in result.model_kwargs.items()))
    guessed = [k for k, f in result.facts.items() if f.get("how") == "guessed"]
    read = [f"{k} ({f['from']})" for k, f in result.facts.items() if f.get("how") == "read"]
    if read:
        click.echo("read: " + ", ".join(read))
    if guessed:
        click.echo("guessed: " + ", ".join(guessed) + " (see the notes)")
    confirmed = [k for k, f in result.facts.items() if f.get("how") == "confirmed"]
    if confirmed:
        click.echo("guessed, then confirmed by the logits: " + ", ".join(confirmed))
    for note in result.notes:
        click.echo(f"note: {note}")


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the table as CSV.")
@click.option("--figure", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also draw the measures side by side (format from the extension: .png, .pdf, .svg).")
def compare(runs: tuple[Path, ...], out: Path | None, figure: Path | None) -> None:
    """The final-checkpoint measures of several runs side by side ('-' where a run has no such result)."""
    from landscape.compare import compare_runs, write_compare_csv
    from landscape.io import refuse_overwrite

    if out is not None:
        refuse_overwrite(out, "a CSV table", (".csv", ".txt", ".tsv"), ours=lambda head: head.startswith("run,"))
    if figure is not None:
        refuse_overwrite(figure, "a figure", (".png", ".pdf", ".svg", ".jpg", ".jpeg"), option="--figure")
    table = compare_runs(runs)
    for caveat in table.attrs.get("caveats", ()):
        click.echo(f"Warning: {caveat}", err=True)
    print_table(table.astype(object).where(table.notna(), None).to_dict("records"))
    if out is not None:
        write_compare_csv(table, out)
        click.echo(f"wrote {out}")
    if figure is not None:
        from landscape.compare import save_compare_figure

        save_compare_figure(table, figure)
        click.echo(f"wrote {figure}")

# == end foreign checkpoints ==


# == paper: `landscape figures`, `landscape report`, `landscape demo` ===========================================
def _write_figures_with_progress(results, out: Path, *, formats, names=None) -> dict:
    """write_figures, one figure at a time under a bar with the time left when stderr is a terminal (drawing the
    whole gallery takes minutes on a busy CPU)."""
    from landscape.figures import FIGURES, write_figures

    if not sys.stderr.isatty():
        return write_figures(results, out, formats=formats, names=names)
    from landscape.progress import progress_bar

    written: dict = {}
    with progress_bar(list(names or FIGURES), desc="figures", unit=" figure", leave=False) as bar:
        for name in bar:
            written.update(write_figures(results, out, formats=formats, names=[name]))
    return written


def _figures_folder(folder: Path) -> Path:
    """:func:`landscape.io.figures_folder`, said on stderr when it is not ``folder``."""
    from landscape.io import figures_folder

    chosen = figures_folder(folder)
    if chosen != folder:
        click.echo(f"{folder} is a run folder: the figures go to {chosen}.", err=True)
    return chosen


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the figures.")
@click.option("--only", multiple=True, metavar="NAME", help="Draw only this figure (repeatable); default: all.")
@click.option("--format", "formats", multiple=True, type=click.Choice(["png", "pdf", "svg"]),
              help="File format (repeatable); default: png and pdf.")
def figures(runs: tuple[Path, ...], out: Path, only: tuple[str, ...], formats: tuple[str, ...]) -> None:
    """Draw the figure gallery of RUNS (one colour per variant in every figure) into OUT as PNG and PDF; a
    figure whose results the runs do not have yet is named on stderr with the command that makes them."""
    from landscape.figures import FIGURE_NEEDS, FIGURES, FORMATS
    from landscape.io import folder_lock
    from landscape.summary import load_results

    results = load_results(runs)
    _warn_problems(results)
    out = _figures_folder(out)
    with folder_lock(out, "drawing figures into"):
        written = _write_figures_with_progress(results, out, formats=formats or FORMATS, names=only or None)
        drawn = {p.resolve() for paths in written.values() for p in paths}
        earlier = [] if only else sorted(p.name for name in FIGURES for fmt in ("png", "pdf", "svg")
                                         for p in [out / f"{name}.{fmt}"] if p.is_file() and p.resolve() not in drawn)
    for name, paths in written.items():
        click.echo(f"{name}: {', '.join(str(p) for p in paths)}")
    if earlier:  # a gallery folder used before: what is still there is of other runs or of earlier results
        click.echo(f"Warning: {out} also holds figures drawn earlier, not by this call ({', '.join(earlier)}); they "
                   "may show other runs or older results.", err=True)
    left = [name for name in dict.fromkeys(only or FIGURES) if name not in written]
    why = "; ".join(f"{name} ({FIGURE_NEEDS[name]})" for name in left)
    if only and not written:
        raise LandscapeError(f"No figure was drawn: the runs have nothing yet for {why}.")
    if left:
        click.echo(f"Not drawn, nothing in the runs for them yet: {why}.", err=True)


def _warn_problems(results) -> None:
    """Say on stderr what of the runs could not be read, is incomplete or was measured differently (the report
    lists it too)."""
    from landscape.summary import caveats

    for problem in caveats(results):
        click.echo(f"Warning: {problem}", err=True)


@cli.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", default=Path("report.md"), show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Markdown file to write.")
@click.option("--html", "with_html", is_flag=True, help="Also write the report as HTML next to it.")
@click.option("--figures", "figures_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Draw the figures into this folder and link them (default: OUT's folder/figures).")
@click.option("--no-figures", is_flag=True, help="Write the report without drawing or linking figures.")
def report(runs: tuple[Path, ...], out: Path, with_html: bool, figures_dir: Path | None, no_figures: bool) -> None:
    """The hypotheses H1-H4 on RUNS, each with its evidence and a verdict by the rule stated in the report."""
    from landscape.io import refuse_overwrite
    from landscape.report import write_report
    from landscape.summary import load_results

    from landscape.report import REPORT_TITLE

    refuse_overwrite(out, "a Markdown report", (".md", ".markdown", ".txt"),
                     ours=lambda head: head.startswith(f"# {REPORT_TITLE}\n"))
    if with_html:
        refuse_overwrite(out.with_suffix(".html"), "an HTML report", (".html", ".htm"),
                         ours=lambda head: f"<title>{REPORT_TITLE}</title>" in head)
    results = load_results(runs)
    _warn_problems(results)
    written = {}
    if not no_figures:
        from landscape.figures import write_figures
        from landscape.io import folder_lock

        with folder_lock(_figures_folder(figures_dir or out.parent / "figures"), "drawing figures into") as folder:
            written = write_figures(results, folder)
    paths, hypotheses = write_report(results, out, figures=written, html=with_html)
    for h in hypotheses:
        click.echo(f"{h.key} {h.verdict:<13} {h.title}")
    for path in paths:
        click.echo(f"wrote {path}")


@cli.command()
@click.option("--data", default="digits", show_default=True, type=click.Choice(["digits", "fashion-mnist"]),
              help="digits: embedded 8x8 digits (minutes on a laptop CPU); fashion-mnist: the real 28x28 files.")
@click.option("--out", default=Path("runs/demo"), show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Study folder: runs/, figures/ and report.md go here.")
@click.option("--seeds", default=2, show_default=True, type=click.IntRange(1, 10_000), help="Seeds per variant.")
@click.option("--epochs", default=None, type=click.IntRange(1),
              help="Training epochs (default: 12 digits, 8 fashion-mnist).")
@click.option("--jobs", default=None, type=click.IntRange(1),
              help="Runs trained and analysed at once, one CPU thread each (default: CPU cores, at most 4).")
@click.option("--figures-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the PNG figures here (e.g. figures/ of the repository).")
@click.option("--force", is_flag=True, help="Recompute every analysis (training is kept).")
@click.option("--smoke", is_flag=True,
              help="The least that runs every stage (1 epoch unless --epochs, 128 training images, a few products "
                   "per analysis): a check that the demo works (a few minutes at most with --seeds 1, most of it "
                   "drawing the figures); not a result.")
@DATA_DIR_OPTION
def demo(data: str, out: Path, seeds: int, epochs: int | None, jobs: int | None, figures_out: Path | None,
         force: bool, smoke: bool, data_dir: Path | None) -> None:
    """The whole study on a small scale: train; the Hessian at every checkpoint, sharpness, loss surfaces and the
    spectral density at the final one, the dynamics; draw the figures, write the report.

    Baseline ViT, GroupedMLP (pairs), ShallowMLP (half width, sliced and random init) and an mLiT, SEEDS seeds
    each. Re-running it skips everything already done.
    """
    from landscape.study import demo_study

    _run_study(demo_study(data, seeds=seeds, epochs=epochs, smoke=smoke), out, jobs=jobs, figures_out=figures_out, force=force,
               data_dir=data_dir, what="landscape demo")


@cli.command("study")
@click.argument("study_file", metavar="STUDY.yaml", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--out", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Study folder: runs/, figures/, report.md, study.yaml and timings.csv go here "
                   "[default: runs/<study name>].")
@click.option("--jobs", default=None, type=click.IntRange(1),
              help="Runs trained and analysed at once, one CPU thread each (default: CPU cores, at most 4).")
@click.option("--figures-out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also copy the PNG figures here.")
@click.option("--force", is_flag=True, help="Recompute every analysis (training is kept).")
@click.option("--check", is_flag=True, help="Check the study file and print its runs, then exit.")
@DATA_DIR_OPTION
def study(study_file: Path, out: Path | None, jobs: int | None, figures_out: Path | None, force: bool, check: bool,
          data_dir: Path | None) -> None:
    """Run the study declared in STUDY.yaml: variants x seeds -> train -> analyses -> figures -> report.

    The file names the dataset, recipe and overrides, the seeds, the variants (model and kwargs) and the analyses
    (which measures at which checkpoints). The studies shipped with landscape are named without a folder:
    demo-digits (the demo's), demo-fashion-mnist, dynamics-digits. Bad studies (an unknown
    model, a variant without its baseline, a group size that does not divide the depth) are refused before anything
    trains. Re-running continues where an interrupted study stopped.
    """
    from landscape.study import check_study, load_study

    spec = load_study(study_file)
    if check:
        check_study(spec, here=False)
        _study_notes(spec)
        _device_note(spec.analysis.device, "the study's analyses run")
        print_table([{"run": name, "model": v.model, "seed": s} for v, s, name in spec.run_names()])
        size = f"{_count(len(spec.variants), 'variant')} x {_count(len(spec.seeds), 'seed')}"
        click.echo(f"{study_file}: {size} on {spec.data}: fine.")
        return
    _run_study(spec, out or Path("runs") / spec.name, jobs=jobs, figures_out=figures_out, force=force,
               data_dir=data_dir, what=f"landscape study {study_file}")


def _device_note(device: str | None, what: str) -> None:
    """A note when ``device`` is not on this machine: a check or dry run for another machine (the run refuses it)."""
    from landscape.trainers.distributed import check_device, device_missing

    if missing := device_missing(check_device(device, here=False)):
        click.echo(f"Note: {what} on device {device!r}, which this machine cannot ({missing}); it runs where it "
                   "can.", err=True)


def _study_notes(spec) -> None:
    """What `train` would note of each run of the study (the runs share the recipe and overrides)."""
    from landscape.study import train_config
    from landscape.trainers import warmup_note

    if note := warmup_note(train_config(spec, spec.variants[0], spec.seeds[0])):
        click.echo(f"Note: in every run, {note}", err=True)


def _run_study(spec, out: Path, *, jobs: int | None, figures_out: Path | None, force: bool, data_dir: Path | None,
               what: str) -> None:
    """Run a study with one progress line per finished stage (elapsed time, runs done of all)."""
    import shlex
    import time

    from landscape.study import default_jobs, run_study

    start = time.perf_counter()
    total = len(spec.run_names())
    done: set[str] = set()

    def show(event) -> None:
        if event.stage == "done" and event.run:
            done.add(event.run)
        where = f"[{len(done)}/{total}] {event.run}" if event.run else "study"
        took = f" ({event.seconds:.1f} s)" if event.seconds else ""
        elapsed = time.perf_counter() - start
        left = ""
        if event.run and done and len(done) < total:
            left = f"  ~{elapsed / len(done) * (total - len(done)) / 60:.0f} min of runs left, then figures"
        click.echo(f"{elapsed:6.0f}s  {where:<26} {event.stage:<9} {event.message}{took}{left}", err=True)

    size = f"{_count(len(spec.variants), 'variant')} x {_count(len(spec.seeds), 'seed')}"
    click.echo(f"{what}: {size} on {spec.data} into {out}", err=True)
    _study_notes(spec)
    command = " ".join(shlex.quote(a) for a in ["landscape", *sys.argv[1:]])
    outcome = run_study(spec, out, jobs=jobs or default_jobs(), data_dir=data_dir, on_event=show,
                        figures_out=figures_out, force=force, command=command, progress=sys.stderr.isatty())
    click.echo(f"report:  {outcome.report}")
    click.echo(f"figures: {outcome.out / 'figures'}" + (f" and {figures_out}" if figures_out else ""))
    click.echo(f"done in {outcome.wall_time:.0f} s")


# == end paper ==


def _open_closed_streams() -> None:
    """A stream the shell closed (``2>&-``) is ``None`` in Python: every message and progress bar would fail on it,
    so it writes to the null device instead (stdin reads nothing)."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))


def main() -> None:
    _open_closed_streams()
    taken = _stop_on_signals()
    try:
        cli(prog_name="landscape")
    finally:  # the command has ended (click exits with its status): a signal from now on, while the interpreter
        # shuts down, ends the process as it would without us, not by a `Stopped` that nothing is left to catch
        for sig in taken:
            signal.signal(sig, signal.SIG_DFL)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

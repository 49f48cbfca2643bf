"""The ``landscape`` command line. Thin: parse, call one library function, print.

Any :class:`~landscape.errors.LandscapeError` becomes one sentence on stderr and exit code 1; click's own
usage errors exit with 2. Nothing here computes anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from landscape import __version__
from landscape.errors import LandscapeError

DATA_DIR_OPTION = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LANDSCAPE_DATA_DIR",
    default=None,
    help="Folder holding the datasets' official files (default: $LANDSCAPE_DATA_DIR).",
)


class LandscapeGroup(click.Group):
    """A click group that turns user errors into one sentence and a non-zero exit, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except LandscapeError as e:
            click.echo(f"Error: {e}", err=True)
            ctx.exit(1)


@click.group(cls=LandscapeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="landscape")
def cli() -> None:
    """Train Vision Transformer variants with dense checkpoints and measure the geometry of their loss landscape."""


def print_table(rows: list[dict], columns: list[str] | None = None) -> None:
    """Print dicts as an aligned plain-text table."""
    if not rows:
        return
    columns = columns or list(rows[0])
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
def datasets(data_dir: Path | None) -> None:
    """List the datasets, whether their files are found, and their sizes."""
    from landscape.data import dataset_status

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
    from landscape.models import model_table

    print_table(model_table(list(names) or None))


# == end models ==


# == training: `landscape train` ================================================================================
def _key_values(pairs: tuple[str, ...]) -> dict:
    from landscape.config import parse_override

    return dict(parse_override(p) for p in pairs)


@cli.command(context_settings={"show_default": True})
@click.option("--recipe", default=None, help="Named recipe or a YAML file (default: digits for digits/synthetic data, "
              "else small-images); see the list below.")
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
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:K (under torchrun: each process's GPU).")
@DATA_DIR_OPTION
@click.option("--dry-run", is_flag=True, help="Print the resolved config and exit.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar per epoch (on a terminal).")
def train(recipe, model, model_args, data, img_size, out, epochs, batch_size, lr, seed, overrides, init, resume,
          overwrite, device, data_dir, dry_run, progress) -> None:
    """Train a model with dense checkpoints into a run directory.

    \b
    landscape train --data digits                                   (seconds on a CPU)
    landscape train --model vit_pico_patch4_32 --data fashion-mnist --recipe small-images --set epochs=30
    landscape train --resume runs/NAME                              (after a crash or a kill)
    torchrun --nproc-per-node 4 -m landscape train --recipe paper-a-imagenet --data-dir /data
    """
    import os

    import yaml

    from landscape.config import to_dict
    from landscape.trainers import build_config, recipe_names
    from landscape.trainers import train as run_training

    main_process = os.environ.get("RANK", "0") == "0"
    if resume is not None:
        given = [name for name, value in [("--recipe", recipe), ("--model", model), ("--model-arg", model_args),
                 ("--data", data), ("--img-size", img_size), ("--out", out), ("--epochs", epochs),
                 ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed), ("--set", overrides),
                 ("--init", init), ("--overwrite", overwrite)] if value]
        if given:
            raise LandscapeError(f"--resume continues a run with the config saved in it; drop {', '.join(given)}.")
        config, out = None, resume
    else:
        if recipe is None:
            recipe = "digits" if data in (None, "digits", "synthetic") else "small-images"
        options = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed, "img_size": img_size}
        extra = {"init": str(init)} if init is not None else {}
        config = build_config(recipe, model=model, model_kwargs=_key_values(model_args), data=data,
                              options=options, overrides={**extra, **_key_values(overrides)})
        if dry_run:
            click.echo(yaml.safe_dump(to_dict(config), sort_keys=False).rstrip())
            click.echo(f"# recipes: {', '.join(recipe_names())}")
            return
        out = out or Path("runs") / f"{config.data.name}-{config.model.name}-seed{config.seed}"

    def print_row(row: dict) -> None:
        shown = ["epoch", "step", "train_loss", "val_loss", "val_top1", "ema_val_top1", "lr", "images_per_s"]
        click.echo("  ".join(f"{k} {_fmt(row[k])}" for k in shown if row.get(k) is not None), err=True)

    result = run_training(config, out, resume=resume is not None, overwrite=overwrite, device=device,
                          data_dir=data_dir, progress=progress, on_row=print_row)
    if main_process:
        final = result.final
        scores = ", ".join(f"{k} {_fmt(final[k])}" for k in ("val_top1", "ema_val_top1") if final.get(k) is not None)
        click.echo(f"Run written to {result.run.root} ({len(result.checkpoints)} checkpoints; final {scores}).")

# == end training ==


# == analyses: `landscape analyze ...` ==========================================================================
@cli.group(cls=LandscapeGroup)
def analyze() -> None:
    """Measure the loss landscape at a run's checkpoints (results in RUN/analysis/)."""


# -- analyze hessian --

# -- end analyze hessian --

# -- analyze sharpness / surface --

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

    datasets, rows = [], []
    for path in runs:
        ds, written = write_dynamics(Run.open(path))
        datasets.append(ds)
        for w in ds["weights"].values:
            rows.append({"run": str(path), "variant": ds.attrs["variant"], "seed": ds.attrs["seed"], "weights": str(w),
                         **{k: float(ds[k].sel(weights=w)) for k in SCALARS},
                         "final gap": float(ds["generalization_gap"][-1])})
        click.echo(f"wrote {written}", err=True)
    print_table(rows)
    if len(datasets) > 1:
        summary = across_seeds(datasets).to_dataframe().dropna(subset=["n_seeds"]).reset_index()
        click.echo("\nacross seeds (mean, standard deviation)")
        print_table([{"variant": r["variant"], "weights": r["weights"], "seeds": int(r["n_seeds"]),
                      **{k: f"{r[k + '_mean']:.4g} ± {r[k + '_std']:.2g}" for k in SCALARS}}
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
              help="Dataset the analyses of this run use (default: guessed from classes, channels, image size).")
def import_command(source: Path, out: Path, format_: str | None, model: str | None, model_args: tuple[str, ...],
                   data: str | None) -> None:
    """Bring a checkpoint from timm, DeiT, Hugging Face or torchvision in as a run with one checkpoint.

    SOURCE is a weights file (.pth, .pt, .bin, .safetensors, timm train.py checkpoints included) or a
    Hugging Face model directory (config.json + model.safetensors or pytorch_model.bin).
    """
    from landscape.config import parse_override
    from landscape.importers import import_checkpoint

    result = import_checkpoint(source, out, format=format_, model=model,
                               model_args=dict(parse_override(a) for a in model_args), data=data)
    print_table([{
        "run": str(result.run.root), "format": result.format, "model": result.model,
        "params": result.num_params, "ema": "yes" if result.has_ema else "no", "data": result.data,
    }])
    click.echo("kwargs: " + ", ".join(f"{k}={v}" for k, v in result.model_kwargs.items()))
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

    table = compare_runs(runs)
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

# == end paper ==


def main() -> None:
    cli(prog_name="landscape")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

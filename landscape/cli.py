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

# == end models ==


# == training: `landscape train` ================================================================================

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

# -- end analyze dynamics --
# == end analyses ==


# == foreign checkpoints: `landscape import`, `landscape compare` ===============================================

# == end foreign checkpoints ==


# == paper: `landscape figures`, `landscape report`, `landscape demo` ===========================================

# == end paper ==


def main() -> None:
    cli(prog_name="landscape")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Stage plots: every plot of dvc.yaml's top-level `plots:` as an SVG image in plots/images/ (docs/plots.md
shows them).

    python -m stages.plots                       # as `dvc repro plots` runs it
    python -m stages.plots --dvc-yaml dvc.yaml --out /tmp/images

Each image is `<name>.svg`: the plot's id, or its data file's stem (plots/mae_by_round.csv -> mae_by_round.svg).
The same chart as `dvc plots show` for the workspace (deeper/plots.py), with no browser and no network.
"""

from __future__ import annotations

from pathlib import Path

import click
import yaml

from deeper.errors import InputError
from deeper.outputs import write_text
from deeper.plots import TEMPLATE_DIR, plot_definitions, read_plot_rows, render_svg, vega_lite_spec
from stages._cli import user_errors


def run(dvc_yaml_path: Path, out_dir: Path) -> list[Path]:
    if not dvc_yaml_path.is_file():
        raise InputError(dvc_yaml_path, "missing: the plot definitions")
    root = dvc_yaml_path.parent
    definitions = plot_definitions(
        yaml.safe_load(dvc_yaml_path.read_text(encoding="utf-8")) or {}, source=str(dvc_yaml_path)
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for definition in definitions:
        # a training curve the run did not write (no validation pairs, or no pairs: the model carried over
        # untrained) leaves its line out; a plot with no data file at all is skipped, and said so
        present = [path for path in definition.paths if (root / path).is_file()]
        if not present:
            click.echo(f"skipped {definition.image}: no data file ({', '.join(definition.paths)})", err=True)
            continue
        rows = {path: read_plot_rows(root / path, definition) for path in present}
        image = out_dir / definition.image
        write_text(image, render_svg(vega_lite_spec(definition, rows, root / TEMPLATE_DIR)))
        click.echo(f"{image}: {', '.join(definition.paths)} ({sum(map(len, rows.values()))} rows)", err=True)
        written.append(image)
    return written


@click.command(help=__doc__.split("\n\n")[0])
@click.option(
    "--dvc-yaml",
    "dvc_yaml_path",
    default="dvc.yaml",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The plot definitions; data paths are relative to its folder.",
)
@click.option(
    "--out",
    "out_dir",
    default="plots/images",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the SVG images go.",
)
@user_errors
def main(dvc_yaml_path, out_dir):
    run(Path(dvc_yaml_path), Path(out_dir))


if __name__ == "__main__":
    main()

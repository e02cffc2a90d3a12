"""The plots of dvc.yaml as SVG images (deeper/plots.py, stages/plots.py), the offline page of `dvc plots show`,
and that the repository's dvc.yaml, .dvc/config and committed files agree with them. The page drawn in a real
browser is tests/test_plots_browser.py."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deeper.errors import ConfigError, InputError
from deeper.plots import (
    OFFLINE_PAGE,
    TEMPLATE_DIR,
    PlotDefinition,
    build_offline_page,
    offline_page,
    plot_definitions,
    read_plot_rows,
    render_svg,
    vega_lite_spec,
)
from stages.plots import main as plots_main
from tests.conftest import REPO, one_line_error

METHODS = ["deeper", "incupdate", "slideregen"]
MAE_PLOT = {
    "x": "round",
    "y": "mae",
    "template": "mae_by_method",
    "title": "MAE by round",
    "x_label": "update round t",
    "y_label": "MAE",
}


def mae_csv(methods=METHODS, rounds=3) -> str:
    lines = ["method,round,mae"]
    lines += [f"{m},{r},{0.9 - 0.05 * r + 0.01 * i}" for i, m in enumerate(methods) for r in range(rounds)]
    return "\n".join(lines) + "\n"


def scratch_project(folder: Path, plots: list, files: dict[str, str]) -> Path:
    """dvc.yaml with the given `plots:`, the repository's templates in .dvc/plots, and the data files."""
    (folder / ".dvc").mkdir(parents=True)
    shutil.copytree(REPO / TEMPLATE_DIR, folder / TEMPLATE_DIR, ignore=shutil.ignore_patterns("*.html"))
    (folder / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False), encoding="utf-8")
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


# ---- plot definitions: DVC's two one-file forms, and what the images cannot draw


def test_plot_definitions_read_the_path_and_the_id_forms():
    definitions = plot_definitions(
        {
            "plots": [
                {"plots/mae_by_round.csv": MAE_PLOT},
                {
                    "mae_quality": {
                        "x": "round",
                        "y": {"results/q/mae_by_round.csv": "mae"},
                        "title": "quality",
                    }
                },
                {"mae_tsv": {"x": {"r.tsv": "step"}, "y": {"r.tsv": "loss"}}},
            ]
        }
    )
    assert definitions == [
        PlotDefinition(
            "mae_by_round",
            "plots/mae_by_round.csv",
            "round",
            "mae",
            {k: MAE_PLOT[k] for k in ("template", "title", "x_label", "y_label")},
        ),
        PlotDefinition("mae_quality", "results/q/mae_by_round.csv", "round", "mae", {"title": "quality"}),
        PlotDefinition("mae_tsv", "r.tsv", "step", "loss", {}),
    ]
    assert [d.image for d in definitions] == ["mae_by_round.svg", "mae_quality.svg", "mae_tsv.svg"]
    assert plot_definitions({"stages": {}}) == []


@pytest.mark.parametrize(
    "plots, fragments",
    [
        ({"a.csv": MAE_PLOT}, ["dvc.yaml: plots: must be a list"]),
        (["a.csv"], ["plots[0]: must be `<file or id>: {x: ..., y: ...}`"]),
        ([{"a.csv": {"x": "round"}}], ["plots[0].a.csv.y: must be one field name", "None"]),
        ([{"a.csv": {"y": "mae"}}], ["plots[0].a.csv.x: must be one field name"]),
        (
            [{"p": {"x": "round", "y": {"a.csv": "mae", "b.csv": "loss"}}}],
            ["plots[0].p.y: the images overlay files with one y field"],
        ),
        (
            [{"p": {"x": "round", "y": {"a.csv": "mae", "b.json": "mae"}}}],
            ["plots[0].p: the images read", "b.json"],
        ),
        ([{"p": {"x": {"b.csv": "round"}, "y": {"a.csv": "mae"}}}], ["plots[0].p.x:", "(a.csv)"]),
        (
            [{"a.json": {"x": "round", "y": "mae"}}],
            ["plots[0].a.json: the images read .csv and .tsv files, got a.json"],
        ),
        ([{"a.csv": {**MAE_PLOT, "header": False}}], ["plots[0].a.csv: the images do not draw ['header']"]),
        (
            [{"x/mae.csv": MAE_PLOT}, {"y/mae.csv": MAE_PLOT}],
            ["two plots make the image mae.svg: give one an id"],
        ),
    ],
)
def test_plot_definitions_refuse_what_the_images_cannot_draw(plots, fragments):
    with pytest.raises(ConfigError) as caught:
        plot_definitions({"plots": plots})
    for fragment in fragments:
        assert fragment in str(caught.value), str(caught.value)


def test_an_overlay_of_files_is_one_image_with_a_line_per_file(tmp_path):
    """DVC's `y: {<file>: <field>, ...}` (the training curves: train and validation pairs, two iterations): one
    image, each file a line of its own, named as `dvc plots show` names it (the files' common folder dropped)."""
    plots = [
        {
            "train_loss": {
                "x": "step",
                "y": {"c/it1/train/loss.tsv": "loss", "c/it1/eval/loss.tsv": "loss"},
                "title": "loss",
                "template": "training_curve",
            }
        }
    ]
    (definition,) = plot_definitions({"plots": plots})
    assert definition.paths == ("c/it1/train/loss.tsv", "c/it1/eval/loss.tsv") and definition.y == "loss"
    files = {
        "c/it1/train/loss.tsv": "step\tloss\n1\t0.7\n2\t0.5\n",
        "c/it1/eval/loss.tsv": "step\tloss\n2\t0.6\n",
    }
    folder = scratch_project(tmp_path, plots, files)
    rows = {p: read_plot_rows(folder / p, definition) for p in definition.paths}
    spec = vega_lite_spec(definition, rows, folder / TEMPLATE_DIR)
    values = spec["data"]["values"]
    assert sorted((v["filename"], v["step"], v["loss"]) for v in values) == [
        ("eval/loss.tsv", "2", "0.6"),
        ("train/loss.tsv", "1", "0.7"),
        ("train/loss.tsv", "2", "0.5"),
    ]
    svg = render_svg(spec)
    assert "eval/loss.tsv" in svg and "train/loss.tsv" in svg  # the legend names both lines
    result = CliRunner().invoke(
        plots_main, ["--dvc-yaml", str(folder / "dvc.yaml"), "--out", str(tmp_path / "i")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "i" / "train_loss.svg").read_text(encoding="utf-8") == svg
    # no validation pairs: no eval curve; the chart holds the train line alone
    (folder / "c/it1/eval/loss.tsv").unlink()
    result = CliRunner().invoke(
        plots_main, ["--dvc-yaml", str(folder / "dvc.yaml"), "--out", str(tmp_path / "j")]
    )
    assert result.exit_code == 0, result.output
    only_train = render_svg(
        vega_lite_spec(
            definition, {"c/it1/train/loss.tsv": rows["c/it1/train/loss.tsv"]}, folder / TEMPLATE_DIR
        )
    )
    assert (tmp_path / "j" / "train_loss.svg").read_text(encoding="utf-8") == only_train


# ---- data rows and the filled template


def test_read_plot_rows_as_dvc_reads_them(tmp_path):
    definition = PlotDefinition("mae", "mae.csv", "round", "mae")
    (tmp_path / "mae.csv").write_text("method,round,mae\ndeeper,0,0.88\nincupdate,0,0.9\n", encoding="utf-8")
    assert read_plot_rows(tmp_path / "mae.csv", definition) == [
        {"method": "deeper", "round": "0", "mae": "0.88"},
        {"method": "incupdate", "round": "0", "mae": "0.9"},
    ]
    tsv = PlotDefinition("loss", "loss.tsv", "step", "loss")
    (tmp_path / "loss.tsv").write_text("step\tloss\n1\t0.5\n", encoding="utf-8")
    assert read_plot_rows(tmp_path / "loss.tsv", tsv) == [{"step": "1", "loss": "0.5"}]


@pytest.mark.parametrize(
    "text, where, fragment",
    [
        ("", "mae.csv:1", "empty: no header line"),
        (
            "method,round,loss\ndeeper,0,1\n",
            "mae.csv:1",
            "no column 'mae' (plot mae in dvc.yaml); header: method,round,loss",
        ),
        ("method,step,mae\ndeeper,0,1\n", "mae.csv:1", "no column 'round'"),
        ("method,round,mae\ndeeper,0,1\nincupdate,0\n", "mae.csv:3", "2 fields, the header has 3"),
        ("method,round,mae\n", "mae.csv:2", "no rows to plot"),
    ],
)
def test_read_plot_rows_names_the_file_and_row(tmp_path, text, where, fragment):
    (tmp_path / "mae.csv").write_text(text, encoding="utf-8")
    with pytest.raises(InputError) as caught:
        read_plot_rows(tmp_path / "mae.csv", PlotDefinition("mae", "mae.csv", "round", "mae"))
    assert str(caught.value).startswith(str(tmp_path / where) + ": ") and fragment in str(caught.value)


def test_vega_lite_spec_fills_the_template_as_dvc_does_without_the_revision_channels():
    definition = plot_definitions({"plots": [{"mae.csv": MAE_PLOT}]})[0]
    rows = [
        {"method": "deeper", "round": "0", "mae": "0.88"},
        {"method": "incupdate", "round": "0", "mae": "0.9"},
    ]
    spec = vega_lite_spec(definition, rows, REPO / TEMPLATE_DIR)
    assert spec["title"] == "MAE by round"
    assert spec["data"]["values"] == [
        {**row, "rev": "workspace", "filename": "mae.csv", "field": "mae"} for row in rows
    ]
    encoding = spec["encoding"]
    assert (encoding["x"]["field"], encoding["x"]["title"]) == ("round", "update round t")
    assert (encoding["y"]["field"], encoding["y"]["title"]) == ("mae", "MAE")
    assert encoding["color"]["field"] == "method"
    assert "strokeDash" not in encoding  # by revision in `dvc plots diff`; an image has one revision


def revision_channels(node) -> list[str]:
    if isinstance(node, list):
        return [c for v in node for c in revision_channels(v)]
    if not isinstance(node, dict):
        return []
    found = [
        c for c, v in (node.get("encoding") or {}).items() if isinstance(v, dict) and v.get("field") == "rev"
    ]
    return found + [c for v in node.values() for c in revision_channels(v)]


def test_vega_lite_spec_drops_revision_channels_in_layers_too():
    """DVC's own `linear` template colours by revision in nested layers; its image still draws."""
    definition = PlotDefinition("loss", "loss.csv", "step", "loss", {"template": "linear"})
    rows = [{"step": str(s), "loss": str(1 / s)} for s in range(1, 6)]
    spec = vega_lite_spec(definition, rows, REPO / TEMPLATE_DIR)
    assert revision_channels(spec["layer"]) == [] and revision_channels(spec) == []
    assert "<path" in render_svg(spec)


def test_vega_lite_spec_unknown_template_is_a_config_error():
    definition = PlotDefinition("mae", "mae.csv", "round", "mae", {"template": "no_such_template"})
    with pytest.raises(ConfigError, match=r"dvc.yaml: plots \(mae\): .*no_such_template"):
        vega_lite_spec(definition, [{"round": "0", "mae": "1"}], REPO / TEMPLATE_DIR)


# ---- the stage: images, same bytes, one-line errors


def lines_by_method(svg: str) -> int:
    return svg.count('aria-roledescription="line mark"')


def test_stage_writes_one_svg_per_plot_with_a_line_and_legend_entry_per_method(tmp_path, monkeypatch):
    scratch_project(
        tmp_path,
        [
            {"plots/mae_by_round.csv": MAE_PLOT},
            {"mae_two": {**MAE_PLOT, "y": {"other/mae_by_round.csv": "mae"}, "title": "Two"}},
        ],
        {"plots/mae_by_round.csv": mae_csv(), "other/mae_by_round.csv": mae_csv(METHODS[:2])},
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(plots_main, [])
    assert result.exit_code == 0, result.output
    images = sorted(p.name for p in (tmp_path / "plots" / "images").iterdir())
    assert images == ["mae_by_round.svg", "mae_two.svg"]
    first = (tmp_path / "plots/images/mae_by_round.svg").read_text(encoding="utf-8")
    second = (tmp_path / "plots/images/mae_two.svg").read_text(encoding="utf-8")
    assert first.startswith("<svg") and lines_by_method(first) == 3 and lines_by_method(second) == 2
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", first)
    assert set(METHODS) <= set(texts) and "MAE by round" in texts and "update round t" in texts
    assert "Two" in re.findall(r"<text[^>]*>([^<]*)</text>", second)
    assert "workspace" not in texts and "revision" not in texts


def test_stage_writes_the_same_bytes_in_another_process(tmp_path):
    """Same inputs, same bytes: in-process and in a fresh interpreter (vl-convert's own fonts, no system's)."""
    scratch_project(tmp_path, [{"mae.csv": MAE_PLOT}], {"mae.csv": mae_csv()})
    definition = plot_definitions(yaml.safe_load((tmp_path / "dvc.yaml").read_text()))[0]
    in_process = render_svg(
        vega_lite_spec(definition, read_plot_rows(tmp_path / "mae.csv", definition), tmp_path / TEMPLATE_DIR)
    )
    assert in_process == render_svg(
        vega_lite_spec(definition, read_plot_rows(tmp_path / "mae.csv", definition), tmp_path / TEMPLATE_DIR)
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "stages.plots",
            "--dvc-yaml",
            str(tmp_path / "dvc.yaml"),
            "--out",
            str(tmp_path / "images"),
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    assert (tmp_path / "images" / "mae.svg").read_text(encoding="utf-8") == in_process


def test_stage_bad_input_is_one_line(tmp_path, monkeypatch):
    scratch_project(tmp_path, [{"mae.csv": MAE_PLOT}], {"mae.csv": "method,round\ndeeper,0\n"})
    monkeypatch.chdir(tmp_path)
    one_line_error(CliRunner().invoke(plots_main, []), "mae.csv:1: no column 'mae'")
    one_line_error(CliRunner().invoke(plots_main, ["--dvc-yaml", "none.yaml"]), "none.yaml: missing")


def test_a_plot_without_any_data_file_is_skipped_and_said(tmp_path, monkeypatch):
    """A knob that leaves no validation pairs (or no pairs) writes fewer training-curve files: the stage draws
    what exists and skips, with one printed line, a plot that has nothing; `dvc repro` goes on."""
    scratch_project(tmp_path, [{"mae.csv": MAE_PLOT}], {"mae.csv": "method,round,mae\ndeeper,0,0.9\n"})
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mae.csv").unlink()
    result = CliRunner().invoke(plots_main, ["--out", "images"])
    assert result.exit_code == 0, result.output
    assert "skipped mae.svg: no data file (mae.csv)" in result.output
    assert not (tmp_path / "images" / "mae.svg").exists()


# ---- the repository: dvc.yaml's `plots` stage, the committed images and the offline page


def repo_definitions() -> list[PlotDefinition]:
    return plot_definitions(yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8")))


def test_plots_stage_depends_on_every_plot_file_and_template():
    """DVC tracks neither dvc.yaml nor .dvc/plots/ as a folder: the stage lists each file, and this keeps the
    list whole (a plot added without its files in the deps would never re-render)."""
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]["plots"]
    deps = set(stage["deps"])
    definitions = repo_definitions()
    assert {"plots/mae_by_round.csv", "plots/headroom.csv"} <= {d.path for d in definitions}
    assert "plots/train/it2/plots/metrics/eval/loss.tsv" in {p for d in definitions for p in d.paths}
    for definition in definitions:
        for path in definition.paths:  # a file, or the training curves' folder (train@k's output) holding it
            covered = path in deps or any(
                path.startswith(f"{d}/") for d in deps if d.startswith("plots/train/")
            )
            assert covered, f"add {path} to the deps of stage `plots` in dvc.yaml"
        template = definition.properties.get("template")
        if (REPO / TEMPLATE_DIR / f"{template}.json").is_file():
            assert f"{TEMPLATE_DIR.as_posix()}/{template}.json" in deps, (
                f"add template {template} to stage plots"
            )
    assert stage["outs"] == [{"plots/images": {"cache": False}}]


def test_committed_images_are_what_the_stage_makes_from_the_committed_files():
    """After editing a plot's title or labels in dvc.yaml (which DVC does not track): `dvc repro -f plots`."""
    for definition in repo_definitions():
        rows = {path: read_plot_rows(REPO / path, definition) for path in definition.paths}
        image = REPO / "plots" / "images" / definition.image
        assert image.is_file(), f"{image} missing: run `dvc repro plots`"
        fresh = render_svg(vega_lite_spec(definition, rows, REPO / TEMPLATE_DIR))
        assert image.read_text(encoding="utf-8") == fresh, f"{image} is stale: run `dvc repro -f plots`"


def test_dvc_config_points_dvc_plots_show_at_the_committed_offline_page():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    assert REPO / ".dvc" / config["plots"]["html_template"] == REPO / OFFLINE_PAGE


def test_committed_offline_page_is_what_the_script_builds():
    """From the pinned vl-convert-python: re-run scripts/build_offline_plots_page.py after changing the pin."""
    page = (REPO / OFFLINE_PAGE).read_text(encoding="utf-8")
    assert page == build_offline_page(), "stale: run python scripts/build_offline_plots_page.py"
    assert "{plot_divs}" in page and "{scripts}" not in page  # where DVC puts its CDN <script> tags
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "window.vegaEmbed=" in page and "Vega-Lite 5.21" in page


def test_offline_page_refuses_a_bundle_holding_a_dvc_placeholder():
    """DVC fills the page with str.replace: a placeholder inside the JavaScript would be replaced too."""
    assert '<script type="text/javascript">var a=1;</script>' in offline_page("var a=1;", "made by a test")
    for placeholder in ("{scripts}", "{plot_divs}", "{refresh_tag}"):
        with pytest.raises(ValueError, match=re.escape(placeholder)):
            offline_page(f"var a='{placeholder}';", "made by a test")

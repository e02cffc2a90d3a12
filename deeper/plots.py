"""The plots of dvc.yaml drawn without a browser or a network: SVG images for the README, and the page that
`dvc plots show` / `dvc plots diff` fill (.dvc/config `[plots] html_template`).

One pinned package draws both: vl-convert-python (pyproject.toml) renders Vega-Lite to SVG in-process, and its
JavaScript bundle (Vega, Vega-Lite and Vega-Embed, minified) is what the offline page carries inline.
VEGA_LITE_VERSION picks the Vega-Lite of both, so the page and the images draw the same chart. The images fill
the templates of .dvc/plots with dvc_render, as `dvc plots show` does, from the plot definitions of dvc.yaml:
adding a plot there (and its files to the `plots` stage's deps) adds its image.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

from deeper.errors import ConfigError, InputError

# DVC's own templates and .dvc/plots/*.json are Vega-Lite v5 specs; 5.21 is the last v5 that vl-convert ships.
VEGA_LITE_VERSION = "5.21"
TEMPLATE_DIR = Path(".dvc/plots")
# .dvc/config: `html_template = plots/offline.html` (DVC resolves it relative to .dvc/).
OFFLINE_PAGE = TEMPLATE_DIR / "offline.html"
# The revision name `dvc plots show` gives the files on disk; an image has this one revision only.
WORKSPACE = "workspace"
DATA_SUFFIXES = {".csv": ",", ".tsv": "\t"}
# DVC's plot properties (dvc.schema.PLOT_PROPS) that an image honours besides x and y; `header` (files without
# one) it does not.
PROPERTIES = ("template", "title", "x_label", "y_label")
# DVC replaces these with its CDN script tags, the plots and a refresh tag; the page leaves out the first.
PAGE_PLACEHOLDERS = ("{scripts}", "{plot_divs}", "{refresh_tag}")


@dataclass(frozen=True)
class PlotDefinition:
    """One entry of dvc.yaml's top-level `plots:` with a single data file and field."""

    name: str  # the image's file stem: the plot's id, or its data file's stem
    path: str  # the (first) data file (CSV or TSV), relative to dvc.yaml's folder
    x: str
    y: str  # the y field (the same in every file)
    properties: dict = field(default_factory=dict)  # PROPERTIES as written
    # every data file of an id plot `y: {<file>: <field>, <file>: <field>, ...}`, one line each (DVC's overlay:
    # the training curves of both iterations on train and validation pairs); () for one file
    more_paths: tuple = ()

    @property
    def paths(self) -> tuple:
        return (self.path, *self.more_paths)

    @property
    def image(self) -> str:
        return f"{self.name}.svg"


def _field_of(value, key: str, path: str | None, source: str) -> tuple[str | None, str]:
    """A field given as `name` or (id form) as `{file: name}`: (file or None, name)."""
    if isinstance(value, str) and value:
        return None, value
    if isinstance(value, dict) and len(value) == 1:
        ((file, name),) = value.items()
        if isinstance(name, str) and name and (path is None or file == path):
            return str(file), name
    raise ConfigError(
        key,
        f"must be one field name or {{file: field}} with one file and one field"
        f"{'' if path is None else f' ({path})'}, got {value!r}",
        source,
    )


def plot_definitions(dvc_yaml: dict, source: str = "dvc.yaml") -> list[PlotDefinition]:
    """The top-level `plots:` of a parsed dvc.yaml, in DVC's two forms for one file:
    `- <file>: {x: field, y: field, ...}` (image named after the file's stem) and
    `- <id>: {x: field, y: {<file>: field}, ...}` (image named after the id)."""
    entries = dvc_yaml.get("plots") or []
    if not isinstance(entries, list):
        raise ConfigError("plots", f"must be a list of plot definitions, got {entries!r}", source)
    definitions: list[PlotDefinition] = []
    for i, entry in enumerate(entries):
        if not (isinstance(entry, dict) and len(entry) == 1 and isinstance(next(iter(entry.values())), dict)):
            raise ConfigError(
                f"plots[{i}]", f"must be `<file or id>: {{x: ..., y: ...}}`, got {entry!r}", source
            )
        ((key, props),) = entry.items()
        where = f"plots[{i}].{key}"
        unknown = sorted(set(props) - {"x", "y", *PROPERTIES})
        if unknown:
            raise ConfigError(
                where, f"the images do not draw {unknown}; keys: x, y, {', '.join(PROPERTIES)}", source
            )
        y_value = props.get("y")
        more_paths: tuple[str, ...] = ()
        if isinstance(y_value, dict) and len(y_value) > 1:
            fields = set(y_value.values())
            if len(fields) != 1 or not all(isinstance(f, str) and f for f in fields):
                raise ConfigError(
                    f"{where}.y", f"the images overlay files with one y field, got {y_value!r}", source
                )
            (_, *rest), y_value = list(y_value), {next(iter(y_value)): fields.pop()}
            more_paths = tuple(str(p) for p in rest)
            for extra in more_paths:
                if Path(extra).suffix not in DATA_SUFFIXES:
                    raise ConfigError(
                        where, f"the images read {' and '.join(DATA_SUFFIXES)} files, got {extra}", source
                    )
        file, y = _field_of(y_value, f"{where}.y", None, source)
        path = file or str(key)
        _, x = _field_of(props.get("x"), f"{where}.x", path, source)
        if Path(path).suffix not in DATA_SUFFIXES:
            raise ConfigError(
                where, f"the images read {' and '.join(DATA_SUFFIXES)} files, got {path}", source
            )
        name = str(key) if file else Path(path).stem
        properties = {k: props[k] for k in PROPERTIES if k in props}
        definitions.append(
            PlotDefinition(name=name, path=path, x=x, y=y, properties=properties, more_paths=more_paths)
        )
    names = [d.name for d in definitions]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(
            "plots",
            f"two plots make the image {twice[0]}.svg: give one an id (`- <id>: {{y: {{<file>: <field>}}}}`)",
            source,
        )
    return definitions


def read_plot_rows(path: Path, definition: PlotDefinition) -> list[dict[str, str]]:
    """The data file's rows as DVC reads them (header line, values as text), checked for the plot's fields."""
    if not path.is_file():
        raise InputError(path, f"missing: the data of plot {definition.name} in dvc.yaml")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter=DATA_SUFFIXES[path.suffix])
        header = next(reader, None)
        if not header:
            raise InputError(path, "empty: no header line", 1)
        for column in (definition.x, definition.y):
            if column not in header:
                raise InputError(
                    path,
                    f"no column {column!r} (plot {definition.name} in dvc.yaml); header: {','.join(header)}",
                    1,
                )
        rows = []
        for line, values in enumerate(reader, start=2):
            if len(values) != len(header):
                raise InputError(path, f"{len(values)} fields, the header has {len(header)}", line)
            rows.append(dict(zip(header, values)))
    if not rows:
        raise InputError(path, "no rows to plot", 2)
    return rows


def _without_revision_channels(node):
    """Drop encodings by revision (colour or dash per `rev`): an image has one, which would be a legend of one."""
    if isinstance(node, list):
        return [_without_revision_channels(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _without_revision_channels(v) for k, v in node.items()}
    if isinstance(out.get("encoding"), dict):
        out["encoding"] = {
            channel: enc
            for channel, enc in out["encoding"].items()
            if not (isinstance(enc, dict) and enc.get("field") == "rev")
        }
    return out


def _filled_template(
    definition: PlotDefinition, by_rev: dict[str, dict[str, list[dict[str, str]]]], template_dir: Path
) -> dict:
    """The plot's template filled by dvc_render from {revision: {file: rows}}: each row tagged with its revision
    (`rev`), its file's short name (DVC's: the files' common folder dropped) and the y field, as DVC tags them."""
    from dvc_render.exceptions import DvcRenderError
    from dvc_render.vega import VegaRenderer

    paths = list(dict.fromkeys(p for by_file in by_rev.values() for p in by_file))
    prefix = len(os.path.commonpath(paths)) if len(paths) > 1 else 0
    short = {p: p[prefix:].strip("/\\") for p in paths}
    datapoints = [
        {**row, "rev": rev, "filename": short[p], "field": definition.y}
        for rev, by_file in by_rev.items()
        for p in by_file
        for row in by_file[p]
    ]
    extra = (
        {"anchors_y_definitions": [{"filename": short[p], "field": definition.y} for p in paths]}
        if len(paths) > 1
        else {}
    )
    try:
        renderer = VegaRenderer(
            datapoints,
            definition.path,
            template_dir=str(template_dir),
            x=definition.x,
            y=definition.y,
            **definition.properties,
            **extra,
        )
        return renderer.get_filled_template()
    except DvcRenderError as e:
        raise ConfigError(f"plots ({definition.name})", str(e), "dvc.yaml") from None


def vega_lite_spec(
    definition: PlotDefinition,
    rows: list[dict[str, str]] | dict[str, list[dict[str, str]]],
    template_dir: Path,
) -> dict:
    """The plot's template filled as `dvc plots show` fills it for the workspace, less the revision channels.
    `rows`: read_plot_rows of the one file, or {file: rows} of every file of an overlay (DVC's short names:
    the files' common folder dropped)."""
    by_file = rows if isinstance(rows, dict) else {definition.path: rows}
    return _without_revision_channels(_filled_template(definition, {WORKSPACE: by_file}, template_dir))


# The legend of a line style by revision: a solid or dashed stroke. Vega's default symbol, a filled circle, looks
# the same for every revision, and Vega-Lite gives a line-with-points legend a transparent stroke, which only an
# encode block overrides (symbolStrokeColor does not).
DASH_LEGEND = {
    "symbolType": "stroke",
    "symbolSize": 400,
    "symbolStrokeWidth": 2,
    "encode": {"symbols": {"update": {"stroke": {"value": "black"}}}},
}


def _revisions_in_order(node, revisions: list[str]):
    """Each encoding by revision sorted as `revisions` (base before head) instead of by name, so the legend
    reads old then new and the first revision keeps the solid line; a line style's legend draws the stroke."""
    if isinstance(node, list):
        return [_revisions_in_order(v, revisions) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _revisions_in_order(v, revisions) for k, v in node.items()}
    if isinstance(out.get("encoding"), dict):
        out["encoding"] = {
            channel: (
                {
                    **enc,
                    "sort": list(revisions),
                    **({"legend": DASH_LEGEND} if channel == "strokeDash" else {}),
                }
                if isinstance(enc, dict) and enc.get("field") == "rev"
                else enc
            )
            for channel, enc in out["encoding"].items()
        }
    return out


def vega_lite_diff_spec(
    definition: PlotDefinition, rows_by_rev: dict[str, dict[str, list[dict[str, str]]]], template_dir: Path
) -> dict:
    """The plot's template filled as `dvc plots diff` fills it: {revision: {file: rows}} (a revision may lack a
    file), every row tagged with its revision, and the templates' revision channels (line dash, colour, offset)
    kept, so old and new share one chart; revisions in the order given."""
    return _revisions_in_order(_filled_template(definition, rows_by_rev, template_dir), list(rows_by_rev))


def render_svg(spec: dict) -> str:
    """SVG of a Vega-Lite spec, in-process (vl-convert's own Vega and its bundled Liberation Sans fonts, so the
    bytes do not depend on the machine's fonts)."""
    import vl_convert

    return vl_convert.vegalite_to_svg(spec, vl_version=VEGA_LITE_VERSION)


def offline_page(bundle: str, provenance: str) -> str:
    """DVC's page for `dvc plots show` with Vega, Vega-Lite and Vega-Embed inline instead of its CDN tags.

    DVC fills a template with str.replace, so the bundle must hold none of its placeholders; the page leaves
    out the one for scripts, where DVC puts its CDN tags."""
    for placeholder in PAGE_PLACEHOLDERS:
        if placeholder in bundle or placeholder in provenance:
            raise ValueError(f"the JavaScript bundle holds DVC's placeholder {placeholder}")
    return (
        '<!DOCTYPE html>\n<html>\n<head>\n    {refresh_tag}\n    <meta charset="utf-8">\n'
        "    <title>DVC Plot</title>\n"
        f"    <!-- {provenance} -->\n"
        f'    <script type="text/javascript">{bundle}</script>\n'
        "    <style>\n        table {\n            border-spacing: 15px;\n        }\n    </style>\n"
        "</head>\n<body>\n    {plot_divs}\n</body>\n</html>\n"
    )


def build_offline_page() -> str:
    """The offline page from the installed vl-convert-python (pinned in pyproject.toml)."""
    import vl_convert

    provenance = (
        f"Offline page for dvc plots show / diff: Vega {vl_convert.get_vega_version()}, "
        f"Vega-Lite {VEGA_LITE_VERSION}, Vega-Embed {vl_convert.get_vega_embed_version()} inline, "
        f"the javascript_bundle of vl-convert-python {version('vl-convert-python')}; "
        f"made by scripts/build_offline_plots_page.py"
    )
    bundle = vl_convert.javascript_bundle(  # type: ignore[call-arg]  # stub: snippet required; default None
        vl_version=VEGA_LITE_VERSION
    )
    return offline_page(bundle, provenance)

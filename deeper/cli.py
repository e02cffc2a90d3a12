"""The `deeper` command: use the trained refiner on live users (deeper.serve) and review their personas.

deeper refine new_ratings/ --format movielens_csv --domain movielens --item-type movie
deeper show 42 --html user42.html --markdown user42.md
deeper store check personas.duckdb
deeper store export personas.duckdb backups/2024-06-01
deeper store import backups/2024-06-01 personas.duckdb
"""

from __future__ import annotations

import json

import click
import yaml

from deeper.config import get, load_params
from deeper.data.readers import READERS
from deeper.errors import ConfigError
from deeper.serve import DEFAULT_STORE, SHOWN_WAITING
from stages._cli import PARAMS_OPTION, user_errors

_ABSENT = object()
STORE_OPTION = click.option(
    "--store",
    default=DEFAULT_STORE,
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The persona store (a DuckDB file; created by the first refine).",
)


def parse_overrides(pairs: tuple[str, ...]) -> dict:
    """`-S key=value` pairs as {dotted key: value}; the value is read as YAML (numbers, null, {a: b}, ...)."""
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(pair, "an override is key=value, e.g. -S window.size=5", "-S")
        try:
            out[key.strip()] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(key, f"value is not YAML: {str(e).splitlines()[0]}", "-S") from None
    return out


def checked_params(path: str, overrides: tuple[str, ...]) -> dict:
    """params.yaml with the -S overrides applied, checked by the one params validator (deeper.validate)."""
    from deeper.profile import apply_profile
    from deeper.validate import check_params

    params = load_params(path)
    entries = parse_overrides(overrides)
    for key in entries:
        parent = key.rpartition(".")[0]
        if parent and not isinstance(get(params, parent, _ABSENT), dict):
            raise ConfigError(key, f"{parent} is not a block of {path}", "-S")
    params = apply_profile(params, entries)
    check_params(params, every_block=False)
    return params


@click.group(
    help="Use the trained DEEPER refiner on live users: keep their personas current as new ratings "
    "arrive (`deeper refine`), show a user's persona history (`deeper show`), and check, back up "
    "and restore the persona store (`deeper store`)."
)
def main():
    pass


@main.command(
    help="""Refine the personas of the users in a file of new ratings and record each new round.

RATINGS is a file or folder in any format the ingest stage reads (--format; the same validation: a bad row
stops the run with one line naming file and row, and nothing is written). Each user's new ratings follow the
ones waiting in the store and are cut, in time order, into windows of params `window.size`. A user new to the
store first gets S_0 from the frozen model (from the first full window); every further window is predicted with
the current persona (frozen model) and the persona is refined from the gap by the policy + adapter. A user
with fewer ratings than a window waits: the ratings are kept in the store until a later file completes it
(counted and printed). Ratings already in the store are skipped, so re-running a file adds nothing.

Model calls go through the response cache: a killed run started again redoes only unfinished calls. Backends
and settings come from params.yaml (models.frozen, models.policy, persona, predict, evaluate.sampling), each
overridable with -S key=value (a YAML value), e.g. -S window.size=5 or
-S 'models.policy={backend: openai, name: M, base_url: "http://127.0.0.1:8000/v1"}'."""
)
@click.argument("ratings", type=click.Path())
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(list(READERS)),
    help="The reader (as in params ingest.presets), e.g. movielens_csv: a folder with ratings.csv "
    "(userId,movieId,rating,timestamp) and movies.csv (movieId,title).",
)
@click.option("--meta", default=None, type=click.Path(), help="The titles file, for formats that have one.")
@click.option("--domain", default=None, help="The domain of these ratings (not for deeper_windows).")
@click.option(
    "--item-type", default=None, help="What the items are, as the prompts name them (movie, book, ...)."
)
@STORE_OPTION
@click.option(
    "--adapter",
    default=None,
    help="The trained LoRA adapter on models.policy; with the openai backend, the name the server serves "
    "it under (vLLM: --lora-modules NAME=folder). Default: the weights of the first evaluation "
    "method, the reference (params evaluate.methods.deeper.weights: models/adapters/it2, Model 2 of the run).",
)
@click.option("--no-adapter", is_flag=True, help="Refine with the untrained policy (no adapter).")
@PARAMS_OPTION
@click.option(
    "-S",
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a params key (YAML value), e.g. -S window.size=5; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@user_errors
def refine(
    ratings, fmt, meta, domain, item_type, store, adapter, no_adapter, params_path, overrides, as_json
):
    from deeper.serve import input_source, refine_users

    params = checked_params(params_path, overrides)
    source = input_source(fmt, ratings, meta, domain, item_type)
    summary = refine_users(
        params,
        source,
        store,
        adapter,
        use_adapter=not no_adapter,
        log=lambda line: click.echo(line, err=True),
    )
    if as_json:
        click.echo(json.dumps(summary, indent=1, sort_keys=True, default=str))
        return
    dropped = {k: v for k, v in summary["ingest"]["dropped"].items() if v}
    click.echo(
        f"{summary['ratings_in_file']} ratings of {summary['users_in_file']} users read"
        + (f" (skipped by the reader: {dropped})" if dropped else "")
    )
    click.echo(
        f"{summary['ratings_new']} new, {summary['ratings_already_in_store']} already in the store (skipped)"
    )
    click.echo(
        f"{summary['rounds_written']} rounds written for {summary['users_updated']} users "
        f"({summary['users_new']} new to the store got S_0) in {store}"
    )
    waiting = summary["waiting"]
    if waiting:
        shown = ", ".join(f"{user} has {n}" for user, n in list(waiting.items())[:SHOWN_WAITING])
        more = f", ... ({len(waiting) - SHOWN_WAITING} more)" if len(waiting) > SHOWN_WAITING else ""
        click.echo(
            f"{len(waiting)} users wait for a full window of {summary['window_size']} ratings: {shown}{more}"
        )
    at_limit = summary.get("stopped_at_limit", {})
    if any(at_limit.values()):  # a cut persona is stored as written: say so, with the knob that avoids it
        click.echo(
            f"{at_limit['s0']} S_0 and {at_limit['refinements']} refinements stopped at their token limit "
            f"(cut short; raise persona.max_new_tokens / evaluate.sampling.max_new_tokens)"
        )
    for role, stats in summary.get("calls", {}).items():
        healed = (
            f" (its cache file was damaged: replaced, {stats['cache_salvaged']} answers salvaged)"
            if stats.get("cache_healed")
            else ""
        )
        click.echo(
            f"{role} model: {stats['cache_misses']} calls made, {stats['cache_hits']} answered by the cache"
            + healed
        )


@main.command(
    help="""Show one user's persona history: every round's persona with a word-level diff to the
previous one (deleted words struck through, new ones marked), the error of the previous persona on the window it
was refined on (MAE before), the persona's length, and the window's items with predicted and actual ratings.
Writes a self-contained HTML page (--html) and/or Markdown (--markdown); with neither, Markdown to stdout."""
)
@click.argument("user")
@STORE_OPTION
@click.option("--domain", default=None, help="The user's domain, when the id is in several.")
@click.option(
    "--html", "html_path", default=None, type=click.Path(dir_okay=False), help="Write the HTML page here."
)
@click.option(
    "--markdown", "md_path", default=None, type=click.Path(dir_okay=False), help="Write Markdown here."
)
@user_errors
def show(user, store, domain, html_path, md_path):
    from deeper.history import render_html, render_markdown
    from deeper.outputs import write_text
    from deeper.store import PersonaStore

    rows = PersonaStore(store).history(user, domain)
    for path, render in ((html_path, render_html), (md_path, render_markdown)):
        if path is not None:
            write_text(path, render(rows))
            click.echo(f"wrote {path}: {len(rows)} rounds of user {user}", err=True)
    if html_path is None and md_path is None:
        click.echo(render_markdown(rows), nl=False)


@main.group(
    help="""Check, back up and restore the persona store (deeper.store_tools). A damaged store makes every
command print one line naming the two ways back: `deeper store import` of the last export, or the rating files
replayed with `deeper refine` in their original order (docs/refiner.md, "Damage, backups and replay")."""
)
def store():
    pass


@store.command(
    "check",
    help="""Read every block of STORE back (every column of every row, and on a temporary
copy every index) and print its row counts and, per domain, its users, rounds and waiting ratings. Exit 0 when
sound; 1 with one line naming the damage and the ways back when DuckDB finds a block that does not read back.""",
)
@click.argument("store_path", metavar="STORE", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@user_errors
def store_check(store_path, as_json):
    from deeper.store_tools import check_lines, check_store

    report = check_store(store_path)
    if as_json:
        click.echo(json.dumps(report, indent=1, sort_keys=True))
        return
    for line in check_lines(report):
        click.echo(line)


@store.command(
    "export",
    help="""Write every table of STORE to Parquet in DIR (personas.parquet, pending.parquet)
with manifest.json (schema version, row counts, columns, sha256 of each file): a backup any Parquet reader opens
(DuckDB, pandas, polars, pyarrow). DIR must be new or empty (--force replaces it once the new export is whole).""",
)
@click.argument("store_path", metavar="STORE", type=click.Path(dir_okay=False))
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Replace DIR if it holds files.")
@user_errors
def store_export(store_path, folder, force):
    from deeper.store_tools import export_store

    manifest = export_store(store_path, folder, force)
    counts = ", ".join(f"{t} {e['rows']} rows" for t, e in manifest["tables"].items())
    click.echo(f"exported {store_path} to {folder}: {counts} (schema version {manifest['schema_version']})")


@store.command(
    "import",
    help="""Restore a store from DIR (a `deeper store export`) into STORE, after checking
its manifest, schema version, each file's sha256, columns and row count. STORE must not exist: --force replaces
it, keeping the old file renamed beside it (STORE.replaced-<time>). The new store is built beside STORE and moved
into place only when whole.""",
)
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.argument("store_path", metavar="STORE", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing STORE (kept, renamed).")
@user_errors
def store_import(folder, store_path, force):
    from deeper.store_tools import import_store

    done = import_store(folder, store_path, force)
    counts = ", ".join(f"{t} {n} rows" for t, n in done["tables"].items())
    click.echo(
        f"imported {folder} (exported {done['exported_at']}) into {store_path}: {counts}"
        + (f"; the store it replaced is kept as {done['replaced']}" if done["replaced"] else "")
    )


if __name__ == "__main__":
    main()

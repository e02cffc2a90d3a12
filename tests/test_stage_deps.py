"""Every repository module a stage imports is a DVC dependency of that stage, so a change to it re-runs the
stage instead of leaving results that the new code would not write (results never change silently).

Exempt: package markers, and modules that cannot change an output (stages/_cli.py prints errors and checks
params; deeper/errors.py holds the messages): a change there either stops a stage or changes nothing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO

EXEMPT = {"deeper/__init__.py", "stages/__init__.py", "stages/_cli.py", "deeper/errors.py"}
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def imported_files(module: str) -> list[str]:
    code = (
        f"import sys, {module}; root = {str(REPO)!r} + '/'; print('\\n'.join(sorted(m.__file__[len(root):] "
        "for m in list(sys.modules.values()) if (getattr(m, '__file__', None) or '').startswith(root))))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.split() if not f.startswith(".venv/")]


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_stage_depends_on_every_module_it_imports(stage):
    body = STAGES[stage].get("do", STAGES[stage])
    module = next(word for word in body["cmd"].split() if word.startswith("stages."))
    deps = [str(d).rstrip("/") for d in body["deps"]]
    files = imported_files(module)
    assert f"{module.replace('.', '/')}.py" in files
    missing = [f for f in files if f not in EXEMPT and not any(f == d or f.startswith(d + "/") for d in deps)]
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {missing}"

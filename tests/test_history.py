"""`deeper show`: a user's persona history as Markdown and as a self-contained HTML page, checked in headless
Chromium (Debian's `chromium`): the DOM it builds and a screenshot of what it draws."""

from __future__ import annotations

import shutil
import subprocess
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner

from deeper.cli import main
from deeper.history import render_html, render_markdown, word_diff
from deeper.store import PersonaStore, Rating, UserState, window_key
from tests.conftest import one_line_error
from tests.png_pixels import png_colours

CHROMIUM = shutil.which("chromium")
PERSONAS = [
    "Likes quiet dramas & <b>old</b> films; dislikes loud action.",
    "Likes quiet dramas & <b>old</b> films and slow westerns; loves loud action.",
    'Likes <script>alert("x")</script> quiet dramas and slow westerns; loves loud action.',
]


def round_row(user: str, rnd: int, persona: str, domain: str = "movielens") -> dict:
    window = [
        Rating(f"i{rnd}{k}", f"Title {rnd}{k} <i>|pipe|</i>", float(1 + k), 100 * rnd + k) for k in range(3)
    ]
    refined = rnd > 0
    return {
        "domain": domain,
        "user_id": user,
        "round": rnd,
        "item_type": "movie",
        "persona": persona,
        "persona_words": len(persona.split()),
        "persona_tokens": 7 + rnd,
        "writer": "refine" if refined else "init",
        "window_key": window_key(window),
        "item_ids": [r.item_id for r in window],
        "titles": [r.title for r in window],
        "ts": [r.ts for r in window],
        "actual": [r.rating for r in window],
        "predicted": [2.5, 2.0, 3.25] if refined else None,
        "mae_before": 0.75 if refined else None,
        "predict_failed_items": 0 if refined else None,
        "update_failure": None,
        "update_flag": None,
        "frozen_fingerprint": "sha256:frozen",
        "policy_fingerprint": "sha256:policy;adapter=sha256:a" if refined else None,
        "adapter": "models/adapters/it2" if refined else None,
        "adapter_fingerprint": "sha256:a" if refined else None,
        "created_at": datetime(2026, 12, 1, 12, rnd),
    }


@pytest.fixture
def store(tmp_path) -> Path:
    path = tmp_path / "store.duckdb"
    rows = [round_row("7", r, p) for r, p in enumerate(PERSONAS)] + [
        round_row("8", 0, "x", "books"),
        round_row("8", 0, "y", "movielens"),
    ]
    users = {(r["domain"], r["user_id"]): UserState(r["domain"], r["user_id"]) for r in rows}
    waiting = {("movielens", "7"): [("movie", Rating("w1", "Waiting", 4.0, 999))]}
    PersonaStore(path).write(users, rows, waiting)
    return path


def test_word_diff_marks_deleted_and_inserted_words():
    assert word_diff("a b c d", "a x c d e") == [
        ("same", "a"),
        ("del", "b"),
        ("ins", "x"),
        ("same", "c d"),
        ("ins", "e"),
    ]
    assert word_diff("same  text\n", "same text") == [("same", "same text")]


def test_markdown_escapes_the_text_and_marks_the_diff(store):
    result = CliRunner().invoke(main, ["show", "7", "--store", str(store)])
    assert result.exit_code == 0, result.output
    md = result.output
    assert md.startswith("# Persona history of user 7 (movielens)\n")
    assert "| 1 | refine | 0.750 | 12 | 8 | 2026-12-01 12:01:00 |" in md
    assert "| 0 | init | - |" in md
    assert "1 newer ratings wait for a full window." in md
    assert r"\<b\>old\</b\>" in md and "<b>" not in md and "<script>" not in md
    assert r"Title 10 \<i\>\|pipe\|\</i\> | 1 | 2.50 |" in md
    assert r"\<b\>old\</b\> ~~films; dislikes~~ **films and slow westerns; loves** loud action." in md
    assert md == render_markdown(PersonaStore(store).history("7"))


def test_show_refuses_an_unknown_or_ambiguous_user(store, tmp_path):
    runner = CliRunner()
    one_line_error(runner.invoke(main, ["show", "99", "--store", str(store)]), "no user '99'")
    one_line_error(runner.invoke(main, ["show", "8", "--store", str(store)]), "books, movielens", "--domain")
    assert "(books)" in runner.invoke(main, ["show", "8", "--store", str(store), "--domain", "books"]).output
    one_line_error(
        runner.invoke(main, ["show", "7", "--store", str(tmp_path / "none.duckdb")]), "deeper refine"
    )


def test_the_html_page_is_self_contained_and_escaped(store, tmp_path):
    page = tmp_path / "u7.html"
    result = CliRunner().invoke(main, ["show", "7", "--store", str(store), "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    assert text == render_html(PersonaStore(store).history("7"))
    assert "<script" not in text and "src=" not in text and "href=" not in text and "@import" not in text
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in text
    assert "<del>films; dislikes</del> <ins>films and slow westerns; loves</ins>" in text
    assert (
        "<summary>the persona as written</summary>Likes &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; quiet "
        "dramas and slow westerns; loves loud action.</details>"
    ) in text


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    return subprocess.run([CHROMIUM, *flags, *args], check=False, capture_output=True, text=True, timeout=180)


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install -y chromium)"
)
def test_the_html_page_in_headless_chromium(store, tmp_path):
    page = tmp_path / "u7.html"
    assert CliRunner().invoke(main, ["show", "7", "--store", str(store), "--html", str(page)]).exit_code == 0
    dom = chromium("--dump-dom", page.as_uri(), profile=tmp_path / "profile1")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    for rnd in range(3):
        assert f'<section id="round-{rnd}"><h2>Round {rnd}</h2>' in html
    # the diff is markup the browser kept
    assert "<del>films; dislikes</del> <ins>films and slow westerns; loves</ins>" in html
    assert "<script>" not in html and "&lt;script&gt;" in html  # the persona's markup stayed text
    assert "Likes quiet dramas &amp; &lt;b&gt;old&lt;/b&gt; films; dislikes loud action." in html

    shot = tmp_path / "shot.png"
    result = chromium(
        f"--screenshot={shot}",
        "--window-size=1000,1400",
        "--hide-scrollbars",
        page.as_uri(),
        profile=tmp_path / "profile2",
    )
    assert result.returncode == 0 and shot.is_file(), result.stderr[-2000:]
    counts = png_colours(shot)
    assert sum(counts.values()) == 1000 * 1400
    colours = {colour[:3] for colour in counts}
    assert len(colours) > 20  # text was drawn, not one blank colour
    # the diff's highlights are on screen: del's red-ish background (#fdd), ins's green-ish one (#dfd)
    assert (255, 221, 221) in colours and (221, 255, 221) in colours

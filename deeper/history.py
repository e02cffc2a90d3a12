"""One user's persona history for a reviewer (`deeper show USER`): Markdown and a self-contained HTML page.

Per round: who wrote the persona (S_0 by the frozen model, or a refinement by the policy + adapter), the error
of the previous persona on the window it was refined on (`mae_before`), the persona's length in words and
tokens, the window (items, predicted and actual ratings), and the persona as a word-level diff to the previous
round (difflib over whitespace-separated words: deleted words struck through, inserted words marked).
All text from the store is escaped (HTML: html.escape; Markdown: its punctuation backslash-escaped), so a
persona or title holding markup shows as text. The HTML page has no external asset: styles inline, no script.
"""

from __future__ import annotations

import difflib
import html
import re

DIFF_OPS = ("same", "del", "ins")


def word_diff(old: str, new: str) -> list[tuple[str, str]]:
    """(op, words) runs turning `old` into `new`, op in DIFF_OPS; words joined by single spaces."""
    a, b = old.split(), new.split()
    runs: list[tuple[str, str]] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag == "equal":
            runs.append(("same", " ".join(a[i1:i2])))
            continue
        if i2 > i1:
            runs.append(("del", " ".join(a[i1:i2])))
        if j2 > j1:
            runs.append(("ins", " ".join(b[j1:j2])))
    return runs


def _number(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _rating(value) -> str:
    return "-" if value is None else f"{value:g}" if float(value).is_integer() else f"{value:.2f}"


def _writer(row: dict) -> str:
    if row["writer"] == "init":
        return "S_0 written by the frozen model from the first window"
    return f"refined by the policy + adapter {row['adapter'] or '(none)'} from the gap on this window"


# ---------------------------------------------------------------- Markdown

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~#&])")


def md_escape(text: str) -> str:
    """Text shown as written in Markdown (one line: table cells and diff runs cannot hold a line break)."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def render_markdown(rows: list[dict]) -> str:
    first = rows[0]
    out = [f"# Persona history of user {md_escape(first['user_id'])} ({md_escape(first['domain'])})", ""]
    out += ["| round | written | MAE before | words | tokens | created (UTC) |", "|---|---|---|---|---|---|"]
    for row in rows:
        out.append(
            f"| {row['round']} | {row['writer']} | {_number(row['mae_before'])} | {row['persona_words']} "
            f"| {row['persona_tokens']} | {row['created_at']:%Y-%m-%d %H:%M:%S} |"
        )
    pending = rows[-1].get("pending_after")
    if pending:
        out += ["", f"{pending} newer ratings wait for a full window."]
    previous = None
    for row in rows:
        summary = (
            f"{_writer(row)}; MAE before {_number(row['mae_before'])}, {row['persona_words']} words, "
            f"{row['persona_tokens']} tokens."
        )
        out += ["", f"## Round {row['round']}", "", summary, ""]
        out += ["| item | actual | predicted |", "|---|---|---|"]
        predicted = row["predicted"] or [None] * len(row["titles"])
        out += [
            f"| {md_escape(t)} | {_rating(a)} | {_rating(p)} |"
            for t, a, p in zip(row["titles"], row["actual"], predicted)
        ]
        out.append("")
        if previous is None:
            out.append(md_escape(row["persona"]))
        else:
            marks = {"same": "{}", "del": "~~{}~~", "ins": "**{}**"}
            out.append(
                " ".join(
                    marks[op].format(md_escape(words)) for op, words in word_diff(previous, row["persona"])
                )
            )
        previous = row["persona"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- HTML

_STYLE = """
body { font-family: sans-serif; max-width: 60rem; margin: 2rem auto; color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: .5rem 0; } td, th { border: 1px solid #bbb; padding: .2rem .5rem; }
th { background: #eee; } .persona { background: #fafafa; border: 1px solid #ddd; padding: .6rem; }
del { background: #fdd; color: #900; } ins { background: #dfd; color: #060; text-decoration: none; }
.meta { color: #555; } details { margin-top: .5rem; white-space: pre-wrap; }
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def render_html(rows: list[dict]) -> str:
    first = rows[0]
    title = f"Persona history of user {first['user_id']} ({first['domain']})"
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        (
            "<table><tr><th>round</th><th>written</th><th>MAE before</th><th>words</th><th>tokens</th>"
            "<th>created (UTC)</th></tr>"
        ),
    ]
    for row in rows:
        out.append(
            f"<tr><td>{row['round']}</td><td>{_e(row['writer'])}</td><td>{_number(row['mae_before'])}</td>"
            f"<td>{row['persona_words']}</td><td>{row['persona_tokens']}</td>"
            f"<td>{row['created_at']:%Y-%m-%d %H:%M:%S}</td></tr>"
        )
    out.append("</table>")
    pending = rows[-1].get("pending_after")
    if pending:
        out.append(f'<p class="meta">{pending} newer ratings wait for a full window.</p>')
    previous = None
    for row in rows:
        out.append(f'<section id="round-{row["round"]}"><h2>Round {row["round"]}</h2>')
        out.append(
            f'<p class="meta">{_e(_writer(row))}; MAE before {_number(row["mae_before"])}, '
            f"{row['persona_words']} words, {row['persona_tokens']} tokens.</p>"
        )
        out.append("<table><tr><th>item</th><th>actual</th><th>predicted</th></tr>")
        predicted = row["predicted"] or [None] * len(row["titles"])
        out += [
            f"<tr><td>{_e(t)}</td><td>{_rating(a)}</td><td>{_rating(p)}</td></tr>"
            for t, a, p in zip(row["titles"], row["actual"], predicted)
        ]
        out.append("</table>")
        if previous is None:
            body = _e(row["persona"])
        else:
            tags = {"same": "{}", "del": "<del>{}</del>", "ins": "<ins>{}</ins>"}
            body = " ".join(tags[op].format(_e(words)) for op, words in word_diff(previous, row["persona"]))
            body += f"<details><summary>the persona as written</summary>{_e(row['persona'])}</details>"
        out.append(f'<div class="persona">{body}</div></section>')
        previous = row["persona"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"

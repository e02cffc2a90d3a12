"""The review of an experiment: what changed from one revision (base) to another (head), as one Markdown page
that CI posts on the pull request (stages/review.py writes it; .github/workflows/review.yml, docs/review.md).

Pure: the functions take what stages/review.py read (parsed metrics, dvc.lock and params.yaml of each revision,
the output of `dvc params diff --json` and `dvc metrics diff --md`) and return values or Markdown; nothing here
runs git or dvc.

The page, in order:
- a one-line summary, and a warning where a revision's dvc.lock records other params than its params.yaml
  (its metrics are then not those of its params: `dvc repro` was not run);
- params changed (`dvc params diff`), and the stages whose dvc.lock entry changed: which inputs (command,
  dependencies, params) changed, so `dvc repro` ran them, and whether their outputs changed;
- the headline: per method, the mean MAE of rounds 1..R and DEEPER minus that method, each with its paired
  bootstrap interval (metrics/eval.json `bootstrap`), base and head side by side, a change whose new estimate
  lies inside the base's interval marked as noise (float noise and the spread of a few evaluation users must not
  read as results);
- the pair and training counts of each iteration (metrics/pairs_it{k}.json, metrics/train_it{k}.json);
- the plots whose data changed, base and head on one chart (images that stages/review.py renders);
- the whole `dvc metrics diff --md`, folded, cut to fit a pull-request comment.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeGuard

from deeper.bootstrap import format_interval

# The method the paired differences are taken against is the one eval.json's `bootstrap.vs_<reference>` names
# (the first of params evaluate.methods: DEEPER minus each method); the review finds it there (`reference_of`).
# GitHub refuses a comment longer than 65,536 characters; CML adds its watermark. The folded metrics diff is cut
# to keep the page under this (the whole diff stays in metrics_diff.md beside it).
COMMENT_LIMIT = 60_000

# How an estimate moved from base to head.
SAME = "same"  # the same number
NOISE = "noise"  # moved, but inside the base's interval
OUTSIDE = "outside"  # moved outside the base's interval: a change to read
NO_INTERVAL = "no interval"  # moved; the base has no interval to judge it by
NEW = "new"  # only the head has it
REMOVED = "removed"  # only the base has it
ABSENT = "absent"  # neither has it
MARK_TEXT = {
    SAME: "same",
    NOISE: "noise (inside the old interval)",
    OUTSIDE: "**outside the old interval**",
    NO_INTERVAL: "no old interval",
    NEW: "new",
    REMOVED: "removed",
    ABSENT: "",
}
# The counts of each iteration's metrics files worth a reviewer's eye: (key, label); dotted keys are nested.
PAIR_COUNTS = (
    ("pairs", "pairs"),
    ("train_pairs", "train pairs"),
    ("val_pairs", "validation pairs"),
    ("contexts_with_pair", "contexts with a pair"),
    ("contexts_total", "contexts"),
    ("positives", "positive candidates"),
    ("negatives", "negative candidates"),
    ("replay_pairs", "replayed iteration-1 pairs"),
)
TRAIN_COUNTS = (
    ("steps", "optimizer steps"),
    ("epochs", "epochs"),
    ("pairs.train", "pairs trained on"),
    ("pairs.val", "pairs validated on"),
    ("truncated_pairs.train", "train pairs truncated"),
    ("dropped_prompt_too_long.train", "train pairs dropped (prompt too long)"),
    ("trained", "trained"),
)
COUNT_FILES = (("pairs", PAIR_COUNTS), ("train", TRAIN_COUNTS))
COUNT_FILE = re.compile(r"^metrics/(pairs|train)_it(\d+)\.json$")
MISSING = object()


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval (eval.json `bootstrap`: {estimate, low, high}); no interval: low, high None."""

    estimate: float
    low: float | None = None
    high: float | None = None

    @classmethod
    def read(cls, node) -> Interval | None:
        if not isinstance(node, dict) or not _number(node.get("estimate")):
            return None
        low, high = node.get("low"), node.get("high")
        if not (_number(low) and _number(high)):
            return cls(float(node["estimate"]))
        return cls(float(node["estimate"]), float(low), float(high))


def _number(value) -> TypeGuard[float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def mark_change(old: Interval | None, new: Interval | None) -> str:
    """How the estimate moved: the base's interval is closed (its ends are bootstrap draws), so a new estimate on
    an end is inside it, i.e. noise."""
    if old is None:
        return ABSENT if new is None else NEW
    if new is None:
        return REMOVED
    if new.estimate == old.estimate:
        return SAME
    if old.low is None or old.high is None:
        return NO_INTERVAL
    return NOISE if old.low <= new.estimate <= old.high else OUTSIDE


@dataclass(frozen=True)
class RevisionData:
    """One side of the review as stages/review.py read it; None where the revision lacks the file."""

    label: str  # as the user named it: "origin/main", "HEAD~1", "workspace"
    sha: str | None = None  # the commit's short hash; None for the workspace
    eval: dict | None = None  # metrics/eval.json
    counts: dict | None = None  # {"metrics/pairs_it1.json": {...}, "metrics/train_it1.json": {...}, ...}
    lock: dict | None = None  # dvc.lock
    params: dict | None = None  # params.yaml

    @property
    def title(self) -> str:
        return f"`{self.label}` ({self.sha})" if self.sha and self.sha != self.label else f"`{self.label}`"


@dataclass(frozen=True)
class Headline:
    """A number of eval.json `bootstrap` that the review tabulates per method."""

    key: str  # bootstrap.methods.<method>.<key>, bootstrap.vs_<reference>.<method>.<key>
    name: str  # its column name
    digits: int  # decimals of the estimates and intervals shown
    intro: str  # what it is, `{rounds}` filled in


HEADLINES = (
    Headline(
        "mean_mae",
        "mean MAE",
        3,
        "Mean MAE over update {rounds} (lower is better) and DEEPER minus each method on the same users "
        "(below 0: DEEPER predicts better)",
    ),
    Headline(
        "reduction_pct",
        "MAE reduction %",
        1,
        "Reduction of the MAE from round 0 to the last round, in % (higher is better), and DEEPER minus each "
        "method",
    ),
)


@dataclass(frozen=True)
class HeadlineRow:
    method: str
    value: tuple[Interval | None, Interval | None]  # (base, head): the method's own estimate
    vs_reference: tuple[
        Interval | None, Interval | None
    ]  # (base, head): the reference (DEEPER) minus this method

    def marks(self) -> tuple[str, str]:
        return mark_change(*self.value), mark_change(*self.vs_reference)


def _bootstrap(ev: dict | None, group: str, method: str, key: str) -> Interval | None:
    node = ((ev or {}).get("bootstrap") or {}).get(group, {}).get(method, {})
    return Interval.read(node.get(key) if isinstance(node, dict) else None)


def reference_of(*evals: dict | None) -> str | None:
    """The method the first eval.json with a `bootstrap.vs_<method>` block measures the others against."""
    for ev in evals:
        for group in (ev or {}).get("bootstrap") or {}:
            if group.startswith("vs_"):
                return group[len("vs_") :]
    return None


def headline_rows(base_eval: dict | None, head_eval: dict | None, key: str = "mean_mae") -> list[HeadlineRow]:
    """One row per method of either revision's bootstrap: the reference (DEEPER) first, then the head's order,
    then methods the base alone has."""
    names: list[str] = []
    for ev in (head_eval, base_eval):
        names += list(((ev or {}).get("bootstrap") or {}).get("methods", {}))
    reference = reference_of(head_eval, base_eval)
    names = sorted(dict.fromkeys(names), key=lambda m: m != reference)
    versus = f"vs_{reference}"
    return [
        HeadlineRow(
            m,
            (_bootstrap(base_eval, "methods", m, key), _bootstrap(head_eval, "methods", m, key)),
            (_bootstrap(base_eval, versus, m, key), _bootstrap(head_eval, versus, m, key)),
        )
        for m in names
    ]


def format_change(old: Interval | None, new: Interval | None) -> str:
    mark = mark_change(old, new)
    if mark in (NOISE, OUTSIDE, NO_INTERVAL):
        assert old is not None and new is not None  # mark_change gives these marks only with both
        # four decimals: eval.json's rounding, so float noise (0.0001) shows as what it is
        return f"{new.estimate - old.estimate:+.4f} {MARK_TEXT[mark]}"
    return MARK_TEXT[mark]


def _rounds(base_eval: dict | None, head_eval: dict | None) -> str:
    rounds = [
        value for ev in (head_eval, base_eval) if isinstance(ev, dict) and _number(value := ev.get("rounds"))
    ]
    return f"rounds 1-{int(rounds[0])}" if rounds else "rounds 1-R"


def headline_table(base: RevisionData, head: RevisionData, headline: Headline = HEADLINES[0]) -> str:
    rows = headline_rows(base.eval, head.eval, headline.key)
    if not rows:
        return "_Neither revision's metrics/eval.json has a `bootstrap` section: no intervals to compare._\n"
    boot = (head.eval or {}).get("bootstrap") or (base.eval or {}).get("bootstrap") or {}
    level = boot.get("level")
    level_text = f"{level:.0%} " if _number(level) else ""
    name = headline.name
    lines = [
        (
            f"{headline.intro.format(rounds=_rounds(base.eval, head.eval))}, with {level_text}paired bootstrap "
            f"intervals over the evaluation users (metrics/eval.json `bootstrap`)."
        ),
        "",
        (
            f"| method | {name}, {base.label} | {name}, {head.label} | change | DEEPER − method, {base.label} | "
            f"DEEPER − method, {head.label} | change |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row.method == reference_of(head.eval, base.eval):
            diff = ["—", "—", ""]
        else:
            diff = [
                format_interval(row.vs_reference[0], headline.digits),
                format_interval(row.vs_reference[1], headline.digits),
                format_change(*row.vs_reference),
            ]
        lines.append(
            _row(
                [
                    f"`{row.method}`",
                    format_interval(row.value[0], headline.digits),
                    format_interval(row.value[1], headline.digits),
                    format_change(*row.value),
                    *diff,
                ]
            )
        )
    return "\n".join(lines) + "\n"


def headline_notes(base: RevisionData, head: RevisionData) -> str:
    notes = []
    for rev in (base, head):
        if rev.eval is None:
            notes.append(f"{rev.title} has no metrics/eval.json.")
        elif not isinstance(rev.eval.get("bootstrap"), dict):
            notes.append(
                f"{rev.title}'s metrics/eval.json has no `bootstrap` section (older than the paired "
                f"bootstrap): no intervals."
            )
    old_rounds, new_rounds = ((ev or {}).get("rounds") for ev in (base.eval, head.eval))
    if _number(old_rounds) and _number(new_rounds) and old_rounds != new_rounds:
        notes.append(
            f"The means average different rounds: 1-{old_rounds} in {base.title}, 1-{new_rounds} in "
            f"{head.title}."
        )
    return "".join(f"{note}\n\n" for note in notes)


def moved(base_eval: dict | None, head_eval: dict | None) -> tuple[list[str], int]:
    """(the estimates that moved outside the base's interval, named; how many moved inside it) over HEADLINES,
    for the summary line."""
    outside, inside = [], 0
    for headline in HEADLINES:
        for row in headline_rows(base_eval, head_eval, headline.key):
            own, diff = row.marks()
            outside += [f"{row.method} {headline.name}"] * (own == OUTSIDE)
            outside += [f"DEEPER − {row.method} {headline.name}"] * (diff == OUTSIDE)
            inside += (own == NOISE) + (diff == NOISE)
    return outside, inside


# --- params and dvc.lock ---


def _flat(value, prefix: str) -> dict[str, Any]:
    """A params value as dotted keys (`pair: {seed: 0}` -> `pair.seed`), so a change names its leaf."""
    if isinstance(value, dict) and value:
        return {key: leaf for k, v in value.items() for key, leaf in _flat(v, f"{prefix}.{k}").items()}
    return {prefix: value}


def _lookup(tree, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return MISSING
        tree = tree[part]
    return tree


def _lock_params(entry: dict) -> dict[str, Any]:
    """A dvc.lock stage's params as {dotted key: value}; keys of another file than params.yaml as `file:key`."""
    out: dict[str, Any] = {}
    for file, values in (entry.get("params") or {}).items():
        for key, value in (values or {}).items():
            name = key if file == "params.yaml" else f"{file}:{key}"
            out.update(_flat(value, name))
    return out


def _by_path(entries) -> dict[str, dict]:
    """dvc.lock deps or outs as {path: the rest of the entry (hash, size, nfiles)}."""
    return {
        str(e.get("path")): {k: v for k, v in e.items() if k != "path"}
        for e in (entries or [])
        if isinstance(e, dict)
    }


def _changed_keys(old: dict, new: dict) -> list[str]:
    return [k for k in dict.fromkeys([*old, *new]) if old.get(k, MISSING) != new.get(k, MISSING)]


@dataclass(frozen=True)
class StageChange:
    """A dvc.lock stage entry that differs between the revisions."""

    stage: str
    status: str  # "new", "removed", "re-ran" (inputs changed) or "outputs only"
    command: bool = False
    deps: tuple = ()  # dependency paths whose hash changed (or that came or went)
    params: tuple = ()  # dotted params keys whose value changed
    outs: tuple = ()  # output paths whose hash changed
    outs_total: int = 0

    def why(self) -> str:
        if self.status in ("new", "removed"):
            return "new stage" if self.status == "new" else "removed from dvc.lock"
        parts = []
        if self.params:
            parts.append("params: " + _some(self.params))
        if self.deps:
            parts.append("dependencies: " + _some(self.deps))
        if self.command:
            parts.append("command")
        # the inputs match but an output's hash does not: run again (`dvc repro -f`, or a run elsewhere that
        # wrote other bytes, such as a DuckDB file's random identifier or a timing)
        return (
            "; ".join(parts)
            or "same inputs, other outputs (run again: `dvc repro -f`, or on another machine)"
        )

    def outputs(self) -> str:
        if self.status == "removed":
            return ""
        if self.status == "new":
            return f"{self.outs_total} output{'s' * (self.outs_total != 1)}"
        if not self.outs:
            return (
                f"same bytes ({self.outs_total} output{'s' * (self.outs_total != 1)})"
                if self.outs_total
                else "no outputs"
            )
        return f"changed: {_some(self.outs)} (of {self.outs_total})"


def _some(names, limit: int = 6) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def stage_changes(base_lock: dict | None, head_lock: dict | None) -> list[StageChange]:
    """The stages whose dvc.lock entries differ: inputs (command, dependencies' hashes, params) changed means
    `dvc repro` ran the stage (or restored its outputs from the run cache); outputs alone changed means a forced
    re-run. In the head's order, then stages only the base has."""
    old_stages = (base_lock or {}).get("stages") or {}
    new_stages = (head_lock or {}).get("stages") or {}
    changes = []
    for name in dict.fromkeys([*new_stages, *old_stages]):
        old, new = old_stages.get(name), new_stages.get(name)
        if old == new:
            continue
        if old is None:
            assert new is not None  # old == new (both None) continued above
            changes.append(StageChange(name, "new", outs_total=len(_by_path(new.get("outs")))))
            continue
        if new is None:
            changes.append(StageChange(name, "removed"))
            continue
        old_outs, new_outs = _by_path(old.get("outs")), _by_path(new.get("outs"))
        command = old.get("cmd") != new.get("cmd")
        deps = tuple(_changed_keys(_by_path(old.get("deps")), _by_path(new.get("deps"))))
        params = tuple(_changed_keys(_lock_params(old), _lock_params(new)))
        outs = tuple(_changed_keys(old_outs, new_outs))
        status = "re-ran" if (command or deps or params) else "outputs only"
        changes.append(StageChange(name, status, command, deps, params, outs, len(new_outs)))
    return changes


# More changed stages than this go into a fold: a change to a module every stage reads lists the whole DAG, which
# would push the MAE tables a screen down.
STAGES_SHOWN = 8


def stages_table(changes: list[StageChange], total: int) -> str:
    if not changes:
        return f"_No stage's dvc.lock entry changed ({total} stages): nothing re-ran._\n"
    intro = (
        f"{len(changes)} of {total} stages changed in dvc.lock: their inputs changed, so `dvc repro` ran them "
        f"(or restored their outputs from DVC's run cache)."
    )
    table = ["| stage | inputs that changed | outputs |", "|---|---|---|"]
    table += [_row([f"`{c.stage}`", c.why(), c.outputs()]) for c in changes]
    if len(changes) > STAGES_SHOWN:
        # a blank line after <summary>: GitHub renders Markdown inside the fold only then
        table = [
            f"<details><summary>The {len(changes)} stages: what changed, what they wrote</summary>",
            "",
            *table,
            "",
            "</details>",
        ]
    return "\n".join([intro, "", *table]) + "\n"


def stale_params(lock: dict | None, params: dict | None) -> list[tuple[str, str, Any, Any]]:
    """(stage, key, value in dvc.lock, value in params.yaml) for each params.yaml key a stage's dvc.lock entry
    records with another value than the file holds: that stage's outputs (and the metrics) are not of these
    params. MISSING where a side lacks the key."""
    if not isinstance(lock, dict) or not isinstance(params, dict):
        return []
    stale = []
    for stage, entry in (lock.get("stages") or {}).items():
        for key, value in ((entry or {}).get("params") or {}).get("params.yaml", {}).items():
            recorded, current = _flat(value, key), _flat(_lookup(params, key), key)
            for leaf in _changed_keys(recorded, current):
                stale.append((stage, leaf, recorded.get(leaf, MISSING), current.get(leaf, MISSING)))
    return stale


def stale_warning(rev: RevisionData) -> str:
    stale = stale_params(rev.lock, rev.params)
    if not stale:
        return ""
    stages = list(dict.fromkeys(s for s, *_ in stale))
    _, key, recorded, current = stale[0]
    shown = ["absent" if v is MISSING else format_value(v) for v in (recorded, current)]
    return (
        f"> **Warning:** {rev.title}: dvc.lock does not match params.yaml for {len(stages)} stage"
        f"{'s' * (len(stages) != 1)} ({_some(stages, 4)}; e.g. `{key}` is {shown[0]} in dvc.lock, {shown[1]} "
        f"in params.yaml): its metrics are not those of its params. Run `dvc repro` (and commit dvc.lock) "
        f"before reviewing.\n"
    )


def format_value(value) -> str:
    """A params or count value: text as it is, a float exactly (repr: 5e-06 stays 5e-06), the rest as JSON."""
    if value is MISSING:
        return "—"
    if isinstance(value, str):
        return value
    if isinstance(value, float):
        return repr(value)
    return json.dumps(value, sort_keys=True)


def params_table(diff: dict | None, base: RevisionData, head: RevisionData) -> str:
    """`dvc params diff --json` ({file: {key: {old, new}}}) as a table."""
    rows = [
        (file, key, change.get("old"), change.get("new"))
        for file, keys in (diff or {}).items()
        for key, change in (keys or {}).items()
        if isinstance(change, dict)
    ]
    if not rows:
        return "_No params changed (`dvc params diff`)._\n"
    show_file = any(file != "params.yaml" for file, *_ in rows)
    head_cells = ["file"] * show_file + ["param", base.label, head.label]
    lines = [_row(head_cells), "|" + "---|" * len(head_cells)]
    for file, key, old, new in rows:
        # DVC's null: the key is absent on that side
        lines.append(
            _row(
                [file] * show_file
                + [f"`{key}`", *(format_value(MISSING if v is None else v) for v in (old, new))]
            )
        )
    return "\n".join(lines) + "\n"


# --- pair and training counts ---


def count_rows(
    base_counts: dict | None, head_counts: dict | None
) -> tuple[list[int], list[tuple[str, dict]]]:
    """(iterations, rows): one row per count of PAIR_COUNTS and TRAIN_COUNTS that either revision has, as
    (label, {iteration: (base value, head value)}), MISSING where a revision lacks the file or key."""
    base_counts, head_counts = base_counts or {}, head_counts or {}
    iterations = sorted({int(m[2]) for path in [*base_counts, *head_counts] if (m := COUNT_FILE.match(path))})
    rows = []
    for kind, keys in COUNT_FILES:
        for key, label in keys:
            cells = {
                k: (
                    _lookup(base_counts.get(f"metrics/{kind}_it{k}.json"), key),
                    _lookup(head_counts.get(f"metrics/{kind}_it{k}.json"), key),
                )
                for k in iterations
            }
            if any(v is not MISSING for pair in cells.values() for v in pair):
                rows.append((label, cells))
    return iterations, rows


def _delta(old, new) -> str:
    return f"{new - old:+.4f}".rstrip("0").rstrip(".")  # ints too: +2.0000 -> +2


def format_count(old, new) -> str:
    """One revision's value where both agree, else `old → **new** (+delta)`."""
    if old == new:
        return format_value(new)
    delta = f" ({_delta(old, new)})" if _number(old) and _number(new) else ""
    return f"{format_value(old)} → **{format_value(new)}**{delta}"


def counts_table(base: RevisionData, head: RevisionData) -> str:
    iterations, rows = count_rows(base.counts, head.counts)
    if not rows:
        return "_No metrics/pairs_it*.json or metrics/train_it*.json in either revision._\n"
    changed = sum(old != new for _, cells in rows for old, new in cells.values())
    lines = [
        (
            f"Each iteration's pair selection and DPO training; a changed count reads {base.label} → "
            f"**{head.label}** (change): {changed} changed."
        ),
        "",
        _row(["count", *(f"iteration {k}" for k in iterations)]),
        "|---" * (len(iterations) + 1) + "|",
    ]
    lines += [_row([label, *(format_count(*cells[k]) for k in iterations)]) for label, cells in rows]
    return "\n".join(lines) + "\n"


# --- plots and the metrics diff ---


@dataclass(frozen=True)
class PlotImage:
    name: str
    title: str
    image: str  # path relative to review.md
    note: str = ""  # "only in <rev>" where one revision lacks the data


def plots_section(
    images: list[PlotImage],
    unchanged: list[str],
    missing: list[tuple[str, str]],
    base: RevisionData,
    head: RevisionData,
) -> str:
    """The images, then the plots left out: unchanged ones by name, undrawable ones as (name, why)."""
    lines = []
    if images:
        lines += [
            (
                f"The plots of dvc.yaml whose data changed, {base.label} and {head.label} on one chart (as "
                f"`dvc plots diff` draws them: one line style or colour per revision)."
            ),
            "",
        ]
        for image in images:
            lines += [
                f"**{image.name}**{f' ({image.note})' if image.note else ''}",
                "",
                f"![{image.title}]({image.image})",
                "",
            ]
    else:
        lines += ["_No plot's data changed._", ""]
    if unchanged:
        lines += [f"Unchanged: {_some(unchanged, 20)}.", ""]
    if missing:
        lines += ["Not drawn: " + "; ".join(f"`{name}` ({reason})" for name, reason in missing) + ".", ""]
    return "\n".join(lines)


def metrics_fold(metrics_md: str, budget: int, base: RevisionData, full_name: str = "metrics_diff.md") -> str:
    """`dvc metrics diff --md` in a <details> fold (a blank line after <summary>: GitHub renders the table only
    then), cut to `budget` characters at a row boundary with a line saying where the rest is."""
    table = [line for line in metrics_md.strip().splitlines() if line.strip()]
    if not table:
        return "_No metric changed (`dvc metrics diff`)._\n"
    rows = max(len(table) - 2, 0)
    kept, size = [], 0
    for i, line in enumerate(table):
        if i >= 2 and size + len(line) + 1 > budget:
            break
        kept.append(line)
        size += len(line) + 1
    cut = len(table) - len(kept)
    tail = (
        [
            "",
            (
                f"_{cut} more rows cut to fit a comment: {full_name} beside this page has all of them "
                f"(or run `dvc metrics diff {base.label} --md`)._"
            ),
        ]
        if cut
        else []
    )
    return (
        "\n".join(
            [
                (
                    f"<details><summary>Full <code>dvc metrics diff --md</code>: {rows} changed "
                    f"value{'s' * (rows != 1)}</summary>"
                ),
                "",
                *kept,
                *tail,
                "",
                "</details>",
            ]
        )
        + "\n"
    )


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _row(cells) -> str:
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def summary_line(
    base: RevisionData,
    head: RevisionData,
    params_diff: dict | None,
    changes: list[StageChange],
    images: list[PlotImage],
) -> str:
    n_params = sum(len(keys or {}) for keys in (params_diff or {}).values())
    ran = [c.stage for c in changes if c.status != "removed"]
    outside, inside = moved(base.eval, head.eval)
    parts = [
        f"{n_params} param{'s' * (n_params != 1)} changed",
        f"{len(ran)} stage{'s' * (len(ran) != 1)} re-ran" + (f" ({_some(ran, 5)})" if ran else ""),
        (
            f"**{len(outside)} estimate{'s' * (len(outside) != 1)} moved outside the old interval** "
            f"({', '.join(outside)})"
            if outside
            else f"{inside} estimate{'s' * (inside != 1)} moved, all inside the old interval (noise)"
            if inside
            else "no estimate of the MAE tables moved"
        ),
        f"{len(images)} plot{'s' * (len(images) != 1)} changed",
    ]
    return "; ".join(parts) + "."


def build_review(
    base: RevisionData,
    head: RevisionData,
    params_diff: dict | None,
    metrics_md: str,
    images: list[PlotImage],
    unchanged_plots: Sequence[str] = (),
    missing_plots: Sequence[tuple[str, str]] = (),
    limit: int = COMMENT_LIMIT,
) -> str:
    """The whole page; its length stays under `limit` by cutting the folded metrics diff."""
    changes = stage_changes(base.lock, head.lock)
    total = len(((head.lock or {}).get("stages") or {}) | ((base.lock or {}).get("stages") or {}))
    warnings = "\n".join(w for w in (stale_warning(base), stale_warning(head)) if w)  # one quote each
    sections = [
        f"## Experiment review: {base.title} → {head.title}\n",
        summary_line(base, head, params_diff, changes, images) + "\n",
        *([warnings] if warnings else []),
        "### Params changed (`dvc params diff`)\n",
        params_table(params_diff, base, head),
        "### Stages re-run (dvc.lock)\n",
        stages_table(changes, total),
        "### Mean MAE and DEEPER − each method, with intervals\n",
        (
            "A change whose new estimate lies inside the old interval is marked noise: float noise or the spread of a "
            "few evaluation users, not a result; one outside it is worth a look.\n"
        ),
        headline_notes(base, head),
        headline_table(base, head, HEADLINES[0]),
        headline_table(base, head, HEADLINES[1]),
        "### Preference pairs and training (metrics/pairs_it*.json, metrics/train_it*.json)\n",
        counts_table(base, head),
        "### Plots\n",
        plots_section(images, list(unchanged_plots), list(missing_plots), base, head),
        "### All changed metrics\n",
    ]
    page = "\n".join(section for section in sections if section)  # an empty one (no notes) adds no blank line
    return page + "\n" + metrics_fold(metrics_md, limit - len(page) - 400, base)

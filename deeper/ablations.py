"""The paper's ablations as named DVC experiments, and their comparison table.

Each ablation is a profile (profiles/ablations/<name>.yaml: params overrides, checked like any profile by
`deeper.profile` and the stages' validator). `stages/ablations.py` queues them as `dvc exp run --queue -n
ablation-<name> -S ...` and runs the queue; `comparison` turns `dvc exp show --json` into one row per
experiment (the baseline commit first) with the numbers the paper's Tables 19-21 compare:

- Table 19 (reward weights): `future_only`, `decayed` against the baseline's balanced weights;
- Table 20 (iteration 1 vs 2): every row's Model 1 (`deeper_it1`) and Model 2 (`deeper`) columns;
- Table 21 (Inc-FT): `inc_ft`, the same RL pipeline trained on IncUpdate's prompt;
- Table 26 (a second backbone): `qwen_backbone`, DPO trains another model on the same iteration-1 pairs; its
  untrained and DEEPER columns are the paper's "Before" and "After".
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from deeper.bootstrap import format_interval
from deeper.errors import DeeperError
from deeper.outputs import write_text
from deeper.profile import PROFILES_DIR, dvc_flags, load_profile

ABLATIONS_DIR = PROFILES_DIR / "ablations"
EXPERIMENT_PREFIX = "ablation-"
EVAL_METRICS = "metrics/eval.json"
PAIR_METRICS = {1: "metrics/pairs_it1.json", 2: "metrics/pairs_it2.json"}
# (column label, method of evaluate.methods): Table 20 reads Model 1 against Model 2 in every row, Table 26 the
# untrained policy (before training) against Model 2 (after)
# The comparison's columns: which evaluation method each is, found in each run's own evaluate.methods by place and
# weights (deeper.methods: the untrained refiner, train@1's, the reference = DEEPER's Model 2), not by name.
METHOD_COLUMNS = (("untrained", "untrained"), ("Model 1", "model_1"), ("DEEPER (Model 2)", "reference"))


def available() -> list[str]:
    return sorted(p.stem for p in ABLATIONS_DIR.glob("*.yaml"))


def experiment_name(ablation: str) -> str:
    return f"{EXPERIMENT_PREFIX}{ablation.replace('_', '-')}"


def queue_commands(params: dict, names: list[str] | None = None) -> list[list[str]]:
    """One checked `dvc exp run --queue -n ablation-<name> -S ...` argv per ablation (all when `names` is
    empty). Every profile is checked (keys exist, the params it gives pass every block's validator) before
    any is returned, so a bad one queues nothing."""
    from deeper.profile import apply_profile
    from deeper.validate import check_params

    chosen = names or available()
    unknown = sorted(set(chosen) - set(available()))
    if unknown:
        raise DeeperError(f"unknown ablation {', '.join(unknown)}; ablations: {', '.join(available())}")
    commands = []
    for name in chosen:
        entries = load_profile(ABLATIONS_DIR / f"{name}.yaml", params)
        check_params(apply_profile(params, entries))
        commands.append(["dvc", "exp", "run", "--queue", "-n", experiment_name(name), *dvc_flags(entries)])
    return commands


def _records(node, found: list[dict]) -> list[dict]:
    """Every {rev, name, data} record of `dvc exp show --json` (baselines and experiments, any depth)."""
    if isinstance(node, dict):
        if isinstance(node.get("data"), dict) and "rev" in node:
            found.append(node)
        for value in node.values():
            if isinstance(value, (dict, list)):
                _records(value, found)
    elif isinstance(node, list):
        for value in node:
            _records(value, found)
    return found


def _file_data(record: dict, kind: str, path: str) -> dict:
    entry = (record["data"].get(kind) or {}).get(path) or {}
    return entry.get("data") or {}


def _dig(data: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def _interval(data: dict, dotted: str, digits: int) -> str:
    value = _dig(data, dotted)
    return format_interval(value if isinstance(value, dict) else None, digits)


def comparison(exp_show: list, baseline_rev: str) -> list[dict]:
    """Rows {experiment, baseline, changes, pairs_it1, pairs_it2, <column>: 'estimate [low, high]', ...} for
    the baseline commit (`baseline_rev`, a full sha) and every `ablation-*` experiment in `exp_show`, in profile
    order; `baseline` is the commit each was run from (`dvc exp show -n 2` also lists the previous commit's
    experiments: an ablation that ran before a commit which changed none of its numbers). Intervals are the
    evaluate stage's paired bootstrap (metrics/eval.json `bootstrap`)."""
    records = []
    baselines = {}  # experiment record's rev -> the commit it was run from
    for entry in exp_show:  # one entry per commit: {"rev": <its sha>, "data": ..., "experiments": [...]}
        found = _records(entry, [])
        records += found
        for record in found:
            baselines[record["rev"]] = entry["rev"]
    by_name: dict[str, dict] = {}
    for record in records:  # the first listed is the newest commit's
        if record.get("name"):
            by_name.setdefault(record["name"], record)
    base = next((r for r in records if r.get("rev") == baseline_rev), None)
    if base is None:
        raise DeeperError(f"dvc exp show has no record of the baseline commit {baseline_rev[:7]}")
    rows = [_row("baseline (HEAD)", baseline_rev[:7], "-", base)]
    for name in available():
        latest = by_name.get(experiment_name(name))
        if latest is None or not latest["data"].get("metrics"):
            continue  # not run (yet), or failed: `dvc queue status` says which
        rows.append(_row(experiment_name(name), baselines[latest["rev"]][:7], _changes(name), latest))
    return rows


def _changes(name: str) -> str:
    """The ablation's overrides as `key=value ...` (its profile was checked when it was queued)."""
    entries = yaml.safe_load((ABLATIONS_DIR / f"{name}.yaml").read_text(encoding="utf-8"))
    return " ".join(f"{key}={value}" for key, value in entries.items())


def _method_roles(record: dict) -> dict[str, str | None]:
    """The run's method names of METHOD_COLUMNS' roles, from its own params (evaluate.methods)."""
    from deeper.methods import method_with_adapter, methods_from_params, reference_method

    methods = _dig(_file_data(record, "params", "params.yaml"), "evaluate.methods")
    specs = methods_from_params(methods) if isinstance(methods, dict) and methods else {}
    if not specs:
        return dict.fromkeys(("untrained", "model_1", "reference"))
    return {
        "untrained": method_with_adapter(specs, None),
        "model_1": method_with_adapter(specs, 1),
        "reference": reference_method(specs),
    }


def _row(label: str, baseline: str, changes: str, record: dict) -> dict:
    evaluation = _file_data(record, "metrics", EVAL_METRICS)
    row = {"experiment": label, "baseline": baseline, "changes": changes}
    for k, path in PAIR_METRICS.items():
        row[f"pairs_it{k}"] = _file_data(record, "metrics", path).get("pairs", "-")
    names = _method_roles(record)
    for column, role in METHOD_COLUMNS:
        row[f"{column}: mean MAE r1-4"] = _interval(
            evaluation, f"bootstrap.methods.{names[role]}.mean_mae", 3
        )
    reference, untrained = names["reference"], names["untrained"]
    row["DEEPER: r0->r4 reduction %"] = _interval(
        evaluation, f"bootstrap.methods.{reference}.reduction_pct", 1
    )
    row["DEEPER - untrained: mean MAE"] = _interval(
        evaluation, f"bootstrap.vs_{reference}.{untrained}.mean_mae", 3
    )
    return row


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row[h]) for h in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write(rows: list[dict], out_dir: Path, baseline_rev: str) -> None:
    write_text(
        out_dir / "comparison.json", json.dumps({"baseline_rev": baseline_rev, "rows": rows}, indent=2) + "\n"
    )
    write_text(out_dir / "comparison.md", markdown(rows))

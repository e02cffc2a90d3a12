"""The learning check's report (issue 20): did the RL loop teach the refiner what its pairs encode, in the
diagnostic world (profiles/learning_check.yaml; a test of the TRAINER, not of the paper's claim)?

Reads a finished (or partly finished) run of the profile in RUN_DIR and writes OUT/report.json and OUT/report.md:
- held-out DPO preference accuracy and implicit reward margin of Model 1 and Model 2 against the base policy on
  the validation pairs of iteration 1 (contexts never trained on in either iteration), intervals over contexts
  (deeper.learning.preference_report);
- train vs held-out DPO reward margins and accuracies at the end of each iteration (metrics/train_it{k}.json);
- the held-out first-update reward (the paper's Fig. 3) of base, Model 1 and Model 2 on the evaluation users,
  with paired intervals over users (deeper.learning.first_update_contrasts);
- future-window MAE, mean of rounds 1-4, of every method and DEEPER minus each, with the report's paired
  intervals (metrics/eval.json);
- the share of candidates that are not a persona at all (assistant chatter; deeper.diagnostic.stated_tastes
  finds no taste), per iteration.
It also copies the run's params.yaml, metrics and training curves into OUT. Only the outputs of stages that ran
with the run's params are read (its dvc.lock, `dvc status`): parts whose stages have not run yet (a run still
going, or stopped) are left out, not guessed, and the default run's committed metrics are never taken for them.

    python scripts/learning_check_report.py --run-dir /path/to/run --out results/learning_check
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deeper.bootstrap import format_interval  # after the repo root is on the path
from deeper.errors import DeeperError
from stages._cli import user_errors


def stages_run(run: Path) -> set[str]:
    """The stages whose outputs in `run` are this run's: in its dvc.lock and up to date with its params and
    code (`dvc status`). A workspace cloned from the repository also holds the committed metrics of the default
    run, which must not be read as the profile's."""
    import subprocess

    import yaml

    lock = run / "dvc.lock"
    locked = (
        set((yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}))
        if lock.is_file()
        else set()
    )
    dvc = shutil.which("dvc", path=str(Path(sys.executable).parent)) or "dvc"
    done = subprocess.run([dvc, "status", "--json"], cwd=run, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise DeeperError(f"{run}: dvc status failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return locked - set(json.loads(done.stdout or "{}"))


def refiners(params: dict) -> dict[str, str | None]:
    """The run's evaluate.methods names of the base policy, Model 1 and Model 2, found by their weights."""
    from deeper.methods import method_with_adapter, methods_from_params

    specs = methods_from_params(params["evaluate"]["methods"])
    return {
        "base": method_with_adapter(specs, None),
        "model_1": method_with_adapter(specs, 1),
        "model_2": method_with_adapter(specs, 2),
    }


def held_out_pairs(run: Path):
    """Iteration 1's validation pairs whose contexts iteration 2 did not train on either."""
    import pandas as pd

    pairs = pd.read_parquet(run / "data/pairs/it1/pairs.parquet")
    held = pairs[pairs["split"] == "val"]
    it2 = run / "data/pairs/it2/pairs.parquet"
    if it2.is_file():
        trained_2 = set(pd.read_parquet(it2).query("split == 'train'")["context_id"])
        held = held[~held["context_id"].isin(trained_2)]
    return held.reset_index(drop=True)


def preference(run: Path, pairs, beta: float, policy_name: str, ran: set[str]) -> dict:
    from deeper.learning import completion_logps, preference_report
    from deeper.llm import load_llm

    spec = {
        "backend": "transformers",
        "name": str(run / policy_name),
        "batch_size": 1,
        "device": "cpu",
        "dtype": "float32",
    }
    base = completion_logps(load_llm(spec), pairs)
    out = {}
    for k, label, folder in ((1, "model_1", "models/adapters/it1"), (2, "model_2", "models/adapters/it2")):
        # an adapter another run left behind is not this run's
        if not (run / folder / "adapter_model.safetensors").is_file() or f"train@{k}" not in ran:
            out[label] = "missing: the run has not trained it yet"
            continue
        policy = completion_logps(load_llm(spec, adapter=str(run / folder)), pairs)
        out[label] = preference_report(policy, base, pairs["context_id"].tolist(), beta)
    return out


def percentile_row(interval: dict) -> str:
    return format_interval(interval, signed=True)


@click.command(help=__doc__.split("\n\n")[0])
@click.option(
    "--run-dir",
    required=True,
    type=click.Path(file_okay=False, exists=True),
    help="The repository folder the learning_check profile ran in.",
)
@click.option(
    "--out",
    default="results/learning_check",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the report and the copied run files go.",
)
@click.option("--skip-preference", is_flag=True, help="Leave out the held-out pair scoring (minutes of CPU).")
@user_errors
def main(run_dir, out, skip_preference):
    import pandas as pd
    import yaml

    from deeper.bootstrap import BootstrapSettings
    from deeper.diagnostic import stated_tastes
    from deeper.learning import first_update_contrasts, pair_yield
    from deeper.metrics import write_json

    run, out = Path(run_dir), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ran = stages_run(run)
    params = yaml.safe_load((run / "params.yaml").read_text(encoding="utf-8"))
    shutil.copy2(run / "params.yaml", out / "params.yaml")
    report: dict = {
        "world": "diagnostic (profiles/learning_check.yaml): a test of the trainer, not of the paper"
    }

    counts = {}
    for k in (1, 2):
        for name, stage in (
            (f"pairs_it{k}", f"pair@{k}"),
            (f"train_it{k}", f"train@{k}"),
            (f"reward_it{k}", f"reward@{k}"),
            (f"sample_it{k}", f"sample@{k}"),
        ):
            path = run / "metrics" / f"{name}.json"
            if path.is_file() and stage in ran:
                shutil.copy2(path, out / path.name)
                counts[name] = json.loads(path.read_text(encoding="utf-8"))
        samples = run / f"data/samples/it{k}.parquet"
        if samples.is_file() and f"sample@{k}" in ran:
            table = pd.read_parquet(samples)
            no_taste = sum(not (t.loved or t.disliked) for t in map(stated_tastes, table["text"]))
            report[f"candidates_it{k}"] = {
                "candidates": len(table),
                "stating_no_taste": no_taste,
                "flagged": int((table["flag"].fillna("") != "").sum()),
            }
        rewards = run / f"data/rewards/it{k}.parquet"
        if rewards.is_file() and f"reward@{k}" in ran:
            delta = params["delta"] if k == 1 else params["iter2"]["delta"]
            report[f"pair_yield_it{k}"] = pair_yield(
                pd.read_parquet(rewards), float(params["tau_pos"]), float(params["tau_neg"]), float(delta)
            )
        log = run / f"models/adapters/it{k}/train_log.json"
        if log.is_file() and f"train@{k}" in ran:
            report[f"train_log_it{k}"] = json.loads(log.read_text(encoding="utf-8"))
        curves = run / f"plots/train/it{k}"
        if curves.is_dir() and f"train@{k}" in ran:
            shutil.copytree(curves, out / f"curves/it{k}", dirs_exist_ok=True)
    for k in (1, 2):
        train = counts.get(f"train_it{k}")
        if train:
            report[f"train_vs_held_out_it{k}"] = {
                "pairs": train["pairs"],
                "steps": train["steps"],
                "epochs": train["epochs"],
                "train_reward_margin_last": train["train"]["reward_margin_last"],
                "train_reward_accuracy_last": train["train"]["reward_accuracy_last"],
                "held_out_reward_margin": train["eval"]["reward_margin"],
                "held_out_reward_accuracy": train["eval"]["reward_accuracy"],
            }
    images = run / "plots/images"
    for image in sorted(images.glob("train_*.svg")) if images.is_dir() and "plots" in ran else []:
        (out / "images").mkdir(exist_ok=True)
        shutil.copy2(image, out / "images" / image.name)

    if not skip_preference and (run / "data/pairs/it1/pairs.parquet").is_file() and "pair@1" in ran:
        pairs = held_out_pairs(run)
        report["held_out_pairs"] = {"pairs": len(pairs), "contexts": int(pairs["context_id"].nunique())}
        if len(pairs):
            report["preference"] = preference(
                run, pairs, float(params["train"]["beta"]), params["models"]["policy"]["name"], ran
            )

    headroom = run / "metrics/headroom.json"
    if headroom.is_file() and "headroom" in ran:
        shutil.copy2(headroom, out / "headroom.json")
        conditions = json.loads(headroom.read_text(encoding="utf-8"))["conditions"]
        report["headroom_mae"] = {c: v["mae"] for c, v in conditions.items()}

    first = run / "plots/first_update_reward.csv"
    settings = BootstrapSettings.from_params(params)
    if first.is_file() and "report" in ran:
        found = {label: name for label, name in refiners(params).items() if name is not None}
        report["first_update_reward"] = first_update_contrasts(pd.read_csv(first), found, settings)
    evaluation = run / "metrics/eval.json"
    if evaluation.is_file() and "report" in ran:
        shutil.copy2(evaluation, out / "eval.json")
        boot = json.loads(evaluation.read_text(encoding="utf-8"))["bootstrap"]
        report["mean_mae_rounds_1_4"] = {m: v["mean_mae"] for m, v in boot["methods"].items()}
        versus = next((k for k in boot if k.startswith("vs_")), None)  # vs_<the reference method>
        report["deeper_minus"] = {m: v["mean_mae"] for m, v in boot.get(versus, {}).items()}
    write_json(out / "report.json", report)
    (out / "report.md").write_text(render(report), encoding="utf-8")
    click.echo(f"wrote {out / 'report.json'} and {out / 'report.md'}")


def render(report: dict) -> str:
    lines = ["# Learning check: the diagnostic world (a test of the trainer, not of the paper's claim)", ""]
    pref = report.get("preference")
    if pref:
        held = report["held_out_pairs"]
        lines += [
            f"Held-out pairs: {held['pairs']} of {held['contexts']} contexts never trained on.",
            "",
            (
                "| model | DPO implicit reward margin vs base | reward accuracy | preference accuracy (policy) | "
                "preference accuracy (base) |"
            ),
            "|---|---|---|---|---|",
        ]
        for label, r in pref.items():
            if isinstance(r, str):
                lines.append(f"| {label} | {r} | | | |")
            else:
                lines.append(
                    f"| {label} | {percentile_row(r['implicit_margin'])} | {percentile_row(r['reward_accuracy'])}"
                    f" | {percentile_row(r['policy_accuracy'])} | {percentile_row(r['base_accuracy'])} |"
                )
        lines.append("")
    first = report.get("first_update_reward")
    if first:
        lines += [
            "Held-out first-update reward (evaluation users, paired intervals over users):",
            "",
            "| refiner | mean r |",
            "|---|---|",
        ]
        lines += [f"| {name} | {percentile_row(v)} |" for name, v in first["means"].items()]
        lines += [f"| {name} | {percentile_row(v)} |" for name, v in first["contrasts"].items()]
        lines.append("")
    if "mean_mae_rounds_1_4" in report:
        lines += [
            "Future-window MAE, mean of rounds 1-4:",
            "",
            "| method | MAE | DEEPER minus it |",
            "|---|---|---|",
        ]
        for method, v in report["mean_mae_rounds_1_4"].items():
            minus = report.get("deeper_minus", {}).get(method)
            lines.append(f"| {method} | {percentile_row(v)} | {percentile_row(minus) if minus else ''} |")
        lines.append("")
    if "headroom_mae" in report:
        lines += [
            "The frozen model's MAE on W_1 by persona (stage headroom, evaluation users):",
            "",
            "| persona | MAE |",
            "|---|---|",
        ]
        lines += [f"| {c} | {percentile_row(v)} |" for c, v in report["headroom_mae"].items()]
        lines.append("")
    for k in (1, 2):
        y = report.get(f"pair_yield_it{k}")
        if y:
            lines += [
                (
                    f"Iteration {k} pair yield: {y['candidates']} candidates of {y['contexts']} contexts; "
                    f"{y['better_than_old']} beat the old persona (r > 0), {y['positives']} positive, {y['negatives']} "
                    f"negative; {y['contexts_with_positive_and_negative']} contexts hold both a positive and a "
                    f"negative, {y['contexts_spread_at_least_delta']} a reward spread of at least delta, "
                    f"{y['contexts_all_equal']} whose candidates all tie; mean error of the old persona "
                    f"{y['old_eps_mean']:.3f}, of the candidates {y['new_eps_mean']:.3f}."
                ),
                "",
            ]
    for k in (1, 2):
        t = report.get(f"train_vs_held_out_it{k}")
        if t:
            lines.append(
                f"Iteration {k}: {t['pairs']} pairs, {t['steps']} steps ({t['epochs']:.1f} epochs); reward "
                f"margin train {t['train_reward_margin_last']} / held-out {t['held_out_reward_margin']}, "
                f"accuracy train {t['train_reward_accuracy_last']} / held-out {t['held_out_reward_accuracy']}."
            )
        c = report.get(f"candidates_it{k}")
        if c:
            lines.append(
                f"Iteration {k} candidates stating no taste at all: {c['stating_no_taste']} of {c['candidates']}."
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

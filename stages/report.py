"""Stage report: the evaluation tables of all methods -> metrics/eval.json, the plots' data and a case study.

    python -m stages.report                      # as `dvc repro report` runs it
    python -m stages.report --eval-dir /tmp/eval --metrics /tmp/eval.json --plots-dir /tmp/plots

metrics/eval.json (read with `dvc metrics show` / `dvc metrics diff`):
    rounds
    methods.<method>.domains.<domain>:
        users, mae_r0 .. mae_r<rounds> (eps_{t+1|S_t}), each with mae_r<s>_parse_failed_share beside it (the
        share of that window's items predicted as the fallback 3: json answers without a valid rating),
        reduction_pct (mae_r0 -> last round, positive = better),
        first_update.{prev,curr,fut}.{before,after,delta} (S_0 vs S_1 on W_0, W_1, W_2: the paper's Table 1),
        pairwise_accuracy.r0 .. r<rounds> (the pairwise choice task, Table 25: of the next window's item pairs the
        user rated differently, the share whose higher-rated item the persona's predictions rank higher),
        persona_tokens.r0 .. r<rounds>, predict_failed_items, update_failures, update_flags,
        update_stopped_at_limit_share (the method's update answers that reached evaluate.sampling.max_new_tokens)
    methods.<method>.{seen,unseen,all}: the same numbers averaged over those domains (each domain weighs the
        same, as the paper's averages; counts summed), plus `domains` (how many)
    first_update_reward.<refiner>: the reward of the first update on held-out users (deeper/reward.py with
        params reward.weights; r and its parts, shares by tau_pos / tau_neg), for the refiners (untrained,
        deeper_it1, deeper) among `evaluate.methods`; `.domains.<domain>` the mean r per domain
    bootstrap: error bars over evaluation users (deeper/bootstrap.py; params evaluate.bootstrap):
        resamples, level, seed; methods.<method>.{mean_mae,reduction_pct}.{estimate,low,high} (mean_mae: the mean
        of mae_r1 .. mae_r<rounds>); vs_deeper.<method>.{mean_mae,reduction_pct}.{estimate,low,high}: DEEPER minus
        that method on the same resampled users (mean_mae below 0: DEEPER predicts better)
plots/mae_by_round.csv: method, round, mae (averaged over domains); `dvc plots show` draws one line per method.
plots/mae_by_round_domain.csv: method, domain, round, mae per domain and for the seen, unseen and all averages
    (the paper's Fig. 4).
plots/first_update_reward.csv: method, part (r, r_prev, r_curr, r_fut), domain, user_id, reward: the held-out
    first-update rewards of the refiners, one row per user and part (the paper's Fig. 3 histograms).
plots/persona_similarity.csv: method, round, similarity: how much each round's update rewrote the persona (the
    paper's Fig. 7a; deeper/similarity.py), also in eval.json as persona_similarity.<method>.r1 ..
reports/case_study.md: one evaluation user's personas per method and round with that round's error (Table 27).
"""

from __future__ import annotations

from pathlib import Path

import click

from deeper.bootstrap import BootstrapSettings, format_interval, paired_bootstrap
from deeper.methods import reference_method
from deeper.metrics import write_json
from deeper.outputs import write_csv, write_text
from deeper.pairs import thresholds_from_params
from deeper.report import PLOT_FILES, build_report, case_study, persona_similarity
from deeper.reward import RewardWeights
from deeper.rollout import EvaluateSettings, read_eval_table
from deeper.similarity import PersonaEmbedder, embedder_from_params
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


def run(
    params: dict,
    eval_dir: Path,
    metrics_path: Path,
    plots_dir: Path,
    case_path: Path,
    case_user: str | None = None,
) -> dict:
    settings = EvaluateSettings.from_params(params)
    rounds, methods = settings.rounds, list(settings.methods)
    refiners = {name for name, spec in settings.methods.items() if spec.is_refiner}
    weights = RewardWeights.from_params(params)
    tau_pos, tau_neg = thresholds_from_params(params)
    tables = {m: read_eval_table(eval_dir / f"{m}.parquet", m, rounds) for m in methods}
    metrics, plots = build_report(tables, rounds, weights, tau_pos, tau_neg, refiners)
    reference = reference_method(settings.methods)
    metrics["bootstrap"] = paired_bootstrap(tables, rounds, BootstrapSettings.from_params(params), reference)
    folder = embedder_from_params(params)
    embedder = PersonaEmbedder(folder) if folder is not None else None
    metrics["persona_similarity"], plots["persona_similarity.csv"] = persona_similarity(
        tables, rounds, embedder
    )
    page = case_study(tables, rounds, case_user)
    write_json(metrics_path, metrics)
    for name, rows in plots.items():
        write_csv(plots_dir / name, PLOT_FILES[name], rows)
    write_text(case_path, page)
    for method in methods:
        overall = metrics["methods"][method]["all"]
        first, last, cut = (overall.get(k) for k in ("mae_r0", f"mae_r{rounds}", "reduction_pct"))
        shown = [f"{v:.3f}" if isinstance(v, float) else str(v) for v in (first, last)]
        cut_shown = f"{cut:.1f} %" if isinstance(cut, float) else str(cut)
        boot = metrics["bootstrap"]
        mean = boot["methods"][method]["mean_mae"]
        versus = boot.get(f"vs_{reference}", {}).get(method, {}).get("mean_mae")
        versus_shown = f", {reference} minus it {format_interval(versus, signed=True)}" if versus else ""
        click.echo(
            f"{method:>11}: mae r0 {shown[0]} -> r{rounds} {shown[1]} (reduction {cut_shown}); mean of rounds "
            f"1-{rounds} {format_interval(mean)}{versus_shown}",
            err=True,
        )
    click.echo(
        f"[low, high]: {boot['level']:.0%} intervals of a paired bootstrap over evaluation users "
        f"({boot['resamples']} resamples); case study: {case_path}",
        err=True,
    )
    return metrics


@click.command(
    help=__doc__.split("\n\n")[0]
    + "\n\n"
    + (
        "Per method and domain: the future-window error after each round (mae_r0 ..), its reduction from round 0 "
        "to the last (reduction_pct), the first update's errors on the previous, current and future windows, "
        "persona tokens per round and failures; averages over seen, unseen and all domains; the held-out reward "
        "of the first update for the refiners. The shape is documented in stages/report.py."
    )
)
@PARAMS_OPTION
@click.option(
    "--eval-dir",
    default="data/eval",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the evaluate stages wrote <method>.parquet.",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/eval.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Errors per round, method and domain; first update; rewards.",
)
@click.option(
    "--plots-dir",
    default="plots",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the plot data go: " + ", ".join(f"{n} ({', '.join(c)})" for n, c in PLOT_FILES.items()) + ".",
)
@click.option(
    "--case-study",
    "case_path",
    default="reports/case_study.md",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="One evaluation user's personas, method by method and round by "
    "round, with each round's error (Markdown).",
)
@click.option(
    "--case-user", default=None, help="That user, as domain/user_id [default: the first in sorted order]."
)
@user_errors
def main(params_path, eval_dir, metrics_path, plots_dir, case_path, case_user):
    run(
        load_checked_params(params_path),
        Path(eval_dir),
        Path(metrics_path),
        Path(plots_dir),
        Path(case_path),
        case_user,
    )


if __name__ == "__main__":
    main()

"""Stage evaluate@<method>: persona updates over several rounds on the evaluation users, errors per round.

    python -m stages.evaluate --method deeper        # as `dvc repro evaluate@deeper` runs it
    python -m stages.evaluate --method incupdate --out-dir /tmp/eval --params my.yaml

Every evaluation user of every domain (params `evaluate.users` may narrow this) starts from the initial
persona S_0 (data/personas/init.parquet). Each round t = 1..`evaluate.rounds` predicts W_t with S_{t-1} and
updates S_t with the method; the last persona predicts the window after (deeper/rollout.py). The first update
is also scored on W_0, W_1 and W_2 (the paper's Table 1).

Methods: the entries of params `evaluate.methods` (deeper/methods says what an entry holds): e.g. deeper (refine
on the policy + models/adapters/it2), deeper_it1 (+ models/adapters/it1), untrained (the bare policy),
frozen_refiner (refine on the frozen model), incupdate, hiermerge, fullregen, slideregen (frozen model).
Updates are generated with `evaluate.sampling` (greedy by default, so a re-run gives the same personas);
predictions follow `predict`; persona tokens are counted with `persona.tokenizer`. All model calls go through
the response cache, so a killed run resumes where it stopped.

Writes <out-dir>/<method>.parquet (one row per user and round, see deeper/rollout.py) and <runs-dir>/<method>.json
(users, skips, failures, prediction stats, model calls, timings).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import pyarrow as pa

from deeper.config import get
from deeper.errors import ConfigError, InputError
from deeper.metrics import write_json
from deeper.outputs import write_parquet
from deeper.predict import PredictSettings
from deeper.prompts import prompts_from_params
from deeper.rollout import EvaluateSettings, load_eval_users, rollout
from stages._cli import PARAMS_OPTION, echo_calls, load_checked_params, user_errors

OUT_SCHEMA = pa.schema(
    [
        ("domain", pa.string()),
        ("user_id", pa.string()),
        ("seen", pa.bool_()),
        ("round", pa.int64()),
        ("persona", pa.string()),
        ("persona_tokens", pa.int64()),
        ("persona_words", pa.int64()),
        ("update_failure", pa.string()),
        ("update_flag", pa.string()),
        ("answers", pa.list_(pa.string())),
        ("mae", pa.float64()),
        ("items", pa.int64()),
        ("predict_failed_items", pa.int64()),
        ("mae_w0", pa.float64()),
        ("mae_w1", pa.float64()),
        ("mae_w2", pa.float64()),
        ("predicted", pa.list_(pa.float64())),
        ("actual", pa.list_(pa.float64())),
        ("update_stopped_at_limit", pa.int64()),
    ]
)


def run(
    params: dict,
    method: str,
    windows: Path,
    personas: Path,
    out_dir: Path,
    adapter: str | None = None,
    progress: bool = True,
    runs_dir: Path | None = None,
) -> dict:
    """Evaluate one method; returns the small summary written next to the table."""
    from deeper.iteration import load_frozen_and_writer
    from deeper.personas import token_counter

    settings = EvaluateSettings.from_params(params)
    if method not in settings.methods:
        raise ConfigError(
            "--method", f"{method!r} is not one of evaluate.methods: {', '.join(settings.methods)}"
        )
    spec = settings.methods[method]
    if adapter is not None and spec.adapter is None:
        raise ConfigError("--adapter", f"method {method} runs without an adapter")
    adapter = adapter if adapter is not None else spec.adapter
    if adapter is not None and not Path(adapter).is_dir():
        raise InputError(
            adapter, f"adapter folder of method {method} not found; run the training stage first"
        )
    rounds, sampling = settings.rounds, settings.sampling
    domains, per_domain = settings.domains, settings.per_domain
    predict_settings = PredictSettings.from_params(params)
    tokenizer = get(params, "persona.tokenizer")
    users, skipped = load_eval_users(windows, personas, rounds, domains, per_domain)
    count_tokens = token_counter(str(tokenizer))

    started = time.perf_counter()
    frozen, updater = load_frozen_and_writer(params, spec.role, adapter)
    load_seconds = time.perf_counter() - started
    click.echo(
        f"evaluate {method}: {len(users)} users, {rounds} rounds, updates by models.{spec.role}"
        f"{' + ' + adapter if adapter else ''}",
        err=True,
    )
    prompts = prompts_from_params(params)
    result = rollout(
        users,
        spec.build(updater, sampling, prompts),
        frozen,
        rounds,
        predict_settings,
        count_tokens,
        progress=progress,
        label=method,
        prompts=prompts,
    )

    table_path = out_dir / f"{method}.parquet"
    write_parquet(result.table, table_path, OUT_SCHEMA)
    table = result.table
    summary = {
        "method": method,
        "role": spec.role,
        "adapter": adapter,
        "rounds": rounds,
        "users": len(users),
        "domains": sorted(table["domain"].unique().tolist()),
        "skipped_users": skipped,
        "update_failures": {str(k): int(v) for k, v in table["update_failure"].value_counts().items()},
        "update_flags": {str(k): int(v) for k, v in table["update_flag"].value_counts().items()},
        "predict": result.predict_stats.to_metrics(),
        # model calls and response-cache hits; "updater" only when the updates had a model of their own
        "calls": {"frozen": frozen.stats(), **({} if updater is frozen else {"updater": updater.stats()})},
        "seconds": {"load": load_seconds, **result.seconds, "total": time.perf_counter() - started},
        "sampling": sampling.key(),
    }
    runs_dir = out_dir if runs_dir is None else runs_dir
    runs_dir.mkdir(parents=True, exist_ok=True)
    write_json(runs_dir / f"{method}.json", summary)
    echo_calls("frozen", frozen)
    if updater is not frozen:
        echo_calls(spec.role, updater)  # the "updater" of the summary's calls
    click.echo(
        f"wrote {table_path}: mean error by round "
        f"{[round(v, 3) for v in table.groupby('round')['mae'].mean().tolist()]}",
        err=True,
    )
    return summary


@click.command(help="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2, 3, 4)))
@click.option("--method", required=True, help="The persona update method: a name of params evaluate.methods.")
@PARAMS_OPTION
@click.option(
    "--windows",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The window stage's output (evaluation users and their windows).",
)
@click.option(
    "--personas",
    default="data/personas/init.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The init_personas stage's output (S_0).",
)
@click.option(
    "--runs-dir",
    default="data/eval_runs",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where <method>.json goes: the run's counts and timings (apart from the tables, so that the "
    "report, which reads the tables' folder, does not re-run for new timings).",
)
@click.option(
    "--out-dir",
    default="data/eval",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where <method>.parquet goes.",
)
@click.option(
    "--adapter",
    default=None,
    type=click.Path(file_okay=False),
    help="LoRA adapter folder for the update model instead of the method's own "
    "(deeper: models/adapters/it2).",
)
@user_errors
def main(method, params_path, windows, personas, out_dir, runs_dir, adapter):
    run(
        load_checked_params(params_path),
        method,
        Path(windows),
        Path(personas),
        Path(out_dir),
        adapter,
        runs_dir=Path(runs_dir),
    )


if __name__ == "__main__":
    main()

"""Stage headroom: does the frozen model read personas, and how much could a better persona gain at most?

    python -m stages.headroom                        # as `dvc repro headroom` runs it
    python -m stages.headroom --params other.yaml --out /tmp/h.parquet --metrics /tmp/h.json --plot /tmp/h.csv

On the evaluation users (params `evaluate.users`, as the evaluate stages), the frozen model (`models.frozen`,
behind the response cache) predicts W_<headroom.window> given no persona, another user's S_0, the user's own
S_0, and two oracle personas it writes itself with the S_0 prompt and settings (`persona`): one from that very
window, one from all of the user's windows. metrics/headroom.json has each condition's mean MAE with its
paired bootstrap interval (`evaluate.bootstrap`), sensitivity = shuffled - own, headroom = own - oracle, and the
spread of predictions within a window (deeper/headroom.py has the definitions). Cheap: ratings are prefill
only; the writing is two personas per user.

Read the result before spending GPU time: an interval of sensitivity through 0 says the frozen model predicts
as well from another user's persona as from the right one, so no refiner can be measured with it.
"""

from __future__ import annotations

from pathlib import Path

import click
import pyarrow as pa

from deeper.bootstrap import BootstrapSettings, format_interval
from deeper.config import get
from deeper.headroom import CONDITIONS, CONTRASTS, HeadroomSettings, check_window, measure, plot_rows
from deeper.iteration import load_frozen
from deeper.metrics import write_json
from deeper.outputs import write_csv, write_parquet
from deeper.personas import PersonaSettings
from deeper.predict import PredictSettings
from deeper.prompts import prompts_from_params
from deeper.rollout import EvaluateSettings, load_eval_users
from stages._cli import PARAMS_OPTION, echo_calls, load_checked_params, user_errors

OUT_SCHEMA = pa.schema(
    [
        ("domain", pa.string()),
        ("user_id", pa.string()),
        ("condition", pa.string()),
        ("persona", pa.string()),
        ("mae", pa.float64()),
        ("spread", pa.float64()),
        ("predicted", pa.list_(pa.float64())),
        ("actual", pa.list_(pa.float64())),
    ]
)


def run(params: dict, windows: Path, personas: Path, out: Path, metrics: Path, plot: Path) -> dict:
    settings = HeadroomSettings.from_params(params)
    evaluate = EvaluateSettings.from_params(params)
    persona = PersonaSettings.from_params(params)
    predict = PredictSettings.from_params(params)
    bootstrap = BootstrapSettings.from_params(params)
    prompts = prompts_from_params(params)
    users, skipped = load_eval_users(
        windows, personas, evaluate.rounds, evaluate.domains, evaluate.per_domain
    )
    check_window(users, settings.window)
    frozen = load_frozen(params)
    name = str(get(params, "models.frozen.name"))
    click.echo(
        f"headroom: {len(users)} evaluation users, W_{settings.window}, {len(CONDITIONS)} personas each, "
        f"frozen model {name}",
        err=True,
    )
    result = measure(
        users,
        frozen,
        prompts,
        persona,
        predict,
        settings,
        bootstrap,
        log=lambda line: click.echo(f"oracle personas: {line}", err=True),
    )
    echo_calls("frozen", frozen)

    write_parquet(result.table, out, OUT_SCHEMA)
    summary = {**result.summary, "skipped_users": skipped, "frozen": name}
    write_json(metrics, summary)
    write_csv(
        plot,
        ["condition", "mae", "low", "high"],
        (
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
            for row in plot_rows(summary)
        ),
    )
    shown = ", ".join(f"{name} {format_interval(summary[name], signed=True)}" for name in CONTRASTS)
    click.echo(f"wrote {out}, {metrics}, {plot}: {shown}", err=True)
    return summary


@click.command(
    help="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2, 3))
    + "\n\nOutputs: --out (one row per user and condition), --metrics, --plot."
)
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
    help="The init_personas stage's output (each user's S_0).",
)
@click.option(
    "--out",
    default="data/headroom/users.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Columns domain, user_id, condition, persona, mae, spread, predicted, actual.",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/headroom.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Each condition's MAE and interval, sensitivity, headroom.",
)
@click.option(
    "--plot",
    "plot_path",
    default="plots/headroom.csv",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="One row per condition: mae, low, high (dvc plots).",
)
@user_errors
def main(params_path, windows, personas, out, metrics_path, plot_path):
    run(
        load_checked_params(params_path),
        Path(windows),
        Path(personas),
        Path(out),
        Path(metrics_path),
        Path(plot_path),
    )


if __name__ == "__main__":
    main()

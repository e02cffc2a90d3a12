"""Stage init_personas: the initial persona S_0 of every windowed user (train and eval), written by the
frozen model from the user's first window W_0 (DEEPER Appendix A.1, template deeper/prompts/init.txt).

    python -m stages.init_personas                         # as `dvc repro` runs it
    python -m stages.init_personas --params my.yaml --out /tmp/init.parquet --metrics /tmp/personas.json

Reads params `models.frozen` (the backend, loaded with deeper.llm.load_llm and wrapped in the response
cache, so a killed run resumes where it stopped) and `persona` (generation settings, degenerate-output
handling, the tokenizer that counts persona tokens).

Degenerate generations (no letters, fewer than `persona.min_words` words, or a loop) are re-sampled with
seeds seed+1 .. seed+retries (not when temperature is 0: greedy decoding would repeat itself). A user whose
every attempt is degenerate keeps the longest attempt, flagged in the `degenerate` column (the reason) and
counted in metrics/personas.json; it is never dropped silently and never replaced by made-up text.
A kept S_0 whose generation reached `persona.max_new_tokens` (it may be cut short) is marked in the
`stopped_at_limit` column; its count and share are in the metrics.
"""

from __future__ import annotations

from pathlib import Path

import click
import pandas as pd
import pyarrow as pa

from deeper.config import get
from deeper.data.schema import SPLITS
from deeper.errors import ConfigError
from deeper.personas import (
    PersonaSettings,
    count_words,
    degenerate_reason,
    generate_personas,
    init_chat,
    token_counter,
)
from deeper.prompts import prompts_from_params
from deeper.tables import read_windows
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors
from stages._tail import stage_tail

OUT_SCHEMA = pa.schema(
    [
        ("domain", pa.string()),
        ("user_id", pa.string()),
        ("split", pa.string()),
        ("persona", pa.string()),
        ("persona_tokens", pa.int64()),
        ("persona_words", pa.int64()),
        ("attempts", pa.int64()),
        ("degenerate", pa.string()),
        ("stopped_at_limit", pa.bool_()),
    ]
)
LONG_PERSONA_WORDS = 200  # the paper asks the initial persona for at least 200 words


def summarise(df: pd.DataFrame, retried: int, tokenizer: str) -> dict:
    def spread(column):
        values = df[column]
        return (
            {"mean": float(values.mean()), "min": int(values.min()), "max": int(values.max())}
            if len(df)
            else {}
        )

    reasons = df["degenerate"].dropna().value_counts()
    return {
        "count": len(df),
        "by_split": {s: int((df["split"] == s).sum()) for s in SPLITS},
        "tokens": spread("persona_tokens"),
        "words": spread("persona_words"),
        "share_200_words": float((df["persona_words"] >= LONG_PERSONA_WORDS).mean()) if len(df) else None,
        "empty": int((df["persona_words"] == 0).sum()),
        "degenerate": {r: int(reasons.get(r, 0)) for r in ("empty", "too_short", "repetitive")},
        "retried_users": retried,
        # kept S_0 whose generation reached persona.max_new_tokens: cut short, not finished by the model
        "stopped_at_limit": int(df["stopped_at_limit"].sum()),
        "stopped_at_limit_share": float(df["stopped_at_limit"].mean()) if len(df) else None,
        "token_counter": tokenizer,
    }


def run(params: dict, windows: Path, out: Path, metrics: Path) -> dict:
    from deeper.llm.loading import load_cached

    settings = PersonaSettings.from_params(params)
    spec = get(params, "models.frozen")
    if not isinstance(spec, dict):
        raise ConfigError("models.frozen", "must be a mapping such as {backend: transformers, name: ...}")
    prompts = prompts_from_params(params)  # a broken template fails here, before the model loads
    table = read_windows(windows)  # validated (sorted by domain, user_id, window, pos) before any model loads
    counter = token_counter(settings.tokenizer)
    w0 = table[table["window"] == 0]

    users = []
    chats = []
    for (domain, user_id), rows in w0.groupby(["domain", "user_id"], sort=True):
        users.append((domain, user_id, rows["split"].iloc[0]))
        chats.append(init_chat(prompts, rows["item_type"].iloc[0], zip(rows["title"], rows["rating"])))
    click.echo(f"{len(users)} users: writing S0 with {spec.get('name')} ({spec.get('backend')})", err=True)

    llm = load_cached(spec, where="models.frozen")
    personas, tries, at_limit = generate_personas(
        llm, chats, settings, log=lambda line: click.echo(line, err=True)
    )
    df = pd.DataFrame(users, columns=["domain", "user_id", "split"])
    df["persona"] = personas
    df["persona_tokens"] = [counter(p) for p in personas]
    df["persona_words"] = [count_words(p) for p in personas]
    df["attempts"] = tries
    df["degenerate"] = [degenerate_reason(p, settings.min_words) for p in personas]
    df["stopped_at_limit"] = at_limit
    summary = summarise(df, retried=int((df["attempts"] > 1).sum()), tokenizer=settings.tokenizer)
    flagged = sum(summary["degenerate"].values())
    what = (
        f"{len(df)} personas, {flagged} flagged degenerate, {summary['stopped_at_limit']} stopped at "
        f"max_new_tokens={settings.sampling.max_new_tokens}; metrics in {metrics}"
    )
    stage_tail(df, out, metrics, summary, {"frozen": llm}, what, schema=OUT_SCHEMA)
    return summary


@click.command(
    help=__doc__.split("\n\n")[0] + "\n\nOutputs: --out (one row per user) and --metrics (lengths, failures)."
)
@PARAMS_OPTION
@click.option(
    "--windows",
    default="data/window/windows.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="The window stage's output; the W_0 rows are used.",
)
@click.option(
    "--out",
    default="data/personas/init.parquet",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Columns domain, user_id, split, persona, persona_tokens, persona_words, attempts, degenerate.",
)
@click.option(
    "--metrics",
    "metrics_path",
    default="metrics/personas.json",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Persona count, lengths, degenerate generations.",
)
@user_errors
def main(params_path, windows, out, metrics_path):
    run(load_checked_params(params_path), Path(windows), Path(out), Path(metrics_path))


if __name__ == "__main__":
    main()

"""Stage evaluate@<method>: persona updates over several rounds on the evaluation users, errors per round.

    python -m stages.evaluate --method deeper        # as `dvc repro evaluate@deeper` runs it
    python -m stages.evaluate --method incupdate --out-dir /tmp/eval --params my.yaml

Every evaluation user of every domain (params `evaluate.users` may narrow this) starts from the initial
persona S_0 (data/personas/init.parquet). Each round t = 1..`evaluate.rounds` predicts W_t with S_{t-1} and
updates S_t with the method; the last persona predicts the window after (deeper/rollout.py). The first update
is also scored on W_0, W_1 and W_2 (the paper's Table 1).

Methods (deeper/methods): deeper (policy + models/adapters/it2), deeper_it1 (policy + models/adapters/it1),
untrained (policy, no adapter), incupdate, hiermerge, fullregen, slideregen (frozen model).
Updates are generated with `evaluate.sampling` (greedy by default, so a re-run gives the same personas);
predictions follow `predict`; persona tokens are counted with `persona.tokenizer`. All model calls go through
the response cache, so a killed run resumes where it stopped.

Writes <out-dir>/<method>.parquet (one row per user and round, see deeper/rollout.py) and <out-dir>/<method>.json
(users, skips, failures, prediction stats, model calls, timings).
"""

from __future__ import annotations

import time
from pathlib import Path

import click
import pyarrow as pa
import pyarrow.parquet as pq

from deeper.config import get, load_params
from deeper.errors import ConfigError, InputError
from deeper.llm.base import Sampling
from deeper.methods import METHODS, method_spec
from deeper.metrics import write_json
from deeper.predict import PredictSettings
from deeper.rollout import EvalUser, rollout, windows_needed
from deeper.tables import domain_seen, read_windows
from stages._cli import PARAMS_OPTION, user_errors

SAMPLING_KEYS = ("temperature", "top_p", "repetition_penalty", "max_new_tokens", "seed")
USER_KEYS = ("domains", "per_domain")
OUT_SCHEMA = pa.schema([
    ("domain", pa.string()), ("user_id", pa.string()), ("seen", pa.bool_()), ("round", pa.int64()),
    ("persona", pa.string()), ("persona_tokens", pa.int64()), ("persona_words", pa.int64()),
    ("update_failure", pa.string()), ("update_flag", pa.string()), ("answers", pa.list_(pa.string())),
    ("mae", pa.float64()), ("items", pa.int64()), ("predict_failed_items", pa.int64()),
    ("mae_w0", pa.float64()), ("mae_w1", pa.float64()), ("mae_w2", pa.float64()),
])


def rounds_from_params(params: dict) -> int:
    rounds = get(params, "evaluate.rounds")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError("evaluate.rounds", f"must be an integer >= 1, got {rounds!r}")
    return rounds


def sampling_from_params(params: dict) -> Sampling:
    block = get(params, "evaluate.sampling")
    if not isinstance(block, dict):
        raise ConfigError("evaluate.sampling", f"must be a mapping with keys {list(SAMPLING_KEYS)}")
    unknown = sorted(set(block) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"evaluate.sampling.{unknown[0]}", f"unknown key; known: {list(SAMPLING_KEYS)}")
    values = {}
    for key in SAMPLING_KEYS:
        kind = int if key in ("max_new_tokens", "seed") else float
        value = block.get(key, getattr(Sampling, key))
        try:
            values[key] = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"evaluate.sampling.{key}", f"must be a number, got {value!r}") from None
        if values[key] < 0 or (key == "max_new_tokens" and values[key] < 1):
            raise ConfigError(f"evaluate.sampling.{key}", f"out of range: {value!r}")
    return Sampling(**values)


def user_filter_from_params(params: dict) -> tuple[list[str] | None, int | None]:
    block = get(params, "evaluate.users", {}) or {}
    if not isinstance(block, dict):
        raise ConfigError("evaluate.users", f"must be a mapping with keys {list(USER_KEYS)}")
    unknown = sorted(set(block) - set(USER_KEYS))
    if unknown:
        raise ConfigError(f"evaluate.users.{unknown[0]}", f"unknown key; known: {list(USER_KEYS)}")
    domains, per_domain = block.get("domains"), block.get("per_domain")
    if domains is not None and (not isinstance(domains, list) or not all(isinstance(d, str) for d in domains)):
        raise ConfigError("evaluate.users.domains", f"must be null (all) or a list of domain names, got {domains!r}")
    bad_count = isinstance(per_domain, bool) or not isinstance(per_domain, int) or per_domain < 1
    if per_domain is not None and bad_count:
        raise ConfigError("evaluate.users.per_domain", f"must be null (all) or an integer >= 1, got {per_domain!r}")
    return domains, per_domain


def load_eval_users(windows: Path, personas: Path, rounds: int, domains: list[str] | None,
                    per_domain: int | None) -> tuple[list[EvalUser], dict]:
    """The evaluation users with S_0 and enough windows; skips counted by reason."""
    from deeper.iteration import read_personas, user_windows

    table = read_windows(windows)
    seen = domain_seen(table)
    if domains is not None:
        unknown = sorted(set(domains) - set(seen))
        if unknown:
            raise ConfigError("evaluate.users.domains", f"no domain {unknown[0]!r} in {windows}; have {sorted(seen)}")
    initial = read_personas(personas, split="eval")
    skipped = {"too_few_windows": 0, "no_persona": 0}
    users, taken = [], {}
    for user in user_windows(table, split="eval"):  # sorted by domain, user_id
        if domains is not None and user.domain not in domains:
            continue
        if per_domain is not None and taken.get(user.domain, 0) >= per_domain:
            continue
        persona = initial.get((user.domain, user.user_id))
        if persona is None:
            skipped["no_persona"] += 1
            continue
        if len(user.windows) < windows_needed(rounds):
            skipped["too_few_windows"] += 1
            continue
        taken[user.domain] = taken.get(user.domain, 0) + 1
        users.append(EvalUser(user.domain, user.user_id, user.item_type, seen[user.domain], user.windows, persona))
    if not users:
        raise InputError(windows, f"no evaluation user with an initial persona and {windows_needed(rounds)} windows "
                                  f"(skipped: {skipped})")
    return users, skipped


def run(params: dict, method: str, windows: Path, personas: Path, out_dir: Path, adapter: str | None = None,
        progress: bool = True) -> dict:
    """Evaluate one method; returns the small summary written next to the table."""
    from deeper.llm import load_llm
    from deeper.llm.cache import CachedLLM
    from deeper.personas import token_counter

    spec = method_spec(method, key="--method")
    if adapter is not None and spec.adapter is None:
        raise ConfigError("--adapter", f"method {method} runs without an adapter")
    adapter = adapter if adapter is not None else spec.adapter
    if adapter is not None and not Path(adapter).is_dir():
        raise InputError(adapter, f"adapter folder of method {method} not found; run the training stage first")
    rounds = rounds_from_params(params)
    sampling = sampling_from_params(params)
    domains, per_domain = user_filter_from_params(params)
    predict_settings = PredictSettings.from_params(params)
    tokenizer = get(params, "persona.tokenizer")
    frozen_spec = get(params, "models.frozen")
    update_spec = get(params, f"models.{spec.role}")
    users, skipped = load_eval_users(windows, personas, rounds, domains, per_domain)
    count_tokens = token_counter(str(tokenizer))

    started = time.perf_counter()
    frozen = CachedLLM(load_llm(frozen_spec, where="models.frozen"))
    if adapter is None and update_spec == frozen_spec:  # one model serves both: load it once
        updater = frozen
    else:
        updater = CachedLLM(load_llm(update_spec, adapter=adapter, where=f"models.{spec.role}"))
    load_seconds = time.perf_counter() - started
    click.echo(f"evaluate {method}: {len(users)} users, {rounds} rounds, updates by models.{spec.role}"
               f"{' + ' + adapter if adapter else ''}", err=True)
    result = rollout(users, spec.build(updater, sampling), frozen, rounds, predict_settings, count_tokens,
                     progress=progress, label=method)

    out_dir.mkdir(parents=True, exist_ok=True)
    table_path = out_dir / f"{method}.parquet"
    pq.write_table(pa.Table.from_pandas(result.table, schema=OUT_SCHEMA, preserve_index=False), table_path)
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
    write_json(out_dir / f"{method}.json", summary)
    click.echo(f"wrote {table_path}: mean error by round "
               f"{[round(v, 3) for v in table.groupby('round')['mae'].mean().tolist()]}", err=True)
    return summary


@click.command(help="\n\n".join(__doc__.split("\n\n")[i] for i in (0, 2, 3, 4)))
@click.option("--method", required=True, type=click.Choice(list(METHODS)), help="The persona update method.")
@PARAMS_OPTION
@click.option("--windows", default="data/window/windows.parquet", show_default=True, type=click.Path(dir_okay=False),
              help="The window stage's output (evaluation users and their windows).")
@click.option("--personas", default="data/personas/init.parquet", show_default=True, type=click.Path(dir_okay=False),
              help="The init_personas stage's output (S_0).")
@click.option("--out-dir", default="data/eval", show_default=True, type=click.Path(file_okay=False),
              help="Where <method>.parquet and <method>.json go.")
@click.option("--adapter", default=None, type=click.Path(file_okay=False),
              help="LoRA adapter folder for the update model instead of the method's own "
                   "(deeper: models/adapters/it2).")
@user_errors
def main(method, params_path, windows, personas, out_dir, adapter):
    run(load_params(params_path), method, Path(windows), Path(personas), Path(out_dir), adapter)


if __name__ == "__main__":
    main()

"""Use the trained refiner: keep the personas of live users current as new ratings arrive (`deeper refine`).

`refine_users(params, source, store, adapter)` reads a file of new ratings with the ingest stage's own readers
(any format `ingest` reads, through a temporary DuckDB built by deeper.data.ingest), appends each user's new
ratings to those waiting in the persona store (deeper.store) and cuts them, in arrival order, into windows of
`window.size`. Then, round after round, for all users at once:
- a user new to the store first gets S_0: the frozen model writes it from the user's first full window with
  the `init` prompt (params `persona`, as stage init_personas does);
- every further window W is predicted with the current persona by the frozen model (params `predict`) and the
  policy + adapter refines the persona from the gap (deeper.methods.Refine, the prompt DEEPER was trained on;
  sampling `evaluate.sampling`, greedy by default), which gives the next round.
A user with fewer new ratings than a window waits: the ratings are kept as pending in the store (counted and
printed) and complete a window with the next file. A rating already in the store is skipped (counted), so
re-running a file adds nothing.

Every model call goes through the response cache (deeper.llm.cache), so a run killed half-way and started
again makes only the calls that had not finished. The store is written once, in one transaction, after every
call has returned; any bad input (params, options, adapter, rating file) stops the run before that with one
line and nothing written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import duckdb
from tqdm.auto import tqdm

from deeper.config import get
from deeper.data.ingest import check_unknown_items, ingest
from deeper.data.readers import READERS, SELF_NAMING, WITH_META, Source
from deeper.errors import DeeperError, InputError
from deeper.llm.base import stopped_at_limit
from deeper.methods.base import UpdateInput, Window
from deeper.methods.refine import Refine
from deeper.params import param
from deeper.personas import PersonaSettings, count_words, degenerate_reason, generate_personas, token_counter
from deeper.predict import PredictSettings, WindowRequest, predict_windows
from deeper.prompts import prompts_from_params
from deeper.store import PersonaStore, Rating, StaleState, UserState, window_key

if TYPE_CHECKING:
    from deeper.llm.cache import CachedLLM

DEFAULT_STORE = "personas.duckdb"
MAX_PLANS = 5  # plans per run: another run writing the same users in between makes this one plan again
SHOWN_WAITING = 10  # users listed by name in the "waiting for a full window" line


def input_source(
    fmt: str,
    path: str | Path,
    meta: str | Path | None = None,
    domain: str | None = None,
    item_type: str | None = None,
) -> Source:
    """A file (or folder) of new ratings as an ingest source; the options a format needs are checked here."""
    if fmt not in READERS:
        raise DeeperError(f"--format: {fmt!r} is not one of {', '.join(READERS)}")
    if fmt not in SELF_NAMING:
        for option, value in (("--domain", domain), ("--item-type", item_type)):
            if not value or not str(value).strip():
                raise DeeperError(
                    f"{option} is needed for format {fmt} (e.g. --domain movielens --item-type movie)"
                )
    if meta is not None and fmt not in WITH_META:
        raise DeeperError(f"--meta: format {fmt} has no titles file")
    return Source(fmt, Path(path), Path(meta) if meta is not None else None, domain, item_type)


def read_new_ratings(source: Source, unknown_items: str = "keep") -> tuple[dict, dict]:
    """{(domain, user_id): (item_type, [Rating] in time order)} and the ingest summary (skips by reason).

    The readers validate every row (a bad one is an InputError naming file and row) into a temporary DuckDB,
    exactly as the ingest stage builds data/ingest/ratings.duckdb."""
    with tempfile.TemporaryDirectory(prefix="deeper-refine-") as tmp:
        db = Path(tmp) / "new.duckdb"
        summary = ingest([source], db, check_unknown_items(unknown_items))
        with duckdb.connect(str(db), read_only=True) as con:
            rows = con.execute("""
                SELECT r.domain, d.item_type, r.user_id, r.item_id, i.title, r.rating, r.ts
                FROM ratings r JOIN items i USING (domain, item_id) JOIN domains d USING (domain)
                ORDER BY r.domain, r.user_id, r.window_hint NULLS FIRST, r.ts, r.seq""").fetchall()
    users: dict[tuple[str, str], tuple[str, list[Rating]]] = {}
    for domain, item_type, user_id, item_id, title, rating, ts in rows:
        users.setdefault((domain, user_id), (item_type, []))[1].append(
            Rating(item_id, title, float(rating), int(ts))
        )
    return users, summary


@dataclass
class UserPlan:
    """One user's work: the windows to turn into rounds and the ratings left waiting."""

    state: UserState
    item_type: str
    windows: list[list[Rating]]
    waiting: list[Rating]
    fresh: int  # new ratings (not already in the store)
    already: int  # ratings of the file already in the store (or twice in the file): skipped
    rounds: list[dict] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.fresh > 0


def plan_user(state: UserState, item_type: str, new: list[Rating], size: int) -> UserPlan:
    """The user's pending ratings, then the new ones not yet in the store, cut into full windows of `size`."""
    seen, fresh = set(state.known), []
    for rating in new:
        if rating.key not in seen:
            seen.add(rating.key)
            fresh.append(rating)
    stream = state.pending + fresh
    full = len(stream) // size
    return UserPlan(
        state,
        item_type,
        [stream[i * size : (i + 1) * size] for i in range(full)],
        stream[full * size :],
        len(fresh),
        len(new) - len(fresh),
    )


@dataclass
class Models:
    """The loaded models and what the store records about them."""

    frozen: CachedLLM
    policy: CachedLLM
    adapter: str | None
    adapter_fingerprint: str | None
    count_tokens: Callable[[str], int]


def default_adapter(params: dict) -> str | None:
    """The adapter of the evaluation's reference method (the first of params evaluate.methods: Model 2)."""
    from deeper.methods import methods_from_params, reference_method

    specs = methods_from_params(get(params, "evaluate.methods"))
    return specs[reference_method(specs)].adapter


def adapter_identity(policy_spec: dict, adapter: str | None) -> str | None:
    """The adapter's fingerprint: of its folder, or for the openai backend (where `adapter` is the name of a
    LoRA a server serves, e.g. vLLM's --lora-modules deeper=models/adapters/it2) `served:<name>`."""
    from deeper.llm.fingerprint import resolve_adapter

    if adapter is None:
        return None
    if policy_spec.get("backend") == "openai" and not (Path(adapter) / "adapter_config.json").is_file():
        return f"served:{adapter}"
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise InputError(
            adapter,
            "no peft adapter here (adapter_config.json missing); train one with "
            "`dvc repro train@2` or name another with --adapter",
        )
    return resolve_adapter(adapter, "--adapter")


def load_models(params: dict, adapter: str | None, adapter_fingerprint: str | None) -> Models:
    from deeper.iteration import load_frozen_and_writer

    frozen, policy = load_frozen_and_writer(params, "policy", adapter)
    counter = token_counter(str(get(params, "persona.tokenizer")))
    return Models(frozen, policy, adapter, adapter_fingerprint, counter)


def _round_row(
    plan: UserPlan, rnd: int, window: list[Rating], persona: str, models: Models, writer: str, **extra
) -> dict:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    return {
        "domain": plan.state.domain,
        "user_id": plan.state.user_id,
        "round": rnd,
        "item_type": plan.item_type,
        "persona": persona,
        "persona_words": count_words(persona),
        "persona_tokens": models.count_tokens(persona),
        "writer": writer,
        "window_key": window_key(window),
        "item_ids": [r.item_id for r in window],
        "titles": [r.title for r in window],
        "ts": [r.ts for r in window],
        "actual": [r.rating for r in window],
        "predicted": None,
        "mae_before": None,
        "predict_failed_items": None,
        "update_failure": None,
        "update_flag": None,
        "frozen_fingerprint": models.frozen.fingerprint,
        "policy_fingerprint": None,
        "adapter": None,
        "adapter_fingerprint": None,
        "created_at": now,
        **extra,
    }


def compute_rounds(plans: list[UserPlan], models: Models, params: dict, log: Callable[[str], None]) -> dict:
    """Fill each plan's `rounds`: S_0 for new users, then one refinement per window, all users per step.
    Returns how many of the kept S_0 and of the refinement answers stopped at their max_new_tokens."""
    prompts = prompts_from_params(params)
    persona_settings = PersonaSettings.from_params(params)
    predict_settings = PredictSettings.from_params(params)
    from deeper.rollout import EvaluateSettings

    refine = Refine(models.policy, EvaluateSettings.from_params(params).sampling, prompts)
    # (plan, index of the plan's next window, round number of the persona it holds, that persona)
    current: dict[int, tuple[int, int, str]] = {}
    at_limit = {"s0": 0, "refinements": 0}
    new = [i for i, p in enumerate(plans) if p.windows and p.state.last_round is None]
    if new:
        chats = [
            prompts.render(
                "init",
                item_type=plans[i].item_type,
                ratings=[(r.title, r.rating) for r in plans[i].windows[0]],
            )
            for i in new
        ]
        log(f"S_0 for {len(new)} users new to the store (frozen model, init prompt)")
        personas, _, s0_at_limit = generate_personas(models.frozen, chats, persona_settings, log=log)
        at_limit["s0"] += sum(s0_at_limit)
        for i, persona in zip(new, personas):
            # a degenerate S_0 (every attempt failed: the longest is kept, as init_personas does) is flagged
            plans[i].rounds.append(
                _round_row(
                    plans[i],
                    0,
                    plans[i].windows[0],
                    persona,
                    models,
                    "init",
                    update_flag=degenerate_reason(persona, persona_settings.min_words),
                )
            )
            current[i] = (1, 0, persona)
    for i, p in enumerate(plans):
        if p.windows and p.state.last_round is not None:
            assert p.state.persona is not None  # a stored round has its persona (NOT NULL)
            current[i] = (0, p.state.last_round, p.state.persona)
    steps = max((len(plans[i].windows) - current[i][0] for i in current), default=0)
    for step in tqdm(range(steps), desc="refine", unit="round", disable=steps == 0):
        todo = [i for i in sorted(current) if current[i][0] < len(plans[i].windows)]
        windows = [plans[i].windows[current[i][0]] for i in todo]
        requests = [
            WindowRequest(
                persona=current[i][2],
                item_type=plans[i].item_type,
                titles=[r.title for r in w],
                actual=[r.rating for r in w],
            )
            for i, w in zip(todo, windows)
        ]
        preds, _ = predict_windows(
            models.frozen, requests, predict_settings, prompts, progress=f"round {step + 1}/{steps}: predict"
        )
        inputs = [
            UpdateInput(
                item_type=plans[i].item_type,
                persona=current[i][2],
                history=(Window(tuple(r.title for r in w), tuple(r.rating for r in w)),),
                predictions=tuple(float(x) for x in pred.ratings),
            )
            for i, w, pred in zip(todo, windows, preds)
        ]
        results = refine.update(inputs)
        at_limit["refinements"] += sum(
            stopped_at_limit(answer) for res in results for answer in res.generated
        )
        for i, w, pred, res in zip(todo, windows, preds, results):
            index, rnd, _ = current[i]
            failed = 0 if pred.failed is None else int(pred.failed.sum())
            assert pred.mae is not None  # every request above carries the window's actual ratings
            plans[i].rounds.append(
                _round_row(
                    plans[i],
                    rnd + 1,
                    w,
                    res.persona,
                    models,
                    "refine",
                    predicted=[float(x) for x in pred.ratings],
                    mae_before=float(pred.mae),
                    predict_failed_items=failed,
                    update_failure=res.failure,
                    update_flag=res.flag,
                    policy_fingerprint=models.policy.fingerprint,
                    adapter=models.adapter,
                    adapter_fingerprint=models.adapter_fingerprint,
                )
            )
            current[i] = (index + 1, rnd + 1, res.persona)
    return at_limit


def refine_users(
    params: dict,
    source: Source,
    store: str | Path = DEFAULT_STORE,
    adapter: str | None = None,
    use_adapter: bool = True,
    log: Callable[[str], None] = print,
) -> dict:
    """Record new rounds for the users of a file of new ratings; returns what was done (counts, model calls).

    `params`: a params.yaml mapping, already checked (deeper.validate.check_params); read: window.size,
    ingest.unknown_items, models.frozen, models.policy, persona, predict, evaluate.sampling. `adapter`: a peft
    folder on the policy, for the openai backend the name of a served LoRA; None: the `deeper` evaluation
    method's (Model 2, models/adapters/it2). `use_adapter=False`: the untrained policy.
    """
    if not use_adapter:
        adapter = None
    elif adapter is None:
        adapter = default_adapter(params)
    size = param(params, "window.size", integer=True, low=1)
    unknown_items = check_unknown_items(get(params, "ingest.unknown_items", "keep"))
    adapter_fp = adapter_identity(get(params, "models.policy"), adapter)
    person_store = PersonaStore(store)
    person_store.states([])  # a file that is not a persona store fails here, before any model loads
    new, ingest_summary = read_new_ratings(source, unknown_items)
    summary = {
        "users_in_file": len(new),
        "ratings_in_file": sum(len(r) for _, r in new.values()),
        "ingest": ingest_summary["total"],
        "window_size": size,
        "store": str(store),
        "plans": 0,
    }
    models = None
    for _ in range(MAX_PLANS):
        summary["plans"] += 1
        states = person_store.states(sorted(new))
        plans = [
            plan_user(states[u], item_type, ratings, size) for u, (item_type, ratings) in sorted(new.items())
        ]
        changed = [p for p in plans if p.changed]
        if changed and models is None and any(p.windows for p in changed):
            models = load_models(params, adapter, adapter_fp)
        if models is not None:
            summary["stopped_at_limit"] = compute_rounds(
                [p for p in changed if p.windows], models, params, log
            )
        try:
            if changed:
                person_store.write(
                    {(p.state.domain, p.state.user_id): p.state for p in changed},
                    [row for p in changed for row in p.rounds],
                    {
                        (p.state.domain, p.state.user_id): [(p.item_type, r) for r in p.waiting]
                        for p in changed
                    },
                )
            break
        except StaleState as e:
            log(f"{e}; planning again (the response cache answers the calls already made)")
    else:
        raise DeeperError(
            f"{store}: other runs kept changing these users; {MAX_PLANS} plans given up, nothing written"
        )
    summary.update(_summarise(plans))
    if models is not None:
        summary["calls"] = {
            "frozen": models.frozen.stats(),
            **({} if models.policy is models.frozen else {"policy": models.policy.stats()}),
        }
    return summary


def _summarise(plans: list[UserPlan]) -> dict:
    waiting = [p for p in plans if p.waiting]
    return {
        "ratings_new": sum(p.fresh for p in plans),
        "ratings_already_in_store": sum(p.already for p in plans),
        "users_updated": sum(1 for p in plans if p.rounds),
        "users_new": sum(1 for p in plans if any(r["round"] == 0 for r in p.rounds)),
        "rounds_written": sum(len(p.rounds) for p in plans),
        "users_waiting": len(waiting),
        "waiting": {f"{p.state.domain}/{p.state.user_id}": len(p.waiting) for p in waiting},
    }

"""The cost and time plan of a profile before anything runs (`python -m stages.profile NAME --plan`).

For every stage of dvc.yaml that calls a model: the calls, prompt tokens and completion tokens, then dollars for
models behind OpenAI's API and GPU-hours for models on a GPU. Where each number comes from:

- Users: the domains of the ingest preset, each with the users params `window` asks for (train users of the
  seen domains, evaluation users of every domain, as `window.domains` or `window.default` says; `evaluate.users`
  narrows the evaluation): the numbers requested, so a domain with fewer eligible users costs less than planned.
- Calls: the stages' own arithmetic, one function per stage below, each naming the code it counts (a test checks
  them against the counts a real run writes into metrics/). Calls the response cache answers within a run are
  counted once: the round-0 predictions that every evaluation method shares. Calls that only happen on failure
  (a persona retried for being degenerate, a json prediction retried for an unparsable answer) are not planned:
  the stage metrics count them afterwards.
- Prompt tokens: the stages' prompts rendered by this code (the same render calls: `init_chat`, the prediction
  templates, each update method's `planned_chats`) on sample users of a windows file, with a persona of
  `plan.persona_tokens` tokens; counted with `persona.tokenizer` where it loads here, else the tokenizer named in
  the note (a hub tokenizer cannot be fetched on an offline machine), plus 4 tokens of chat markup per message.
- Completion tokens: `plan.persona_tokens` for every generated persona (at most the op's `max_new_tokens`), the
  rendered JSON answer for a json prediction, one token for a prefilled rating.
- Dollars: `plan.prices.<model name>` (USD per million input and output tokens) for a model on the openai backend
  without a base_url; with the Batch API, `plan.batch_discount` off. GPU-hours: tokens over
  `plan.gpu_tokens_per_s` for a model on vllm or transformers not set to `device: cpu` (or an openai-protocol
  server at a base_url). DPO
  training is not in the plan: its pairs are only known once rewards exist.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deeper.config import get
from deeper.errors import ConfigError
from deeper.params import mapping, number

CHAT_MARKUP_TOKENS = 4  # per message: role markers and separators of a chat template
PLAN_KEYS = ("persona_tokens", "prices", "batch_discount", "gpu_tokens_per_s")
PLACEHOLDER_WORD = (
    "reader"  # the stand-in persona is this word repeated: one token per word for common tokenizers
)


@dataclass(frozen=True)
class PlanSettings:
    """params `plan`."""

    persona_tokens: int
    prices: dict  # model name -> (input, output) USD per million tokens
    batch_discount: float
    gpu_tokens_per_s: dict  # {"prompt": ..., "completion": ...}

    @classmethod
    def from_params(cls, params: dict) -> PlanSettings:
        block = mapping(get(params, "plan"), "plan", known=PLAN_KEYS)
        prices = {}
        for name, price in mapping(block.get("prices", {}), "plan.prices", nullable=True).items():
            price = mapping(price, f"plan.prices.{name}", known=("input", "output"))
            prices[str(name)] = tuple(
                number(price.get(k), f"plan.prices.{name}.{k}", low=0.0) for k in ("input", "output")
            )
        speed = mapping(
            block.get("gpu_tokens_per_s"), "plan.gpu_tokens_per_s", known=("prompt", "completion")
        )
        return cls(
            number(block.get("persona_tokens"), "plan.persona_tokens", integer=True, low=1),
            prices,
            number(block.get("batch_discount"), "plan.batch_discount", low=0.0, high=1.0),
            {
                k: number(speed.get(k), f"plan.gpu_tokens_per_s.{k}", low=0.0, low_open=True)
                for k in ("prompt", "completion")
            },
        )


@dataclass
class Line:
    """One model's work in one stage."""

    stage: str
    role: str  # params block models.<role>
    op: str  # generate (a persona), predict (json ratings), rate (prefilled ratings)
    calls: int
    prompt_tokens: int
    completion_tokens: int
    dollars: float | None = None  # live API calls
    dollars_batch: float | None = None  # the same calls through the Batch API
    gpu_hours: float | None = None


@dataclass(frozen=True)
class Users:
    train: int  # training users (seen domains)
    eval: int  # evaluation users


def planned_domains(params: dict) -> list[str]:
    """The domains the ingest preset reads: each source's domain; for a source that names its domains by its
    folders (the authors' windows), the folders under its path where they exist, else the names its `domains`
    mapping gives."""
    from deeper.data.ingest import sources_from_params

    domains = set()
    for source in sources_from_params(
        str(get(params, "ingest.root")), get(params, "ingest.preset"), get(params, "ingest.presets")
    ):
        if source.domain is not None:
            domains.add(source.domain)
            continue
        renamed = dict(source.domains)
        folders = (
            [p.name for p in source.path.iterdir() if p.is_dir()] if source.path.is_dir() else list(renamed)
        )
        domains.update(renamed.get(folder, folder) for folder in folders)
    return sorted(domains)


def planned_users(params: dict) -> tuple[Users, dict[str, tuple[int, int]]]:
    """The users the profile asks for, in total and per domain (train, eval), for the ingest preset's domains
    (`planned_domains`), each with its `window.domains` entry or `window.default`."""
    from deeper.data.window import spec_from_params, split_of
    from deeper.rollout import EvaluateSettings

    _spec, default, overrides = spec_from_params(get(params, "window"))
    evaluate = EvaluateSettings.from_params(params)
    per_domain = {}
    for domain in planned_domains(params):
        split = split_of(domain, default, overrides)
        train = split.train_users if split.seen else 0
        evals = split.eval_users
        if evaluate.domains is not None and domain not in evaluate.domains:
            evals = 0
        if evaluate.per_domain is not None:
            evals = min(evals, evaluate.per_domain)
        per_domain[domain] = (train, evals)
    return Users(sum(t for t, _ in per_domain.values()), sum(e for _, e in per_domain.values())), per_domain


class PromptSizes:
    """Mean prompt and completion tokens of each kind of call, rendered by the stages' own code on sample users."""

    def __init__(self, params: dict, train_users, eval_users, count, persona_tokens: int):
        from deeper.predict import PredictSettings
        from deeper.prompts import prompts_from_params

        self.params, self.count = params, count
        self.prompts = prompts_from_params(params)
        self.predict = PredictSettings.from_params(params)
        self.train_users, self.eval_users = list(train_users), list(eval_users)
        if not self.train_users and not self.eval_users:
            raise ConfigError("plan", "the sample windows file has no users to render prompts on")
        self.persona = " ".join([PLACEHOLDER_WORD] * persona_tokens)

    def chat_tokens(self, chat) -> int:
        return sum(self.count(m["content"]) + CHAT_MARKUP_TOKENS for m in chat)

    def mean(self, values) -> int:
        values = list(values)
        return round(sum(values) / len(values)) if values else 0

    def users(self, split: str):
        users = self.train_users if split == "train" else self.eval_users
        return users or self.train_users or self.eval_users

    # ---- the prompts of each kind of call

    def init(self, split: str) -> int:
        from deeper.personas import init_chat

        return self.mean(
            self.chat_tokens(init_chat(self.prompts, u.item_type, u.windows[0].pairs()))
            for u in self.users(split)
        )

    def oracle(self, window: int) -> tuple[int, int]:
        """The headroom stage's two oracle personas: written from W_window alone and from every window."""
        from deeper.personas import init_chat

        users = self.users("eval")
        one = self.mean(
            self.chat_tokens(
                init_chat(self.prompts, u.item_type, u.windows[min(window, len(u.windows) - 1)].pairs())
            )
            for u in users
        )
        every = self.mean(
            self.chat_tokens(init_chat(self.prompts, u.item_type, [p for w in u.windows for p in w.pairs()]))
            for u in users
        )
        return one, every

    def prediction(self, split: str, persona: str | None = None) -> tuple[int, int, int]:
        """(requests per window, prompt tokens per request, completion tokens per request) of one window's
        prediction: one generated JSON list (json mode) or one prefilled rating per item (logprob mode)."""
        persona = self.persona if persona is None else persona
        users = self.users(split)
        if self.predict.mode == "json":
            prompt = self.mean(
                self.chat_tokens(
                    self.prompts.render(
                        "predict", persona=persona, item_type=u.item_type, items=list(u.windows[1].titles)
                    )
                )
                for u in users
            )
            answer = self.mean(
                self.count(
                    json.dumps(
                        [{"item_name": t, "predict_rating": 3} for t in u.windows[1].titles],
                        ensure_ascii=False,
                    )
                )
                for u in users
            )
            return 1, prompt, answer
        prefill = self.count(self.prompts.prefill("predict_item") or "")
        items = [len(u.windows[1].titles) for u in users]
        prompt = self.mean(
            self.chat_tokens(
                self.prompts.render("predict_item", persona=persona, item_type=u.item_type, item=t)
            )
            + prefill
            for u in users
            for t in u.windows[1].titles
        )
        return self.mean(items), prompt, 1

    def update(self, update_cls, t_values, split: str) -> tuple[int, int]:
        """(calls per update, mean prompt tokens per call) of an update method at the steps `t_values`."""
        from deeper.llm.base import Sampling
        from deeper.methods.base import UpdateInput

        method = update_cls(llm=None, sampling=Sampling(), prompts=self.prompts)
        chats = []
        for u in self.users(split):
            for t in t_values:
                if t + 1 > len(u.windows):
                    continue
                history = tuple(u.windows[: t + 1])
                item = UpdateInput(u.item_type, self.persona, history, tuple(3.0 for _ in history[-1].titles))
                chats.append(method.planned_chats(item))
        if not chats:
            return 0, 0
        return round(sum(map(len, chats)) / len(chats)), self.mean(
            self.chat_tokens(c) for group in chats for c in group
        )


def plan_lines(params: dict, users: Users, sizes: PromptSizes, settings: PlanSettings) -> list[Line]:
    """The calls of every model-calling stage of the DAG, in dvc.yaml's order."""
    from deeper.headroom import HeadroomSettings
    from deeper.iteration import SampleSettings
    from deeper.methods import trained_update_from_params
    from deeper.personas import PersonaSettings
    from deeper.rollout import FIRST_UPDATE_WINDOWS, EvaluateSettings

    persona = PersonaSettings.from_params(params)
    sample = SampleSettings.from_params(params)
    evaluate = EvaluateSettings.from_params(params)
    headroom = HeadroomSettings.from_params(params)
    refine_cls = trained_update_from_params(params)
    rounds = evaluate.rounds
    tr, ev = users.train, users.eval
    lines: list[Line] = []

    def persona_out(
        sampling,
    ) -> int:  # a generated persona's tokens: the planned length, at most max_new_tokens
        return min(settings.persona_tokens, int(sampling.max_new_tokens))

    def predictions(stage: str, windows: int, split: str) -> None:
        per_window, prompt, completion = sizes.prediction(split)
        op = "predict" if sizes.predict.mode == "json" else "rate"
        calls = windows * per_window
        lines.append(Line(stage, "frozen", op, calls, calls * prompt, calls * completion))

    # init_personas (stages/init_personas.py): one S_0 per user, train and evaluation, from W_0
    lines.append(
        Line(
            "init_personas",
            "frozen",
            "generate",
            tr + ev,
            tr * sizes.init("train") + ev * sizes.init("eval"),
            (tr + ev) * persona_out(persona.sampling),
        )
    )
    # headroom (deeper/headroom.py measure): two oracle personas per evaluation user, then five conditions on W_w
    one, every = sizes.oracle(headroom.window)
    lines.append(
        Line(
            "headroom",
            "frozen",
            "generate",
            2 * ev,
            ev * (one + every),
            2 * ev * persona_out(persona.sampling),
        )
    )
    predictions("headroom", 5 * ev, "eval")
    for k in (1, 2):
        # contexts@k (deeper/iteration.py build_contexts): W_{t-1}, W_t, W_{t+1} with the old persona, t = k
        predictions(f"contexts@{k}", 3 * tr, "train")
        # sample@k (sample_candidates): n candidates for each context of the file; iteration 2's file holds
        # iteration 1's contexts too (stages/contexts.py concatenates them)
        contexts = k * tr
        role = "sampler" if k == 1 else "policy"
        per_update, prompt = sizes.update(refine_cls, range(1, k + 1), "train")
        calls = sample.n * contexts * per_update
        lines.append(
            Line(
                f"sample@{k}",
                role,
                "generate",
                calls,
                calls * prompt,
                calls * persona_out(sample.sampling),
            )
        )
        # reward@k (candidate_errors): each candidate predicts W_{t-1}, W_t, W_{t+1}
        predictions(f"reward@{k}", 3 * sample.n * contexts, "train")
        if k == 1:
            # refine@1 (refine_personas): Model 1 refines each iteration-1 context once, S_0 -> S_1
            per_update, prompt = sizes.update(refine_cls, [1], "train")
            lines.append(
                Line(
                    "refine@1",
                    "policy",
                    "generate",
                    tr * per_update,
                    tr * per_update * prompt,
                    tr * per_update * persona_out(sample.sampling),
                )
            )
    # evaluate@m (deeper/rollout.py rollout): `rounds` updates per user, and the predictions of rounds + 5 windows
    # per user, of which those with S_0 (W_1 and the first update's W_0, W_2) are the same requests for every
    # method: the response cache answers them after the first method
    shared = 1 + len(set(FIRST_UPDATE_WINDOWS) - {1})
    for i, (name, spec) in enumerate(evaluate.methods.items()):
        stage = f"evaluate@{name}"
        per_update, prompt = sizes.update(spec.cls, range(1, rounds + 1), "eval")
        calls = ev * rounds * per_update
        lines.append(
            Line(
                stage,
                spec.role,
                "generate",
                calls,
                calls * prompt,
                calls * persona_out(evaluate.sampling),
            )
        )
        predictions(stage, ev * (rounds + 5 - (0 if i == 0 else shared)), "eval")
    return lines


def price_lines(params: dict, lines: list[Line], settings: PlanSettings) -> list[str]:
    """Fill in dollars and GPU-hours; the notes on what could not be priced."""
    notes = []
    for line in lines:
        block = get(params, f"models.{line.role}")
        backend, name = block.get("backend"), str(block.get("name"))
        # a model on this machine's CPU (device: cpu, as the embedded defaults run) costs no GPU time
        on_gpu = (backend in ("vllm", "transformers") and block.get("device", "auto") != "cpu") or (
            backend == "openai" and block.get("base_url")
        )
        if backend == "openai" and not block.get("base_url"):
            if name not in settings.prices:
                note = f"models.{line.role} ({name}): no price in plan.prices, dollars not planned"
                if note not in notes:
                    notes.append(note)
                continue
            cost_in, cost_out = settings.prices[name]
            line.dollars = (line.prompt_tokens * cost_in + line.completion_tokens * cost_out) / 1e6
            line.dollars_batch = line.dollars * (1 - settings.batch_discount)
        elif on_gpu:
            speed = settings.gpu_tokens_per_s
            line.gpu_hours = (
                line.prompt_tokens / speed["prompt"] + line.completion_tokens / speed["completion"]
            ) / 3600
    return notes


def model_label(params: dict, role: str) -> str:
    block = get(params, f"models.{role}")
    return f"{role}: {block.get('name')} ({block.get('backend')})"


def render(params: dict, lines: list[Line], users: Users, per_domain: dict, notes: list[str]) -> str:
    """The plan as a Markdown table with totals."""

    def n(value) -> str:
        return "" if value is None else f"{value:,.0f}" if isinstance(value, int) else f"{value:,.2f}"

    out = [
        f"Users: {users.train:,} training, {users.eval:,} evaluation ("
        + ", ".join(f"{d} {t}/{e}" for d, (t, e) in per_domain.items())
        + ")",
        "",
        "| stage | model | call | calls | prompt tokens | completion tokens | $ live | $ batch | GPU-hours |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for line in lines:
        out.append(
            f"| {line.stage} | {model_label(params, line.role)} | {line.op} | {n(line.calls)} | "
            f"{n(line.prompt_tokens)} | {n(line.completion_tokens)} | {n(line.dollars)} | "
            f"{n(line.dollars_batch)} | {n(line.gpu_hours)} |"
        )

    def total(attr):
        values = [getattr(line, attr) for line in lines if getattr(line, attr) is not None]
        return sum(values) if values else None

    out.append(
        f"| **total** | | | {n(total('calls'))} | {n(total('prompt_tokens'))} | "
        f"{n(total('completion_tokens'))} | {n(total('dollars'))} | {n(total('dollars_batch'))} | "
        f"{n(total('gpu_hours'))} |"
    )
    return "\n".join(out + ([""] + [f"note: {note}" for note in notes] if notes else [])) + "\n"


def totals(lines: list[Line]) -> dict:
    keys = ("calls", "prompt_tokens", "completion_tokens", "dollars", "dollars_batch", "gpu_hours")
    return {k: sum(getattr(line, k) or 0 for line in lines) for k in keys}

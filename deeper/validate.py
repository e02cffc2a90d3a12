"""The one params validator: every value of params.yaml is checked here, before any stage does work.

Every stage calls `check_params` on the whole file first (stages/_cli.py `load_checked_params`), and so does
`python -m stages.profile`, so a broken value fails in seconds with one line naming its key, whichever stage
DVC happens to run first, instead of after hours of sampling. The per-block parsers (PairConfig, TrainConfig,
SampleSettings, ...) live with their concept but read numbers only through `deeper.params.number` and sampling
blocks only through `deeper.params.sampling_block` (the one sampling parser), so a rule is written once.

The validator imports the owner of every block, so it sits above them all (docs/ARCHITECTURE.md, "Layers"),
apart from the helpers in deeper.params that those owners import. Each check imports its block's owner when it
runs, so a stage whose params file has only some blocks loads only the modules that own them.
"""

from __future__ import annotations

from deeper.config import get
from deeper.errors import ConfigError
from deeper.params import MODEL_ROLES, mapping, param


def _check_thresholds(params: dict, strict: bool) -> str:
    from deeper.pairs import thresholds_from_params

    thresholds_from_params(params)
    return "tau_pos, tau_neg"


def _check_delta(params: dict, strict: bool) -> str:
    param(params, "delta", low=0.0)
    return "delta"


def _check_pair(params: dict, strict: bool) -> str:
    from deeper.pairs import pair_block_from_params

    pair_block_from_params(params)
    return "pair"


def _check_iter2(params: dict, strict: bool) -> str:
    from deeper.pairs import replay_max_from_params, replay_order_from_params
    from deeper.train import REFERENCES, TrainConfig

    iter2 = mapping(
        get(params, "iter2"), "iter2", known=("delta", "replay_max", "replay_order", "reference", "train")
    )
    if strict or "delta" in iter2:
        param(params, "iter2.delta", low=0.0)
    if strict or "replay_max" in iter2:
        replay_max_from_params(params)
    if strict or "replay_order" in iter2:
        replay_order_from_params(params)
    if strict or "reference" in iter2:
        reference = get(params, "iter2.reference")
        if reference not in REFERENCES:
            raise ConfigError("iter2.reference", f"must be one of {list(REFERENCES)}, got {reference!r}")
    if strict or ("train" in iter2 and "train" in params):  # iter2.train overrides `train`
        TrainConfig.from_params(params, 2)
    return "iter2"


def _check_reward(params: dict, strict: bool) -> str:
    from deeper.reward import RewardWeights

    RewardWeights.from_params(params)
    return "reward"


def _check_evaluate(params: dict, strict: bool) -> str:
    from deeper.rollout import EvaluateSettings

    settings = EvaluateSettings.from_params(params)
    if strict or "bootstrap" in get(params, "evaluate"):
        from deeper.bootstrap import BootstrapSettings

        BootstrapSettings.from_params(params)
    if strict or "similarity_embedder" in get(params, "evaluate"):
        from deeper.similarity import embedder_from_params

        embedder_from_params(params)
    count = get(params, "window.count", None)
    if isinstance(count, int) and count < settings.rounds + 2:
        raise ConfigError(
            "window.count",
            f"{count} windows cannot hold evaluate.rounds={settings.rounds} "
            f"(a user needs rounds + 2 = {settings.rounds + 2})",
        )
    return "evaluate"


def _check_headroom(params: dict, strict: bool) -> str:
    from deeper.headroom import HeadroomSettings

    HeadroomSettings.from_params(params)
    return "headroom"


def _check_persona(params: dict, strict: bool) -> str:
    from deeper.personas import PersonaSettings

    PersonaSettings.from_params(params)
    return "persona"


def _check_refiner(params: dict, strict: bool) -> str:
    from deeper.methods import trained_update_from_params

    trained_update_from_params(params)
    return "refiner"


def _check_sample(params: dict, strict: bool) -> str:
    from deeper.iteration import SampleSettings

    SampleSettings.from_params(params)
    return "sample"


def _check_predict(params: dict, strict: bool) -> str:
    from deeper.predict import PredictSettings

    PredictSettings.from_params(params)
    return "predict"


def _check_alpha(params: dict, strict: bool) -> str:
    param(params, "alpha", low=0.0)
    return "alpha"


def _check_train(params: dict, strict: bool) -> str:
    from deeper.train import TrainConfig

    config = TrainConfig.from_params(params, 1)
    launcher = get(params, "train.launcher")
    if not isinstance(launcher, str) or not launcher.strip():
        raise ConfigError("train.launcher", f"must be a command such as python, got {launcher!r}")
    policy = get(params, "models.policy", None)
    if isinstance(policy, dict) and policy.get("backend") == "vllm":
        rank = policy.get("max_lora_rank", 16)
        if config.lora_r > rank:
            raise ConfigError(
                "models.policy.max_lora_rank",
                f"{rank} < train.lora.r ({config.lora_r}): vLLM could not serve the trained adapters",
            )
    return "train"


def _check_models(params: dict, strict: bool) -> str:
    from deeper.llm import check_spec
    from deeper.predict import PredictSettings

    models = mapping(get(params, "models"), "models", known=MODEL_ROLES)
    lines = []
    for role in MODEL_ROLES:
        if role not in models and len(models):  # a stage's own params file may name only the model it uses
            continue
        cls, settings = check_spec(get(params, f"models.{role}"), where=f"models.{role}")
        lines.append(f"models.{role} ({cls.backend})")
        # the frozen model rates items; in logprob mode the rating is the token after the prefill "Rating: ",
        # so a backend set up not to send it could only read some other token (found before any call)
        if role == "frozen" and "predict" in params and PredictSettings.from_params(params).mode == "logprob":
            problem = getattr(cls, "prefill_problem", lambda settings: None)(settings)
            if problem:
                raise ConfigError(
                    "models.frozen.prefill",
                    f"{problem}; predict.mode logprob needs the answer to "
                    "continue the prefill (or set predict.mode: json)",
                )
    return ", ".join(lines)


def _check_prompts(params: dict, strict: bool) -> str:
    from deeper.prompts import prompts_from_params

    prompts_from_params(params)  # the set's every template is read and checked here
    return f"prompts ({get(params, 'prompts', 'tuned')})"


def _check_window(params: dict, strict: bool) -> str:
    from deeper.data.window import spec_from_params

    spec_from_params(get(params, "window"))
    return "window"


def _check_ingest(params: dict, strict: bool) -> str:
    from deeper.data.ingest import options_from_params, sources_from_params

    sources_from_params(
        str(get(params, "ingest.root")), get(params, "ingest.preset"), get(params, "ingest.presets")
    )
    options_from_params(params)
    return "ingest"


def _check_fetch(params: dict, strict: bool) -> str:
    from deeper.assets import names_from_params

    names_from_params(params)
    return "fetch"


def _check_plan(params: dict, strict: bool) -> str:
    from deeper.plan import PlanSettings

    PlanSettings.from_params(params)
    return "plan"


# block -> (the top-level keys it checks, its check). Stages check the blocks their params file has (a missing
# key is a one-line error where a stage reads it); the profile check needs every block.
BLOCKS = {
    "fetch": (("fetch",), _check_fetch),
    "ingest": (("ingest",), _check_ingest),
    "window": (("window",), _check_window),
    "models": (("models",), _check_models),
    "prompts": (("prompts",), _check_prompts),
    "persona": (("persona",), _check_persona),
    "predict": (("predict",), _check_predict),
    "refiner": (("refiner",), _check_refiner),
    "sample": (("sample",), _check_sample),
    "reward": (("reward",), _check_reward),
    "thresholds": (("tau_pos", "tau_neg"), _check_thresholds),
    "delta": (("delta",), _check_delta),
    "pair": (("pair",), _check_pair),
    "alpha": (("alpha",), _check_alpha),
    "train": (("train",), _check_train),
    "iter2": (("iter2",), _check_iter2),
    "evaluate": (("evaluate",), _check_evaluate),
    "headroom": (("headroom",), _check_headroom),
    "plan": (("plan",), _check_plan),
}


def check_params(params: dict, every_block: bool = True) -> list[str]:
    """Every block's checks (no model, GPU, server or key needed); what was checked, one line a block. The
    first bad value raises a one-line ConfigError naming its key. `every_block=False` (the stages) skips a
    block none of whose keys the file has."""
    if not isinstance(params, dict):
        raise ConfigError("(file)", "top level must be a mapping")
    return [
        check(params, every_block)
        for keys, check in BLOCKS.values()
        if every_block or any(k in params for k in keys)
    ]

"""deeper.validate: the one validator of params.yaml, shared by every stage and `python -m stages.profile`.

Every case sets one key of the repository's params.yaml to a bad value and expects one line naming that key,
from the validator, from a stage's own entry (before it reads any input) and from the profile command."""

from __future__ import annotations

import copy
import math
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from deeper.config import load_params
from deeper.errors import ConfigError
from deeper.params import number
from deeper.profile import apply_profile, available, load_profile
from deeper.validate import BLOCKS, check_params
from tests.conftest import REPO, one_line_error

PARAMS = load_params(REPO / "params.yaml")
NAN, INF = float("nan"), float("inf")

# (dotted key, bad value, what the one line says after "params.yaml: ")
BAD = [
    ("tau_pos", "high", "tau_pos: must be a number, got 'high'"),
    ("tau_pos", True, "tau_pos: must be a number, got True"),
    ("tau_neg", NAN, "tau_neg: must be a finite number, got nan"),
    ("tau_neg", 0.1 - 1e-10, "tau_neg: must be below tau_pos by more than 2e-09"),
    ("tau_neg", 0.1, "tau_neg: must be below tau_pos"),
    ("delta", NAN, "delta: must be a finite number, got nan"),
    ("delta", -0.1, "delta: must be >= 0, got -0.1"),
    ("alpha", -1, "alpha: must be >= 0, got -1.0"),
    ("alpha", INF, "alpha: must be a finite number, got inf"),
    ("iter2.delta", INF, "iter2.delta: must be a finite number, got inf"),
    ("iter2.delta", -1, "iter2.delta: must be >= 0"),
    ("iter2.replay_max", -1, "iter2.replay_max: must be >= 0, got -1"),
    ("iter2.replay_max", 2.5, "iter2.replay_max: must be an integer, got 2.5"),
    ("iter2.reference", "model1", "iter2.reference: must be one of ['base', 'previous']"),
    (
        "iter2.replay_order",
        "smallest_margin",
        "iter2.replay_order: must be one of ['largest_margin', 'random']",
    ),
    ("iter2.train", {"lora": {"r": 8}}, "iter2.train.lora: cannot take effect"),
    ("iter2.train", {"lr": "fast"}, "train.lr: must be a number, got 'fast'"),
    ("iter2.train", {"max_steps": NAN}, "train.max_steps: must be a finite number"),
    ("pair.val_fraction", 1.0, "pair.val_fraction: must be < 1, got 1.0"),
    ("pair.max_per_context", 0, "pair.max_per_context: must be >= 1, got 0"),
    ("pair.seed", -1, "pair.seed: must be >= 0, got -1"),
    ("pair.strategy", "random", "pair.strategy: must be one of"),
    ("refiner.update", "merge", "refiner.update: 'merge' is not one of refine, incupdate"),
    ("refiner.update", "hiermerge", "refiner.update: hiermerge makes two calls per update"),
    ("sample.n", 0, "sample.n: must be >= 1, got 0"),
    ("sample.temperature", -0.5, "sample.temperature: must be >= 0"),
    ("sample.top_p", 0, "sample.top_p: must be > 0, got 0.0"),
    ("sample.top_p", 1.5, "sample.top_p: must be <= 1, got 1.5"),
    ("sample.repetition_penalty", 0, "sample.repetition_penalty: must be > 0, got 0.0"),
    ("sample.max_new_tokens", 12.5, "sample.max_new_tokens: must be an integer, got 12.5"),
    ("sample.seed", NAN, "sample.seed: must be a finite number"),
    ("persona.repetition_penalty", -1.1, "persona.repetition_penalty: must be > 0"),
    ("persona.max_new_tokens", 0, "persona.max_new_tokens: must be >= 1"),
    ("persona.retries", -1, "persona.retries: must be >= 0"),
    ("persona.top_k", 5, "persona.top_k: unknown key"),
    ("predict.json.temperature", NAN, "predict.json.temperature: must be a finite number"),
    ("predict.windows_per_call", 0, "predict.windows_per_call: must be >= 1"),
    ("predict.mode", "text", "predict.mode: must be one of"),
    ("evaluate.sampling.repetition_penalty", 0.0, "evaluate.sampling.repetition_penalty: must be > 0"),
    ("evaluate.sampling.max_new_tokens", "lots", "evaluate.sampling.max_new_tokens: must be a number"),
    ("evaluate.rounds", 0, "evaluate.rounds: must be >= 1, got 0"),
    ("evaluate.rounds", True, "evaluate.rounds: must be a number, got True"),
    ("evaluate.rounds", 5, "window.count: 6 windows cannot hold evaluate.rounds=5"),
    ("evaluate.users.per_domain", 0, "evaluate.users.per_domain: must be >= 1"),
    (
        "evaluate.methods",
        ["deeper", "incupdate"],
        "evaluate.methods: must be a non-empty mapping of method name",
    ),
    (
        "evaluate.methods",
        {"x": {"update": "refine", "model": "frozen", "weights": None}},
        "evaluate.methods.x.weights: must be an adapter folder or models/embedded",
    ),
    (
        "evaluate.bootstrap",
        {"resamples": 10, "level": 0.95, "seed": 0},
        "evaluate.bootstrap.resamples: must be >= 100",
    ),
    (
        "evaluate.bootstrap",
        {"resamples": 2000, "level": 1.0, "seed": 0},
        "evaluate.bootstrap.level: must be < 1",
    ),
    ("reward.weights", {"prev": 1, "curr": 1, "fut": NAN}, "reward.weights.fut: must be a finite number"),
    ("reward.weights", {"prev": -1, "curr": 1, "fut": 1}, "reward.weights.prev: must be >= 0"),
    ("window.size", 0, "window.size: must be >= 1, got 0"),
    ("window.count", "six", "window.count: must be a number, got 'six'"),
    ("window.train_count", 7, "window.train_count: must be <= window.count (6)"),
    ("window.default", {"train_users": -1, "eval_users": 4, "seen": True}, "window.default.train_users"),
    ("train.lr", 0, "train.lr: must be > 0, got 0.0"),
    ("train.lr", "1e-4x", "train.lr: must be a number"),
    ("train.beta", NAN, "train.beta: must be a finite number"),
    (
        "train.lora",
        {"r": 0, "alpha": 32, "dropout": 0.2, "target_modules": "all-linear"},
        "train.lora.r: must be >= 1",
    ),
    (
        "train.lora",
        {"r": 16, "alpha": 32, "dropout": 1.0, "target_modules": "all-linear"},
        "train.lora.dropout: must be < 1",
    ),
    ("train.max_steps", -2, "train.max_steps: must be >= -1"),
    ("train.epochs", "four", "train.epochs: must be a number"),
    ("train.grad_accum", 0, "train.grad_accum: must be >= 1"),
    ("train.max_length", 8, "train.max_length: must be >= 16"),
    ("train.scheduler", "cosinus", "train.scheduler: must be one of"),
    ("train.bf16", "yes", "train.bf16: must be true or false"),
    ("train.launcher", "", "train.launcher: must be a command"),
    ("train.sft_normalization", "per_batch", "train.sft_normalization: must be one of per_token, per_pair"),
    ("train.disable_dropout", "yes", "train.disable_dropout: must be true or false"),
    ("models.frozen.batch_size", 0, "models.frozen.batch_size: must be >= 1"),
    ("models.policy.batch_size", "x", "models.policy.batch_size: must be a number"),
    ("models.policy.backend", "llamacpp", "models.policy.backend: 'llamacpp' is not one of"),
    ("ingest.preset", "paper", "ingest.preset: 'paper' is not under ingest.presets"),
    ("ingest.zero_ratings", "zero", "ingest.zero_ratings: must be one of drop, keep"),
    ("fetch.models", ["gpt2"], "fetch.models: unknown model 'gpt2'"),
    ("pair.val_fraction", -0.1, "pair.val_fraction: must be >= 0, got -0.1"),
    ("pair.seed", 1.5, "pair.seed: must be an integer, got 1.5"),
    ("prompts", "paper", "prompts: must be one of tuned, published, diagnostic, got 'paper'"),
    ("models.sampler.backend", "llamacpp", "models.sampler.backend: 'llamacpp' is not one of"),
    ("models.policy.name", "embedded:gpt2", "models.policy.name: 'embedded:gpt2': the embedded models"),
    ("headroom.window", 6, "headroom.window: W_6 does not exist: users have window.count=6"),
    ("headroom.seed", -1, "headroom.seed: must be >= 0, got -1"),
]


def edited(key, value) -> dict:
    return apply_profile(PARAMS, {key: value})


def test_the_repository_params_and_every_profile_pass():
    lines = check_params(PARAMS)
    assert len(lines) == len(BLOCKS) == 19
    assert "prompts (tuned)" in lines
    for name in available():
        assert check_params(apply_profile(PARAMS, load_profile(name, PARAMS)))


@pytest.mark.parametrize(("key", "value", "message"), BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_its_key(key, value, message):
    with pytest.raises(ConfigError) as e:
        check_params(edited(key, value))
    assert str(e.value).startswith(f"params.yaml: {message}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("text", ["1e-4", "5.0e-6", "-0.5", ".5", "3"])
def test_a_yaml_string_that_spells_a_number_is_that_number(text):
    assert number(text, "k") == float(text)


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "1e-4x", "0x10", "1_000", ""])
def test_no_other_string_becomes_a_number(text):
    with pytest.raises(ConfigError):
        number(text, "k")


def test_bounds_are_inclusive_unless_open():
    assert number(0, "k", low=0) == 0.0 and number(1, "k", high=1) == 1.0
    for kwargs in ({"low": 0, "low_open": True},):
        with pytest.raises(ConfigError, match="must be > 0"):
            number(0, "k", **kwargs)
    with pytest.raises(ConfigError, match="must be < 1"):
        number(1, "k", high=1, high_open=True)
    assert number(None, "k", nullable=True) is None
    with pytest.raises(ConfigError, match="k: missing"):
        number(None, "k")
    assert number(3.0, "k", integer=True) == 3 and isinstance(number(3.0, "k", integer=True), int)


def test_logprob_ratings_need_a_backend_that_sends_the_prefill():
    openai = {"backend": "openai", "name": "gpt-4o-mini", "api_key_env": "NOT_SET_HERE", "prefill": "none"}
    with pytest.raises(
        ConfigError, match=r"^params.yaml: models.frozen.prefill: prefill none sends no prefill"
    ):
        check_params(edited("models.frozen", openai))
    assert check_params(apply_profile(PARAMS, {"models.frozen": openai, "predict.mode": "json"}))
    assert check_params(edited("models.frozen", {**openai, "prefill": "assistant"}))


def test_a_stage_checks_the_whole_file_before_reading_any_input(tmp_path, monkeypatch):
    """pair@1 with a broken `train` block: the stage stops before it looks for its inputs (none exist here)."""
    from stages.pair import main as pair_main
    from stages.sample import main as sample_main

    monkeypatch.chdir(tmp_path)
    for key, value, message in (
        ("train.lr", "fast", "train.lr: must be a number"),
        ("delta", NAN, "delta: must be a finite number"),
        ("iter2.replay_max", -1, "iter2.replay_max: must be >= 0"),
    ):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(edited(key, value)), encoding="utf-8")
        for main in (pair_main, sample_main):
            one_line_error(CliRunner().invoke(main, ["--iteration", "1"]), f"params.yaml: {message}")


def test_a_stage_checks_only_the_blocks_its_file_has(tmp_path):
    partial = {"window": copy.deepcopy(PARAMS["window"])}
    assert check_params(partial, every_block=False) == ["window"]
    with pytest.raises(ConfigError, match="fetch"):
        check_params(partial)  # the profile check needs every block


@pytest.mark.parametrize(("key", "value", "message"), [BAD[5], BAD[11], BAD[25], BAD[36]])
def test_the_profile_command_refuses_a_broken_profile_in_one_line(tmp_path, key, value, message):
    profile = tmp_path / "broken.yaml"
    profile.write_text(yaml.safe_dump({key: value}), encoding="utf-8")
    if isinstance(value, float) and math.isnan(value):
        profile.write_text(f"{key}: .nan\n", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "stages.profile", str(profile)],
        cwd=REPO,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert message.split(":")[0] in result.stderr and "Traceback" not in result.stderr


def test_ingest_unknown_items_is_checked_by_the_same_validator():
    with pytest.raises(ConfigError, match=r"^params.yaml: ingest.unknown_items: must be one of keep, drop"):
        check_params(edited("ingest.unknown_items", "skip"))

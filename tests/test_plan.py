"""The cost and time plan (issue 21, item 3; deeper/plan.py, `python -m stages.profile NAME --plan`):
- the calls of a small profile equal a hand count, stage by stage, in both prediction modes;
- the calls planned for the default params equal what the default run's committed metrics counted (the real
  stages' own numbers: personas, contexts, candidates, rewards, refinements, headroom predictions);
- prompt tokens are the rendered prompts' tokens, completions follow `plan.persona_tokens` and max_new_tokens;
- dollars and GPU-hours follow the `plan` params, the Batch API at its discount;
- the command prints every stage and a total, as a table or JSON, and a missing sample is one line."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from deeper.config import load_params
from deeper.iteration import user_windows
from deeper.personas import init_chat, token_counter
from deeper.plan import CHAT_MARKUP_TOKENS, PlanSettings, PromptSizes, plan_lines, planned_users, price_lines
from deeper.prompts import prompts_from_params
from deeper.tables import read_windows
from tests.conftest import REPO

TITLES = [f"Film number {i} ({1950 + i})" for i in range(80)]


def windows_file(path: Path, train: int = 3, evals: int = 2, windows: int = 6) -> Path:
    """A windows.parquet of `train` + `evals` movielens users with `windows` windows of ten items each."""
    rows = []
    for u in range(train + evals):
        for w in range(windows):
            for pos in range(10):
                rows.append(
                    {
                        "domain": "movielens",
                        "item_type": "movie",
                        "seen": True,
                        "user_id": f"u{u}",
                        "split": "train" if u < train else "eval",
                        "window": w,
                        "pos": pos,
                        "item_id": f"m{(u + w * 10 + pos) % 80}",
                        "title": TITLES[(u + w * 10 + pos) % 80],
                        "rating": float(1 + (u + pos) % 5),
                    }
                )
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def small_params(tiny_llama, mode: str) -> dict:
    params = load_params(REPO / "params.yaml")
    params["window"]["default"] = {"train_users": 3, "eval_users": 2, "seen": True}
    params["window"]["domains"] = {
        "books": {"train_users": 0, "eval_users": 4, "seen": False},
        "not_ingested": {"train_users": 50, "eval_users": 50, "seen": True},
    }
    params["ingest"]["presets"][
        "two"
    ] = [  # the preset's domains are the plan's (the files need not exist yet)
        {
            "format": "movielens100k_parquet",
            "path": "movielens100k",
            "domain": "movielens",
            "item_type": "movie",
        },
        {
            "format": "amazon2018",
            "path": "Books_5.json",
            "meta": "meta_Books.json",
            "domain": "books",
            "item_type": "book",
        },
    ]
    params["ingest"]["preset"] = "two"
    params["sample"]["n"] = 2
    params["evaluate"]["rounds"] = 2
    params["evaluate"]["methods"] = {
        "deeper": {"update": "refine", "model": "policy", "weights": "models/adapters/it2"},
        "hiermerge": {"update": "hiermerge", "model": "frozen", "weights": "models/embedded"},
    }
    params["predict"]["mode"] = mode
    params["persona"]["tokenizer"] = str(tiny_llama)
    return params


def plan_of(params, sample: Path, tokenizer):
    settings = PlanSettings.from_params(params)
    windows = read_windows(sample)
    sizes = PromptSizes(
        params,
        user_windows(windows, "train"),
        user_windows(windows, "eval"),
        token_counter(str(tokenizer)),
        settings.persona_tokens,
    )
    users, per_domain = planned_users(params)
    lines = plan_lines(params, users, sizes, settings)
    notes = price_lines(params, lines, settings)
    return users, per_domain, lines, notes, sizes


def calls(lines) -> dict:
    return {(line.stage, line.role, line.op): line.calls for line in lines}


@pytest.mark.parametrize("mode", ["json", "logprob"])
def test_a_small_profile_plans_the_calls_of_a_hand_count(tmp_path, tiny_llama, mode):
    params = small_params(tiny_llama, mode)
    users, per_domain, lines, _notes, _sizes = plan_of(
        params, windows_file(tmp_path / "w.parquet"), tiny_llama
    )
    # movielens (window.default): 3 train / 2 eval; books (window.domains, unseen): 0 / 4; a domain of
    # window.domains that the preset does not read costs nothing
    assert per_domain == {"books": (0, 4), "movielens": (3, 2)}
    assert (users.train, users.eval) == (3, 6)
    # json: one generated list per window; logprob: one prefilled rating per item, ten items a window
    per_window = 1 if mode == "json" else 10
    op = "predict" if mode == "json" else "rate"
    n, rounds = 2, 2
    hand = {
        ("init_personas", "frozen", "generate"): 3 + 6,  # S_0 of every user
        ("headroom", "frozen", "generate"): 2 * 6,  # two oracle personas per evaluation user
        ("headroom", "frozen", op): 5 * 6 * per_window,  # five persona conditions on W_1
        ("contexts@1", "frozen", op): 3 * 3 * per_window,  # W_0, W_1, W_2 with S_0
        ("sample@1", "sampler", "generate"): n * 3,  # n candidates for each of 3 contexts
        ("reward@1", "frozen", op): 3 * n * 3 * per_window,  # three windows per candidate
        ("refine@1", "policy", "generate"): 3,
        ("contexts@2", "frozen", op): 3 * 3 * per_window,
        ("sample@2", "policy", "generate"): n
        * 2
        * 3,  # iteration 2's file: its 3 contexts and iteration 1's 3
        ("reward@2", "frozen", op): 3 * n * 2 * 3 * per_window,
        ("evaluate@deeper", "policy", "generate"): 6 * rounds,
        # rounds + 5 windows per user: W_1 (round 0), W_0 and W_2 (first update, S_0), W_0..W_2 with S_1, W_3
        ("evaluate@deeper", "frozen", op): 6 * (rounds + 5) * per_window,
        ("evaluate@hiermerge", "frozen", "generate"): 6 * rounds * 2,  # a short-term persona, then the merge
        ("evaluate@hiermerge", "frozen", op): 6 * (rounds + 5 - 3) * per_window,  # S_0's three are cached
    }
    assert calls(lines) == hand


def test_the_default_params_plan_what_the_default_run_counted(tmp_path, tiny_llama):
    """metrics/ is committed from `dvc repro` of the default params: the real stages' counts."""
    params = load_params(REPO / "params.yaml")
    params["persona"]["tokenizer"] = str(tiny_llama)  # token counts are not compared here
    metrics = {p.stem: json.loads(p.read_text()) for p in (REPO / "metrics").glob("*.json")}
    sample = windows_file(tmp_path / "w.parquet", train=1, evals=1)
    _users, _per_domain, lines, _notes, _sizes = plan_of(params, sample, tiny_llama)
    planned = calls(lines)
    op = "rate" if params["predict"]["mode"] == "logprob" else "predict"
    items = 10 if op == "rate" else 1  # requests per window

    assert planned[("init_personas", "frozen", "generate")] == metrics["personas"]["count"]
    assert planned[("headroom", "frozen", op)] == metrics["headroom"]["predict"]["windows"] * items
    assert planned[("headroom", "frozen", "generate")] == 2 * metrics["headroom"]["users"]
    for k in (1, 2):
        assert (
            planned[(f"contexts@{k}", "frozen", op)]
            == metrics[f"contexts_it{k}"]["predict"]["windows"] * items
        )
        role = "sampler" if k == 1 else "policy"
        assert planned[(f"sample@{k}", role, "generate")] == metrics[f"sample_it{k}"]["requested"]
        assert (
            planned[(f"reward@{k}", "frozen", op)] == metrics[f"reward_it{k}"]["predict"]["windows"] * items
        )
    assert planned[("refine@1", "policy", "generate")] == metrics["refine_it1"]["refined"]


def test_tokens_are_the_rendered_prompts_and_the_planned_completions(tmp_path, tiny_llama):
    params = small_params(tiny_llama, "json")
    params["plan"]["persona_tokens"] = 50
    params["persona"]["max_new_tokens"] = 30  # S_0 at most 30 tokens: the smaller of the two
    sample = windows_file(tmp_path / "w.parquet")
    _users, _per_domain, lines, _notes, _sizes = plan_of(params, sample, tiny_llama)
    count = token_counter(str(tiny_llama))
    prompts = prompts_from_params(params)
    windows = read_windows(sample)

    def tokens(chat):
        return sum(count(m["content"]) + CHAT_MARKUP_TOKENS for m in chat)

    def mean(values):
        return round(sum(values) / len(values))

    train = [
        tokens(init_chat(prompts, u.item_type, u.windows[0].pairs())) for u in user_windows(windows, "train")
    ]
    evals = [
        tokens(init_chat(prompts, u.item_type, u.windows[0].pairs())) for u in user_windows(windows, "eval")
    ]
    init = next(line for line in lines if line.stage == "init_personas")
    assert init.prompt_tokens == 3 * mean(train) + 6 * mean(evals)
    assert init.completion_tokens == 9 * 30
    sample_line = next(line for line in lines if line.stage == "sample@1")
    assert sample_line.completion_tokens == sample_line.calls * min(50, params["sample"]["max_new_tokens"])
    # a json prediction's completion: the JSON list of the window's items with a rating each
    persona = " ".join(["reader"] * 50)
    predict = next(line for line in lines if line.stage == "contexts@1")
    users = user_windows(windows, "train")
    chats = [
        prompts.render("predict", persona=persona, item_type="movie", items=list(u.windows[1].titles))
        for u in users
    ]
    assert predict.prompt_tokens == predict.calls * mean([tokens(c) for c in chats])
    answers = [
        count(
            json.dumps(
                [{"item_name": t, "predict_rating": 3} for t in u.windows[1].titles], ensure_ascii=False
            )
        )
        for u in users
    ]
    assert predict.completion_tokens == predict.calls * mean(answers)


def test_dollars_and_gpu_hours_follow_the_plan_params(tmp_path, tiny_llama):
    params = small_params(tiny_llama, "json")
    # the default models run on this machine's CPU: neither dollars nor GPU time
    _users, _per_domain, lines, notes, _sizes = plan_of(
        params, windows_file(tmp_path / "w.parquet"), tiny_llama
    )
    assert notes == [] and all(line.gpu_hours is None and line.dollars is None for line in lines)
    params["models"]["frozen"] = {
        "backend": "openai",
        "name": "gpt-x",
        "base_url": None,
        "api_key_env": "OPENAI_API_KEY",
        "prefill": "none",
        "send_repetition_penalty": False,
    }
    params["models"]["policy"] = {"backend": "vllm", "name": "some/model", "adapter": None}
    params["models"]["sampler"] = copy.deepcopy(params["models"]["policy"])
    params["plan"].update(
        prices={"gpt-x": {"input": 2.0, "output": 8.0}},
        batch_discount=0.25,
        gpu_tokens_per_s={"prompt": 100.0, "completion": 10.0},
    )
    _users, _per_domain, lines, notes, _sizes = plan_of(
        params, windows_file(tmp_path / "w.parquet"), tiny_llama
    )
    assert notes == []
    for line in lines:
        if line.role == "frozen":
            dollars = (line.prompt_tokens * 2.0 + line.completion_tokens * 8.0) / 1e6
            assert line.dollars == pytest.approx(dollars) and line.dollars_batch == pytest.approx(
                0.75 * dollars
            )
            assert line.gpu_hours is None
        else:
            assert line.dollars is None
            assert line.gpu_hours == pytest.approx(
                (line.prompt_tokens / 100 + line.completion_tokens / 10) / 3600
            )
    # a model without a price is named, not priced as free
    params["plan"]["prices"] = {}
    _users, _per_domain, lines, notes, _sizes = plan_of(
        params, windows_file(tmp_path / "w.parquet"), tiny_llama
    )
    assert notes == ["models.frozen (gpt-x): no price in plan.prices, dollars not planned"]
    assert all(line.dollars is None for line in lines)
    # an openai-protocol server at a base_url (vLLM) is GPU time, not dollars
    params["models"]["frozen"]["base_url"] = "http://127.0.0.1:8000/v1"
    _users, _per_domain, lines, notes, _sizes = plan_of(
        params, windows_file(tmp_path / "w.parquet"), tiny_llama
    )
    assert notes == [] and all(line.gpu_hours is not None for line in lines)


def run_plan(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "stages.profile", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={
            "PATH": str(Path(sys.executable).parent),
            "HOME": str(Path.home()),
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
        },
        check=False,
    )


def test_the_paper_plan_prints_every_stage_and_a_total(tmp_path, tiny_llama):
    sample = windows_file(tmp_path / "w.parquet")
    params = load_params(REPO / "params.yaml")
    params["persona"]["tokenizer"] = str(tiny_llama)  # the fallback when Llama-3.1's is not on the machine
    (tmp_path / "params.yaml").write_text(json.dumps(params), encoding="utf-8")
    done = run_plan("paper", "--plan", "--sample", str(sample), "--params", str(tmp_path / "params.yaml"))
    assert done.returncode == 0, done.stderr
    table = done.stdout
    for stage in (
        "init_personas",
        "headroom",
        "contexts@1",
        "sample@1",
        "reward@1",
        "refine@1",
        "contexts@2",
        "sample@2",
        "reward@2",
        "evaluate@deeper",
        "evaluate@slideregen",
        "**total**",
    ):
        assert f"| {stage} |" in table, stage
    assert "Users: 10,800 training, 4,807 evaluation" in table  # the paper's Table 11 as the profile asks
    assert (
        f"note: tokens counted with {tiny_llama}: persona.tokenizer meta-llama/Llama-3.1-8B-Instruct" in table
    )
    done = run_plan(
        "paper", "--plan", "--json", "--sample", str(sample), "--params", str(tmp_path / "params.yaml")
    )
    plan = json.loads(done.stdout)
    assert plan["users"] == {"train": 10_800, "eval": 4_807}
    assert plan["total"]["calls"] == sum(s["calls"] for s in plan["stages"])
    assert plan["total"]["dollars_batch"] == pytest.approx(plan["total"]["dollars"] / 2)
    frozen = sum(s["calls"] for s in plan["stages"] if s["role"] == "frozen")
    assert 1_500_000 < frozen < 2_500_000  # the "~1.8M GPT-4o-mini calls"


def test_a_plan_without_a_sample_is_one_line(tmp_path):
    done = run_plan("paper", "--plan", "--sample", str(tmp_path / "absent.parquet"))
    assert done.returncode == 1
    assert (
        done.stderr.strip()
        == f"error: {tmp_path / 'absent.parquet'}: not found; run `dvc repro window` first"
    )

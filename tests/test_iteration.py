"""The iteration stages (contexts, sample, reward, pair, refine) on the tiny random Llama, end to end.

The windows and personas are built here: five training users (one without a persona, one with only three
windows) and one evaluation user, three items per window.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from deeper.errors import InputError
from deeper.iteration import State, clean_candidate, read_user_windows, update_input
from deeper.llm import load_llm
from deeper.llm.base import Sampling
from deeper.methods import Refine
from deeper.predict import PredictSettings, WindowRequest, predict_windows
from deeper.reward import NEW_COLUMNS, OLD_COLUMNS, PARTS, is_negative, is_positive
from deeper.tables import read_contexts
from tests.stage_runs import cached_rows, stage_calls

REPO = Path(__file__).resolve().parents[1]
TITLES = ["Toy Story (1995)", "Fargo (1996)", 'Say "Anything..." {1989}', "Star Wars (1977)", "Heat\n(1995)"]
# user -> windows it has; u2 gets no persona
USERS = {"u0": 4, "u1": 4, "u2": 4, "u3": 3, "u4": 4}


def write_windows(path: Path) -> None:
    rows = []
    for u, (user, count) in enumerate({**USERS, "e0": 4}.items()):
        for w in range(count):
            for p in range(3):
                rows.append(
                    {
                        "domain": "movielens",
                        "item_type": "movie",
                        "seen": True,
                        "user_id": user,
                        "split": "eval" if user.startswith("e") else "train",
                        "window": w,
                        "pos": p,
                        "item_id": str(p),
                        "title": TITLES[(u + w + p) % len(TITLES)],
                        "rating": float(1 + (u + 2 * w + p) % 5),
                    }
                )
    pd.DataFrame(rows).to_parquet(path, index=False)


def make_params(model: Path, **sample) -> dict:
    spec = {"backend": "transformers", "name": str(model), "adapter": None, "batch_size": 4}
    return {
        "tau_pos": 0.05,
        "tau_neg": 0.0,
        "delta": 0.0,
        "alpha": 0.1,
        "models": {"frozen": dict(spec), "policy": dict(spec), "sampler": dict(spec)},
        "predict": {"mode": "logprob", "rating": "expected", "windows_per_call": 4},
        "sample": {
            "n": 3,
            "temperature": 1.0,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "max_new_tokens": 8,
            "seed": 0,
            **sample,
        },
        "reward": {"weights": {"prev": 1.0, "curr": 1.0, "fut": 1.0}},
        "pair": {"strategy": "largest_margin", "max_per_context": 3, "val_fraction": 0.2, "seed": 0},
        "iter2": {"delta": 0.0, "replay_max": 2, "replay_order": "largest_margin"},
        "refiner": {"update": "refine"},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama):
    """Windows, S_0 personas, params and a random LoRA adapter playing Model 1, in one folder."""
    root = tmp_path_factory.mktemp("iteration")
    write_windows(root / "windows.parquet")
    personas = pd.DataFrame(
        [
            {
                "domain": "movielens",
                "user_id": u,
                "split": "train",
                "persona": f"User {u} loves quiet dramas and hates noise.",
            }
            for u in USERS
            if u != "u2"
        ]
        + [{"domain": "movielens", "user_id": "e0", "split": "eval", "persona": "An eval user."}]
    )
    personas.to_parquet(root / "init.parquet", index=False)
    params = make_params(tiny_llama)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    make_adapter(tiny_llama, root / "adapter_it1")
    return root, params, tiny_llama


def make_adapter(model: Path, out: Path) -> None:
    """A LoRA adapter with random (non-zero) weights, so Model 1 differs from the base policy."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(model)
    peft = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft.save_pretrained(out)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "responses"))
    return tmp_path / "responses"


@pytest.fixture(scope="module")
def iteration1(world, tmp_path_factory):
    """contexts@1, sample@1, reward@1, pair@1 run in process, sharing one response cache."""
    from stages import contexts, pair, reward, sample

    root, params, _ = world
    out = tmp_path_factory.mktemp("it1")
    old = os.environ.get("DEEPER_RESPONSE_CACHE")
    os.environ["DEEPER_RESPONSE_CACHE"] = str(out / "responses")
    try:
        metrics = {
            "contexts": contexts.run(
                params,
                1,
                root / "windows.parquet",
                root / "init.parquet",
                None,
                out / "contexts.parquet",
                out / "contexts.json",
            ),
            "sample": sample.run(
                params,
                1,
                out / "contexts.parquet",
                None,
                out / "samples.parquet",
                out / "sample.json",
                "sampler",
            ),
            "reward": reward.run(
                params,
                out / "contexts.parquet",
                out / "samples.parquet",
                root / "windows.parquet",
                out / "rewards.parquet",
                out / "reward.json",
            ),
            "pair": pair.run(
                thresholds_that_pair(params, out / "rewards.parquet"),
                1,
                out / "contexts.parquet",
                out / "rewards.parquet",
                None,
                out / "pairs.parquet",
                out / "pairs.json",
            ),
        }
    finally:
        if old is None:
            os.environ.pop("DEEPER_RESPONSE_CACHE")
        else:
            os.environ["DEEPER_RESPONSE_CACHE"] = old
    return out, metrics


def thresholds_that_pair(params: dict, rewards_path: Path) -> dict:
    """`params` with tau_pos and tau_neg placed among the rewards the tiny random model earns (all within ~0.01
    of 0, so the module's 0.05 / 0.0 would pair nothing): the best and the worst candidate of the context whose
    rewards spread widest. That context pairs them, its candidates between them are neither positive nor
    negative, and every other context lacks a side: pairs are made, and the thresholds leave candidates out."""
    r = pd.read_parquet(rewards_path).drop_duplicates(["context_id", "text"])
    spread = r.groupby("context_id")["r"].agg(["min", "max"])
    low, high = spread.loc[(spread["max"] - spread["min"]).idxmax()]
    assert high - low > 1e-6, spread  # the candidates' rewards differ at all
    return {**params, "tau_pos": float(high), "tau_neg": float(low)}


def frozen_llm(params):
    return load_llm(params["models"]["frozen"])


# ---------------------------------------------------------------- inputs


def test_read_user_windows_names_file_and_row_of_a_gap(tmp_path):
    write_windows(tmp_path / "w.parquet")
    df = pd.read_parquet(tmp_path / "w.parquet")
    users = read_user_windows(tmp_path / "w.parquet")
    assert [u.user_id for u in users] == list(USERS)
    assert [len(u.windows) for u in users] == list(USERS.values())
    df.loc[(df["user_id"] == "u1") & (df["window"] == 1), "window"] = 5  # windows 0, 2, 3, 5
    df.to_parquet(tmp_path / "gap.parquet", index=False)
    with pytest.raises(InputError, match=r"gap.parquet:\d+: user u1 of movielens has windows \[0, 2, 3, 5\]"):
        read_user_windows(tmp_path / "gap.parquet")
    df = df.astype({"rating": object})
    df.loc[3, "rating"] = "five"
    df.astype({"rating": str}).to_parquet(tmp_path / "bad.parquet", index=False)
    with pytest.raises(InputError, match=r"bad.parquet:4: rating is not a finite number: 'five'"):
        read_user_windows(tmp_path / "bad.parquet")


def test_clean_candidate_drops_empty_and_flags_loops():
    assert clean_candidate("  \n**Refined persona:**\n ") == ("", "empty")
    assert clean_candidate("Refined persona: Loves slow films.") == ("Loves slow films.", None)
    loop = "I like films a lot " * 20
    assert clean_candidate(loop)[1] == "repetitive"


# ---------------------------------------------------------------- iteration 1


def test_contexts_hold_the_old_personas_errors_on_the_right_windows(world, iteration1):
    root, params, _ = world
    out, metrics = iteration1
    contexts = read_contexts(out / "contexts.parquet")
    assert list(contexts["context_id"]) == [
        "movielens/u0/t1",
        "movielens/u1/t1",
        "movielens/u3/t1",
        "movielens/u4/t1",
    ]
    assert (contexts["t"] == 1).all()
    assert metrics["contexts"]["skipped_users"] == {"no_persona": 1, "too_few_windows": 0}

    users = {u.user_id: u for u in read_user_windows(root / "windows.parquet")}
    row = contexts.iloc[1]
    user = users["u1"]
    # The old persona's errors, recomputed without the cache on W0, W1, W2.
    requests = [
        WindowRequest(row["persona_old"], "movie", user.windows[w].titles, user.windows[w].ratings)
        for w in (0, 1, 2)
    ]
    preds, _ = predict_windows(frozen_llm(params), requests, PredictSettings(windows_per_call=4))
    assert [row[c] for c in OLD_COLUMNS] == pytest.approx([p.mae for p in preds], abs=1e-6)
    assert list(row["predicted"]) == pytest.approx(list(preds[1].ratings), abs=1e-6)
    # The prompt is the deployment prompt over W1: its titles, actual ratings and the predictions.
    item = update_input(State(user, 1, row["persona_old"]), row["predicted"])
    assert json.loads(row["prompt"]) == Refine(None, Sampling()).chat(item)
    text = json.loads(row["prompt"])[-1]["content"]
    assert row["persona_old"] in text
    for title, actual in zip(user.windows[1].titles, user.windows[1].ratings):
        assert json.dumps(" ".join(title.split()))[1:-1] in text and f"actual {actual:g}" in text


def test_contexts_train_the_update_params_name(world, iteration1, tmp_path):
    """refiner.update: incupdate (the paper's Inc-FT ablation) builds the same contexts with IncUpdate's prompt."""
    from deeper.methods import IncUpdate
    from stages import contexts as contexts_stage

    root, params, _ = world
    out, _ = iteration1
    inc = {**params, "refiner": {"update": "incupdate"}}
    contexts_stage.run(
        inc,
        1,
        root / "windows.parquet",
        root / "init.parquet",
        None,
        tmp_path / "c.parquet",
        tmp_path / "c.json",
    )
    deeper, incft = read_contexts(out / "contexts.parquet"), read_contexts(tmp_path / "c.parquet")
    assert list(incft["context_id"]) == list(deeper["context_id"])
    assert list(incft[list(OLD_COLUMNS)].to_numpy().ravel()) == pytest.approx(
        list(deeper[list(OLD_COLUMNS)].to_numpy().ravel())
    )
    users = {u.user_id: u for u in read_user_windows(root / "windows.parquet")}
    for row in incft.itertuples():
        item = update_input(State(users[row.user_id], 1, row.persona_old), row.predicted)
        assert (
            json.loads(row.prompt)
            == IncUpdate(None, Sampling()).chat(item)
            != Refine(None, Sampling()).chat(item)
        )


def test_sampling_gives_n_candidates_per_context_reproducibly(world, iteration1):
    _, params, _ = world
    out, metrics = iteration1
    samples = pd.read_parquet(out / "samples.parquet")
    contexts = read_contexts(out / "contexts.parquet")
    n = params["sample"]["n"]
    m = metrics["sample"]
    assert m["requested"] == len(contexts) * n == m["kept"] + m["empty"]
    assert len(samples) == m["kept"]
    per_context = samples.groupby("context_id")["sample"].apply(list)
    for cid in contexts["context_id"]:
        kept = per_context.get(cid, [])
        assert set(kept) <= set(range(n)) and len(kept) == len(set(kept))
    # The stored candidates are the policy's own samples k = 0..n-1 (seed + k), cleaned.
    policy = load_llm(params["models"]["policy"])
    s = params["sample"]
    sampling = Sampling(s["temperature"], s["top_p"], s["repetition_penalty"], s["max_new_tokens"], s["seed"])
    first = contexts.iloc[0]
    raw = policy.generate([json.loads(first["prompt"])], n, sampling)[0]
    expected = {k: clean_candidate(t)[0] for k, t in enumerate(raw) if clean_candidate(t)[1] != "empty"}
    mine = samples[samples["context_id"] == first["context_id"]]
    assert dict(zip(mine["sample"], mine["text"])) == expected
    # every requested candidate that ran into max_new_tokens is counted, the dropped ones too
    raw_all = policy.generate([json.loads(p) for p in contexts["prompt"]], n, sampling)
    cut = sum(t.stopped_at_limit for texts in raw_all for t in texts)
    assert cut > 0 and (m["stopped_at_limit"], m["stopped_at_limit_share"]) == (cut, cut / m["requested"])


def test_rewards_are_old_minus_new_errors(world, iteration1):
    root, params, _ = world
    out, metrics = iteration1
    rewards = pd.read_parquet(out / "rewards.parquet")
    samples = pd.read_parquet(out / "samples.parquet")
    contexts = read_contexts(out / "contexts.parquet").set_index("context_id")
    assert len(rewards) == len(samples) and rewards["r"].notna().all()
    for part, old, new in zip(PARTS, OLD_COLUMNS, NEW_COLUMNS):
        assert np.allclose(rewards[f"r_{part}"], rewards[old] - rewards[new])
        assert np.allclose(rewards[old], contexts.loc[rewards["context_id"], old].to_numpy())
    assert np.allclose(rewards["r"], rewards["r_prev"] + rewards["r_curr"] + rewards["r_fut"])
    # A candidate's errors, recomputed on its context's W_{t-1}, W_t, W_{t+1}.
    one = rewards.iloc[-1]
    user = {u.user_id: u for u in read_user_windows(root / "windows.parquet")}[
        contexts.loc[one["context_id"], "user_id"]
    ]
    requests = [
        WindowRequest(one["text"], "movie", user.windows[w].titles, user.windows[w].ratings)
        for w in (0, 1, 2)
    ]
    preds, _ = predict_windows(frozen_llm(params), requests, PredictSettings())
    assert [one[c] for c in NEW_COLUMNS] == pytest.approx([p.mae for p in preds], abs=1e-6)
    assert metrics["reward"]["r"]["mean"] == pytest.approx(rewards["r"].mean())
    assert metrics["reward"]["share_better_than_old"] == pytest.approx((rewards["r"] > 1e-9).mean())


def test_pairs_follow_thresholds_and_carry_the_context_prompt(world, iteration1):
    _, params, _ = world
    out, metrics = iteration1
    pairs = pd.read_parquet(out / "pairs.parquet")
    rewards = pd.read_parquet(out / "rewards.parquet")
    contexts = read_contexts(out / "contexts.parquet").set_index("context_id")
    used = thresholds_that_pair(params, out / "rewards.parquet")  # what pair@1 ran with
    tau_pos, tau_neg = used["tau_pos"], used["tau_neg"]
    r = rewards.drop_duplicates(["context_id", "text"]).assign(
        pos=lambda d: is_positive(d["r"], tau_pos), neg=lambda d: is_negative(d["r"], tau_neg)
    )
    sides = r.groupby("context_id")[["pos", "neg"]].sum()
    has_both = set(sides.index[(sides["pos"] > 0) & (sides["neg"] > 0)])
    # Pairing made something: a pair@1 that silently pairs nothing fails here (the sets below would agree).
    assert len(pairs) >= 1 and metrics["pair"]["pairs"] == len(pairs)
    assert set(pairs["context_id"]) == has_both  # delta 0: every context with a positive and a negative pairs
    # The thresholds are what leave the others out: candidates between them are neither positive nor negative,
    # contexts without one side pair nothing, and a context pairs as many as its smaller side allows (each
    # candidate at most once, up to pair.max_per_context: the largest_margin strategy).
    assert (~r["pos"] & ~r["neg"]).any() and len(has_both) < len(sides)
    per_context = pairs.groupby("context_id").size()
    for cid in has_both:
        allowed = min(params["pair"]["max_per_context"], sides.loc[cid, "pos"], sides.loc[cid, "neg"])
        assert per_context[cid] == allowed, (cid, sides.loc[cid].to_dict())
    assert (
        is_positive(pairs["chosen_reward"], tau_pos).all()
        and is_negative(pairs["rejected_reward"], tau_neg).all()
    )
    assert (pairs["prompt"] == contexts.loc[pairs["context_id"], "prompt"].to_numpy()).all()
    assert set(pairs["split"]) <= {"train", "val"}


# ---------------------------------------------------------------- iteration 2


def test_iteration_2_adds_contexts_from_model_1s_refinements(world, iteration1, tmp_path, cache):
    from stages import contexts, pair, refine, sample

    root, params, _ = world
    it1, _ = iteration1
    adapter = root / "adapter_it1"
    refine.run(
        params,
        it1 / "contexts.parquet",
        root / "windows.parquet",
        adapter,
        tmp_path / "s1.parquet",
        tmp_path / "r.json",
    )
    s1 = pd.read_parquet(tmp_path / "s1.parquet")
    assert list(s1["context_id"]) == list(read_contexts(it1 / "contexts.parquet")["context_id"])
    assert (s1["t"] == 2).all() and (s1["split"] == "train").all()
    # eight new tokens: every refinement of the tiny model ran into the limit, and the metrics count each
    refined = json.loads((tmp_path / "r.json").read_text())
    assert (refined["stopped_at_limit"], refined["stopped_at_limit_share"]) == (len(s1), 1.0)

    summary = contexts.run(
        params,
        2,
        root / "windows.parquet",
        tmp_path / "s1.parquet",
        it1 / "contexts.parquet",
        tmp_path / "contexts.parquet",
        tmp_path / "contexts.json",
    )
    both = read_contexts(tmp_path / "contexts.parquet")
    old = read_contexts(it1 / "contexts.parquet")
    assert summary["skipped_users"] == {"no_persona": 1, "too_few_windows": 1}  # u2 has no S_1, u3 no W3
    kept = ["context_id", "t", "persona_old", "prompt", *OLD_COLUMNS]
    pd.testing.assert_frame_equal(both.iloc[: len(old)][kept].reset_index(drop=True), old[kept])
    new = both.iloc[len(old) :]
    assert list(new["context_id"]) == ["movielens/u0/t2", "movielens/u1/t2", "movielens/u4/t2"]
    assert list(new["persona_old"]) == list(s1.set_index("user_id").loc[["u0", "u1", "u4"], "persona"])
    # New contexts at t=2 measure S_1 on W1, W2, W3.
    user = {u.user_id: u for u in read_user_windows(root / "windows.parquet")}["u4"]
    row = new.iloc[-1]
    requests = [
        WindowRequest(row["persona_old"], "movie", user.windows[w].titles, user.windows[w].ratings)
        for w in (1, 2, 3)
    ]
    preds, _ = predict_windows(frozen_llm(params), requests, PredictSettings())
    assert [row[c] for c in OLD_COLUMNS] == pytest.approx([p.mae for p in preds], abs=1e-6)

    # sample@2 uses Model 1: different candidates than the base policy for the same iteration-1 context.
    sample.run(
        params, 2, tmp_path / "contexts.parquet", adapter, tmp_path / "samples.parquet", tmp_path / "s.json"
    )
    samples2 = pd.read_parquet(tmp_path / "samples.parquet")
    samples1 = pd.read_parquet(it1 / "samples.parquet")
    assert (
        set(samples2["context_id"]) <= set(both["context_id"])
        and (samples2["context_id"].str.endswith("/t2")).any()
    )
    cid = old["context_id"].iloc[0]
    assert list(samples2.loc[samples2["context_id"] == cid, "text"]) != list(
        samples1.loc[samples1["context_id"] == cid, "text"]
    )

    # pair@2 replays iteration-1 pairs with margin > iter2.delta, at most iter2.replay_max.
    rewards2 = pd.read_parquet(it1 / "rewards.parquet").iloc[:0]  # no new candidates: only replay
    rewards2.to_parquet(tmp_path / "rewards.parquet", index=False)
    m = pair.run(
        params,
        2,
        tmp_path / "contexts.parquet",
        tmp_path / "rewards.parquet",
        it1 / "pairs.parquet",
        tmp_path / "pairs.parquet",
        tmp_path / "pairs.json",
    )
    pairs1 = pd.read_parquet(it1 / "pairs.parquet")
    assert m["replay_pairs"] == min(params["iter2"]["replay_max"], int((pairs1["margin"] > 1e-9).sum())) >= 1


# ---------------------------------------------------------------- resuming


def _stage(args, env):
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sample_stage_killed_midway_resumes_with_only_the_missing_calls(world, iteration1, tmp_path):
    _, _, model = world
    it1, _ = iteration1
    n = 2
    # batch_size 1: the cache commits after each context's n samples, so a kill lands half-way.
    slow = make_params(model, n=n, max_new_tokens=24)
    slow["models"]["policy"]["batch_size"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(slow))
    contexts = read_contexts(it1 / "contexts.parquet")
    copies = []
    for i in range(3):  # distinct prompts (the cache keys on the prompt, not on the context id)
        chats = [json.loads(p) for p in contexts["prompt"]]
        for chat in chats:
            chat[0]["content"] += f" (copy {i})"
        copies.append(
            contexts.assign(
                context_id=contexts["context_id"] + f"/copy{i}", prompt=[json.dumps(c) for c in chats]
            )
        )
    many = pd.concat(copies, ignore_index=True)
    many.to_parquet(tmp_path / "contexts.parquet", index=False)
    total = len(many) * n
    env = {**os.environ, "DEEPER_RESPONSE_CACHE": str(tmp_path / "responses")}
    args = [
        "stages.sample",
        "--params",
        str(tmp_path / "params.yaml"),
        "--iteration",
        "1",
        "--contexts",
        str(tmp_path / "contexts.parquet"),
        "--out",
        str(tmp_path / "samples.parquet"),
        "--metrics",
        str(tmp_path / "sample.json"),
    ]

    proc = _stage(args, env)
    deadline = time.monotonic() + 300
    while (
        len(cached_rows(tmp_path / "responses")) == 0 and proc.poll() is None and time.monotonic() < deadline
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = len(cached_rows(tmp_path / "responses"))
    assert 0 < done < total, f"the kill came at {done} of {total} cached samples"
    assert not (tmp_path / "samples.parquet").exists()

    proc = _stage(args, env)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    stats = stage_calls(stderr, "policy")
    assert (stats["cache_hits"], stats["cache_misses"]) == (done, total - done)
    assert stats["calls"] == total - done  # the backend generated only the missing samples
    assert len(cached_rows(tmp_path / "responses")) == total

    # Cached before the kill or generated after it: each context's candidates are the policy's samples 0..n-1.
    resumed = pd.read_parquet(tmp_path / "samples.parquet")
    policy = load_llm(slow["models"]["policy"])
    s = slow["sample"]
    sampling = Sampling(s["temperature"], s["top_p"], s["repetition_penalty"], s["max_new_tokens"], s["seed"])
    for row in (many.iloc[0], many.iloc[-1]):
        raw = policy.generate([json.loads(row["prompt"])], n, sampling)[0]
        expected = {k: clean_candidate(t)[0] for k, t in enumerate(raw) if clean_candidate(t)[1] != "empty"}
        mine = resumed[resumed["context_id"] == row["context_id"]]
        assert dict(zip(mine["sample"], mine["text"])) == expected


def test_the_training_stages_render_the_prompt_set_params_name(world, iteration1, tmp_path, monkeypatch):
    """params `prompts: published`: contexts@k hold the paper's refine prompt (Table 6, one user message),
    refine@1 renders the same set (it re-renders each context's prompt and refuses one that differs), and
    reward@k predicts with the set's prediction prompt (other prompts, other predicted errors)."""
    from stages import contexts as contexts_stage
    from stages import refine, reward

    root, params, _ = world
    it1, _ = iteration1
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "responses"))
    published = {**params, "prompts": "published"}
    contexts_stage.run(
        published,
        1,
        root / "windows.parquet",
        root / "init.parquet",
        None,
        tmp_path / "c.parquet",
        tmp_path / "c.json",
    )
    chat = json.loads(read_contexts(tmp_path / "c.parquet")["prompt"].iloc[0])
    assert [m["role"] for m in chat] == ["user"]
    assert chat[0]["content"].startswith("TASK:\nRefine the old user persona based on differences")
    tuned_chat = json.loads(read_contexts(it1 / "contexts.parquet")["prompt"].iloc[0])
    assert [m["role"] for m in tuned_chat] == ["system", "user"]

    adapter = root / "adapter_it1"
    refine.run(
        published,
        tmp_path / "c.parquet",
        root / "windows.parquet",
        adapter,
        tmp_path / "s1.parquet",
        tmp_path / "r.json",
    )
    with pytest.raises(InputError, match="prompt differs from its persona and windows"):
        refine.run(
            params,
            tmp_path / "c.parquet",
            root / "windows.parquet",
            adapter,
            tmp_path / "s1b.parquet",
            tmp_path / "r.json",
        )

    scored = {}
    for name, p in (("tuned", params), ("published", published)):
        reward.run(
            p,
            it1 / "contexts.parquet",
            it1 / "samples.parquet",
            root / "windows.parquet",
            tmp_path / f"rw_{name}.parquet",
            tmp_path / f"rw_{name}.json",
        )
        scored[name] = pd.read_parquet(tmp_path / f"rw_{name}.parquet")
    assert list(scored["tuned"]["context_id"]) == list(scored["published"]["context_id"])
    new = list(NEW_COLUMNS)  # the candidates' own errors: predicted with the set's prompt
    assert not np.allclose(scored["tuned"][new].to_numpy(float), scored["published"][new].to_numpy(float))

"""The learning regression test (issue 20): training on pairs makes the policy prefer, on HELD-OUT pairs, what
the pairs encode, and it stops doing so under each breakage of the learning path.

The diagnostic world (deeper/diagnostic.py: a test of the trainer, not of the paper's claim): synthetic users
love one genre and dislike another, the `tastes` backend is the frozen model, S_0 states no taste. Every step
from there is the pipeline's own code: contexts (deeper.iteration.build_contexts, the refine prompt), the
candidates' errors and rewards (candidate_errors, deeper.reward), the pairs (deeper.pairs, thresholds and
margin), DPO + SFT on a LoRA adapter (deeper.train.train_dpo, TRL), the adapter loaded as the evaluation loads
it (deeper.llm.load_llm), held-out pairs of users never trained on scored by deeper.learning.

The one substitution: a tiny random model cannot write a persona, so each context's candidates are written
here: the user's true tastes, the reverse, another taste, and assistant chatter (what SmolLM2's Model 2 wrote
in docs/refiner.md's worked example). The rewards decide which of them are chosen. What the tiny model can learn is
what the chosen texts share across users (persona over chatter, the population's loved genre); reading each
user's own tastes from the prompt is the learning check's question (profiles/learning_check.yaml).
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from deeper.diagnostic import Tastes, stated_tastes
from deeper.iteration import State, build_contexts, candidate_errors, context_id
from deeper.learning import completion_logps, preference_report, world_users
from deeper.pairs import PairConfig, build_pairs
from deeper.predict import PredictSettings
from deeper.prompts import load_prompts
from deeper.reward import compute_rewards

GENRES = ("Comedy", "Horror", "Drama", "Action")
# Every user loves comedies and dislikes one other genre: a tiny random model learns what the chosen texts have
# in common (measured: it does not learn to read each user's disliked genre from the prompt), so the shared
# taste is what makes the direction of the reward visible on held-out users.
LOVED = "Comedy"
CATALOG = [
    (f"Film {i}", frozenset({GENRES[i % 4]} | ({GENRES[(i // 4) % 4]} if i % 3 == 0 else set())))
    for i in range(40)
]
CHATTER = "I'm ready to assist you. Please go ahead and provide the user's persona."
PAIRS = PairConfig(tau_pos=0.1, tau_neg=0.0, delta=0.2, strategy="all", max_per_context=3, val_fraction=0.0)
BETA = 0.2
# One epoch over 144 pairs, 18 steps of 8: ~25 s on one core. A high learning rate for a tiny model.
TRAIN = {
    "max_steps": -1,
    "epochs": 1,
    "per_device_batch": 8,
    "grad_accum": 1,
    "lr": 1e-2,
    "warmup_steps": 0,
    "max_length": 512,
    "beta": BETA,
}


def learned(report: dict) -> bool:
    """The stated margin: on held-out pairs the trained policy's implicit reward margin (DPO's, against the base
    model) is above 0 with its interval over contexts, and at least 60% of the pairs have a positive margin.
    (Raw preference accuracy, log p(chosen) > log p(rejected), is reported but not asserted: chosen texts are
    longer than the chatter they beat, and one epoch does not outweigh a sum over more tokens.)"""
    return report["implicit_margin"]["low"] > 0 and report["reward_accuracy"]["estimate"] >= 0.6


def world_pairs(users, flip_reward: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pairs of the users' first refinement step (t = 1), and the candidates' rewards."""
    from deeper.llm import load_llm

    frozen = load_llm({"backend": "tastes", "name": "transparent"})
    neutral = Tastes(frozenset(), frozenset()).describe()
    contexts, _ = build_contexts(
        [State(u, 1, neutral) for u, _ in users], frozen, PredictSettings(), load_prompts(), progress=None
    )
    rng = np.random.default_rng(0)
    rows = []
    for (user, tastes), cid in zip(users, contexts["context_id"]):
        other = Tastes(frozenset({GENRES[int(rng.integers(len(GENRES)))]}), frozenset())
        texts = [
            tastes.describe(),
            Tastes(tastes.disliked, tastes.loved).describe(),
            CHATTER,
            other.describe(),
        ]
        rows += [{"context_id": cid, "sample": k, "text": t} for k, t in enumerate(texts)]
    errors, _ = candidate_errors(
        contexts, pd.DataFrame(rows), [u for u, _ in users], frozen, PredictSettings(), progress=None
    )
    rewards = compute_rewards(errors)
    if flip_reward:  # breakage: the reward's sign flipped before pairing
        rewards["r"] = -rewards["r"]
    pairs, _ = build_pairs(rewards.merge(contexts[["context_id", "prompt"]], on="context_id"), PAIRS)
    return pairs, rewards


@pytest.fixture(scope="module")
def world():
    train_users = world_users(CATALOG, GENRES, 48, 3, 4, seed=0, loved=LOVED)
    held_users = world_users(CATALOG, GENRES, 24, 3, 4, seed=1, id_prefix="h", loved=LOVED)
    train, rewards = world_pairs(train_users)
    held, _ = world_pairs(held_users)
    return SimpleNamespace(train_users=train_users, train=train, rewards=rewards, held=held)


@pytest.fixture(scope="module")
def policy_model(world, tmp_path_factory):
    """A tiny random Llama whose tokenizer is trained on the world's texts (prompts ~260 tokens, not ~1100)."""
    from tests.tiny import make_tiny_llama

    corpus = [m["content"] for p in world.train["prompt"] for m in json.loads(p)]
    corpus += list(world.train["chosen"]) + list(world.train["rejected"])
    return make_tiny_llama(tmp_path_factory.mktemp("world-llama"), corpus=corpus, vocab_size=1500)


def train_and_score(policy_model, pairs: pd.DataFrame, held: pd.DataFrame, out) -> dict:
    from deeper.llm import load_llm
    from deeper.train import TrainConfig, train_dpo

    train_dpo(policy_model, pairs, pairs.iloc[:0], out, TrainConfig(**TRAIN))
    spec = {"backend": "transformers", "name": str(policy_model)}
    trained = completion_logps(load_llm(spec, adapter=str(out)), held)
    base = completion_logps(load_llm(spec), held)
    return preference_report(trained, base, held["context_id"], BETA)


def test_the_world_pairs_encode_the_users_tastes(world):
    rewards = world.rewards.assign(
        kind=world.rewards["sample"].map({0: "true", 1: "reverse", 2: "chatter", 3: "other"})
    )
    mean = rewards.groupby("kind")["r"].mean()
    assert mean["true"] > 0.5 and mean["reverse"] < 0
    assert (rewards.loc[rewards["kind"] == "chatter", "r"] == 0).all()  # predicts 3 for all, as S_0 does
    # every context gives 2-3 pairs; no chosen text contradicts the user's tastes, and most state them exactly
    assert world.train["context_id"].nunique() == 48 and 96 <= len(world.train) <= 144
    truth = {context_id(u.domain, u.user_id, 1): t for u, t in world.train_users}
    for cid, chosen in zip(world.train["context_id"], world.train["chosen"]):
        stated = stated_tastes(chosen)
        assert not (stated.loved & truth[cid].disliked or stated.disliked & truth[cid].loved), chosen
    assert CHATTER not in set(world.train["chosen"])
    assert (
        world.train["chosen"] == world.train["context_id"].map(lambda c: truth[c].describe())
    ).mean() > 0.8
    assert set(world.held["context_id"]).isdisjoint(world.train["context_id"])


@pytest.fixture(scope="module")
def trained(world, policy_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("model-1") / "adapter"
    return out, train_and_score(policy_model, world.train, world.held, out)


def test_training_on_pairs_wins_on_held_out_pairs(trained):
    _, report = trained
    assert report["pairs"] >= 48 and report["contexts"] == 24
    assert learned(report), json.dumps(report, indent=1)


def test_an_adapter_dropped_at_load_is_caught(world, policy_model, trained, monkeypatch):
    import peft

    from deeper.llm import load_llm

    adapter, _ = trained
    # breakage: the backend loads the adapter but gives back the base model
    monkeypatch.setattr(
        peft.PeftModel,
        "from_pretrained",
        classmethod(lambda cls, model, *a, **k: SimpleNamespace(merge_and_unload=lambda: model)),
    )
    spec = {"backend": "transformers", "name": str(policy_model)}
    dropped = completion_logps(load_llm(spec, adapter=str(adapter)), world.held)
    report = preference_report(
        dropped, completion_logps(load_llm(spec), world.held), world.held["context_id"], BETA
    )
    assert report["implicit_margin"]["estimate"] == 0 and not learned(report)


def test_swapped_chosen_and_rejected_in_the_trainer_input_are_caught(
    world, policy_model, tmp_path, monkeypatch
):
    import deeper.train

    original = deeper.train.pairs_to_examples

    def swapped(pairs, source):
        return [{**e, "chosen": e["rejected"], "rejected": e["chosen"]} for e in original(pairs, source)]

    monkeypatch.setattr(deeper.train, "pairs_to_examples", swapped)
    report = train_and_score(policy_model, world.train, world.held, tmp_path / "adapter")
    assert report["implicit_margin"]["estimate"] < 0 and not learned(report)


def test_a_learning_rate_of_zero_is_caught(world, policy_model, tmp_path, monkeypatch):
    import deeper.train

    original = deeper.train._dpo_config

    def frozen_lr(*args, **kwargs):
        config = original(*args, **kwargs)
        config.learning_rate = 0.0  # breakage: the optimizer never moves the adapter
        return config

    monkeypatch.setattr(deeper.train, "_dpo_config", frozen_lr)
    report = train_and_score(policy_model, world.train, world.held, tmp_path / "adapter")
    assert abs(report["implicit_margin"]["estimate"]) < 1e-3 and not learned(report)


def test_a_reward_sign_flipped_before_pairing_is_caught(world, policy_model, tmp_path):
    flipped, _ = world_pairs(world.train_users, flip_reward=True)
    report = train_and_score(policy_model, flipped, world.held, tmp_path / "adapter")
    assert not learned(report), json.dumps(report, indent=1)


def test_first_update_contrasts_pair_the_same_users():
    """Model 2 - base on the same users: a constant gain of 0.1 per user gives exactly 0.1 with a zero-width
    interval, whatever the users' spread; a user one refiner was not scored on is left out of all."""
    from deeper.bootstrap import BootstrapSettings
    from deeper.learning import first_update_contrasts

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 30)
    rows = [("untrained", u, b) for u, b in enumerate(base)] + [
        ("deeper", u, b + 0.1) for u, b in enumerate(base)
    ]
    rows += [("deeper_it1", u, b - 0.2) for u, b in enumerate(base[:-1])]  # user 29 unscored for Model 1
    table = pd.DataFrame(
        [
            {"method": m, "part": part, "domain": "d", "user_id": u, "reward": v if part == "r" else 9.0}
            for m, u, v in rows
            for part in ("r", "r_fut")
        ]
    )
    out = first_update_contrasts(
        table,
        {"base": "untrained", "model_1": "deeper_it1", "model_2": "deeper"},
        BootstrapSettings(resamples=500),
    )
    assert out["users"] == 29
    gain = out["contrasts"]["model_2 - base"]
    assert (
        gain["estimate"] == pytest.approx(0.1)
        and gain["low"] == pytest.approx(0.1)
        and gain["high"] == pytest.approx(0.1)
    )
    assert out["contrasts"]["model_1 - base"]["estimate"] == pytest.approx(-0.2)
    assert out["means"]["base"]["estimate"] == pytest.approx(base[:-1].mean())
    assert out["means"]["base"]["low"] < out["means"]["base"]["estimate"] < out["means"]["base"]["high"]
    with pytest.raises(ValueError, match="no first-update reward of \\['nope'\\]"):
        first_update_contrasts(table, {"base": "nope"}, BootstrapSettings(resamples=100))


def test_pair_yield_says_why_an_iteration_made_no_pair():
    """Three contexts: one whose candidates all tie (no contrast), one with only negatives spread apart, one
    with a positive and a negative delta apart (the only one that can make a pair)."""
    from deeper.learning import pair_yield

    rows = []
    for ctx, rewards in {
        "tie": [0.8, 0.8, 0.8],
        "all_bad": [-0.2, -1.5, -3.0],
        "pair": [0.6, -0.1, -0.4],
    }.items():
        for k, r in enumerate(rewards):
            rows.append(
                {
                    "context_id": ctx,
                    "sample": k,
                    "r": r,
                    "old_eps_prev": 0.5,
                    "old_eps_curr": 0.7,
                    "old_eps_fut": 0.6,
                    "new_eps_prev": 1.0,
                    "new_eps_curr": 1.0,
                    "new_eps_fut": 1.3,
                }
            )
    found = pair_yield(pd.DataFrame(rows), tau_pos=0.5, tau_neg=0.0, delta=0.5)
    assert found == {
        "candidates": 9,
        "contexts": 3,
        "better_than_old": 4,
        "positives": 4,
        "negatives": 5,
        "contexts_with_positive_and_negative": 1,
        "contexts_spread_at_least_delta": 2,
        "contexts_all_equal": 1,
        "old_eps_mean": pytest.approx(0.6),
        "new_eps_mean": pytest.approx(1.1),
    }

"""Multi-round rollout on the tiny random Llama: which persona predicts which window, the errors against
hand-computed MAEs, the first-update errors (Table 1) and the summaries the report stage writes."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from deeper.llm.base import Sampling
from deeper.methods.base import UpdateMethod, UpdateResult, Window
from deeper.predict import FALLBACK_RATING, PredictSettings, WindowRequest, predict_windows
from deeper.reward import compute_rewards
from deeper.rollout import (
    EvalUser,
    first_update_errors,
    mae_by_round,
    rollout,
    summarize_domain,
    summarize_method,
)
from tests.conftest import one_line_error


class Tagging(UpdateMethod):
    """A real (if simple) update method: appends what it saw to the persona, so each S_t is known."""

    name = "tagging"

    def __init__(self):
        super().__init__(llm=None, sampling=Sampling())
        self.seen_inputs = []

    def planned_chats(self, item):
        return []  # no model call

    def update(self, inputs):
        self.seen_inputs.append(list(inputs))
        return [
            UpdateResult(
                persona=f"{item.persona} | saw W{len(item.history) - 1}, predicted {list(item.predictions)}"
            )
            for item in inputs
        ]


def _users(n_windows: int = 4, n_users: int = 2) -> list[EvalUser]:
    users = []
    for u, (domain, seen) in enumerate([("books", True), ("garden", False), ("books", True)][:n_users]):
        windows = tuple(
            Window(
                titles=(f"Item {u}-{w}-a", f"Item {u}-{w}-b", f'"Odd" {{title}} {u}-{w}'),
                ratings=(float(1 + (u + w) % 5), float(1 + (u + 2 * w) % 5), 3.5),
            )
            for w in range(n_windows)
        )
        users.append(EvalUser(domain, f"user{u}", "book", seen, windows, f"Persona zero of user {u}."))
    return users


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    from deeper.llm import load_llm

    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 8})


def test_json_mode_failed_answers_give_the_midpoint_and_hand_computed_errors(tiny_llm):
    """The random model writes no JSON: every item falls back to rating 3, so every error is known."""
    users = _users()
    settings = PredictSettings(
        mode="json", json_sampling=Sampling(temperature=0.0, max_new_tokens=8), max_parse_failed_share=1.0
    )  # every answer fails: counted, not stopped here
    result = rollout(
        users, Tagging(), tiny_llm, rounds=2, predict_settings=settings, count_tokens=len, progress=False
    )
    table = result.table.set_index(["user_id", "round"])
    for u, user in enumerate(users):
        for s in range(3):
            row = table.loc[(user.user_id, s)]
            actual = user.windows[s + 1].ratings
            assert row["mae"] == pytest.approx(sum(abs(FALLBACK_RATING - a) for a in actual) / 3)
            assert row["predict_failed_items"] == 3 and row["items"] == 3
        for s in (0, 1):
            for w in (0, 1, 2):
                hand = sum(abs(FALLBACK_RATING - a) for a in user.windows[w].ratings) / 3
                assert table.loc[(user.user_id, s), f"mae_w{w}"] == pytest.approx(hand)
        assert math.isnan(table.loc[(user.user_id, 2), "mae_w0"])
    # the method saw the fallback predictions of S_{t-1} on W_t and the history W_0..W_t
    assert result.predict_stats.parse_failed_items == result.predict_stats.items


def test_each_round_predicts_the_next_window_with_the_latest_persona(tiny_llm):
    users = _users()
    method = Tagging()
    settings = PredictSettings(mode="logprob")
    result = rollout(
        users, method, tiny_llm, rounds=2, predict_settings=settings, count_tokens=len, progress=False
    )
    table = result.table
    assert list(table.columns[:4]) == ["domain", "user_id", "seen", "round"]
    assert len(table) == len(users) * 3 and result.updates == len(users) * 2
    # the updates saw S_{t-1}, W_0..W_t, and the predictions made with S_{t-1} on W_t
    assert len(method.seen_inputs) == 2 and all(len(batch) == len(users) for batch in method.seen_inputs)
    rows = {user.user_id: table[table.user_id == user.user_id].set_index("round") for user in users}
    # independent predictions of S_s on W_{s+1}, s = 0..2 (the first two are also what update t = s + 1 saw)
    keys = [(user, s) for user in users for s in range(3)]
    requests = [
        WindowRequest(rows[u.user_id].loc[s, "persona"], "book", u.windows[s + 1].titles) for u, s in keys
    ]
    independent = dict(zip([(u.user_id, s) for u, s in keys], predict_windows(tiny_llm, requests)[0]))
    for t, batch in enumerate(method.seen_inputs, start=1):
        for user, item in zip(users, batch):
            assert item.history == user.windows[: t + 1]
            assert item.persona == rows[user.user_id].loc[t - 1, "persona"]
            np.testing.assert_allclose(
                item.predictions, independent[(user.user_id, t - 1)].ratings, atol=1e-6
            )
    # errors: hand-computed from the independent predictions
    for user in users:
        mine = rows[user.user_id]
        assert mine.loc[0, "persona"] == user.persona0
        assert mine.loc[2, "persona"].startswith(mine.loc[1, "persona"] + " | saw W2")
        for s in range(3):
            predicted = independent[(user.user_id, s)].ratings
            hand = float(np.mean(np.abs(predicted - np.array(user.windows[s + 1].ratings))))
            assert mine.loc[s, "mae"] == pytest.approx(hand, abs=1e-6)
            assert mine.loc[s, "persona_tokens"] == len(mine.loc[s, "persona"])
        # Table 1 errors agree with the rollout's own where they coincide
        assert mine.loc[0, "mae_w1"] == pytest.approx(mine.loc[0, "mae"])
        assert mine.loc[1, "mae_w2"] == pytest.approx(mine.loc[1, "mae"])


def test_one_round_still_measures_the_first_update(tiny_llm):
    result = rollout(_users(3, n_users=1), Tagging(), tiny_llm, rounds=1, count_tokens=len, progress=False)
    assert result.table[["mae_w0", "mae_w1", "mae_w2"]].notna().all().all()


def test_too_few_windows_is_refused():
    with pytest.raises(ValueError, match="3 windows; 2 rounds need 4"):
        rollout(_users(3), Tagging(), None, rounds=2, progress=False)


def _hand_table() -> pd.DataFrame:
    rows = []
    # two users in "books" (seen), one in "garden" (unseen); rounds 0..2
    for user, domain, seen, maes, tokens in [
        ("a", "books", True, [1.0, 0.8, 0.6], [100, 120, 140]),
        ("b", "books", True, [2.0, 1.2, 1.0], [200, 220, 240]),
        ("c", "garden", False, [0.5, 0.5, 0.25], [50, 60, 70]),
    ]:
        for s in range(3):
            rows.append(
                {
                    "domain": domain,
                    "user_id": user,
                    "seen": seen,
                    "round": s,
                    "persona_tokens": tokens[s],
                    "mae": maes[s],
                    "items": 10 if user != "c" else 5,
                    "predict_failed_items": 1 if user == "c" else 2 if (user, s) == ("b", 1) else 0,
                    "update_failure": "empty" if (user, s) == ("a", 2) else None,
                    "update_flag": None,
                    # on W0, W1, W2: S0 errors, S1 errors (mae_w1 of S0 and mae_w2 of S1 are the rollout's)
                    "mae_w0": {0: 0.4, 1: 0.6}.get(s, math.nan),
                    "mae_w1": {0: maes[0], 1: 0.2}.get(s, math.nan),
                    "mae_w2": {0: 1.5, 1: maes[1]}.get(s, math.nan),
                    # a ranks the next window right, b wrong; c's user rated everything the same (no pair)
                    "predicted": {"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 1.0 + s], "c": [1.0, 2.0, 3.0]}[user],
                    "actual": {"a": [1.0, 2.0, 3.0], "b": [1.0, 2.0, 3.0], "c": [4.0, 4.0, 4.0]}[user],
                    # b's method makes two calls per update; b's first update and c's second ran into the limit
                    "answers": [] if s == 0 else ["short", "merged"] if user == "b" else ["refined"],
                    "update_stopped_at_limit": int((user, s) in {("b", 1), ("c", 2)}),
                }
            )
    return pd.DataFrame(rows)


def test_summaries_match_hand_computed_numbers():
    table = _hand_table()
    books = summarize_domain(table[table.domain == "books"], rounds=2)
    assert books["users"] == 2
    assert books["mae_r0"] == pytest.approx(1.5) and books["mae_r2"] == pytest.approx(0.8)
    assert books["reduction_pct"] == pytest.approx(100 * (1.5 - 0.8) / 1.5)
    assert books["persona_tokens"] == {"r0": 150, "r1": 170, "r2": 190}
    assert books["first_update"]["prev"] == pytest.approx({"before": 0.4, "after": 0.6, "delta": 0.2})
    assert books["first_update"]["curr"] == pytest.approx({"before": 1.5, "after": 0.2, "delta": -1.3})
    assert books["first_update"]["fut"] == pytest.approx({"before": 1.5, "after": 1.0, "delta": -0.5})
    assert books["update_failures"] == 1 and books["predict_failed_items"] == 2
    # beside each error, the share of its items that got the fallback rating: user b's 2 of the round's 20
    assert [books[f"mae_r{s}_parse_failed_share"] for s in range(3)] == pytest.approx([0.0, 0.1, 0.0])
    assert list(books)[list(books).index("mae_r1") + 1] == "mae_r1_parse_failed_share"
    # a: 3 of 3 pairs right; b: round 0 none; round 1 predicts 3, 2, 2 (one tie: 0.5); round 2 predicts 3, 2, 3
    # (one wrong, one tie, one right: 1.5)
    assert books["pairwise_accuracy"] == pytest.approx({"r0": 3 / 6, "r1": 3.5 / 6, "r2": 4.5 / 6})
    # update answers cut at the limit: 1 of books' 6 (a: 1 + 1, b: 2 + 2), 1 of garden's 2
    assert books["update_stopped_at_limit_share"] == pytest.approx(1 / 6)

    summary = summarize_method(table, rounds=2)
    assert set(summary) == {"domains", "seen", "unseen", "all"}
    assert summary["unseen"]["mae_r2"] == pytest.approx(0.25) and summary["unseen"]["domains"] == 1
    # averages weigh domains equally: (0.8 + 0.25) / 2, not the mean over three users
    assert summary["all"]["mae_r2"] == pytest.approx((0.8 + 0.25) / 2)
    assert summary["all"]["reduction_pct"] == pytest.approx((100 * 0.7 / 1.5 + 50.0) / 2)
    assert summary["all"]["users"] == 3 and summary["all"]["predict_failed_items"] == 5
    assert summary["unseen"]["mae_r0_parse_failed_share"] == pytest.approx(1 / 5)  # user c: 1 of 5 items
    assert summary["all"]["mae_r1_parse_failed_share"] == pytest.approx((0.1 + 0.2) / 2)
    # garden has no pair rated differently: its accuracy is no number, and the average is books' alone
    assert summary["all"]["pairwise_accuracy"]["r0"] == pytest.approx(0.5)
    assert summary["unseen"]["update_stopped_at_limit_share"] == pytest.approx(0.5)
    assert summary["all"]["update_stopped_at_limit_share"] == pytest.approx((1 / 6 + 0.5) / 2)
    assert mae_by_round(table, 2) == pytest.approx([(1.5 + 0.5) / 2, (1.0 + 0.5) / 2, (0.8 + 0.25) / 2])

    rewards = compute_rewards(first_update_errors(table)).set_index("user_id")
    # user a: r_prev = 0.4 - 0.6, r_curr = 1.0 - 0.2, r_fut = 1.5 - 0.8
    assert rewards.loc["a", "r"] == pytest.approx(-0.2 + 0.8 + 0.7)


# ---------------------------------------------------------------- stage errors: one line, no traceback


def _invoke(command, tmp_path, params: dict, *args):
    import yaml
    from click.testing import CliRunner

    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return CliRunner().invoke(command, ["--params", str(path), *map(str, args)])


EVAL_PARAMS = {
    "evaluate": {
        "rounds": 2,
        "methods": {
            "untrained": {"update": "refine", "model": "policy", "weights": "models/embedded"},
            "incupdate": {"update": "incupdate", "model": "frozen", "weights": "models/embedded"},
        },
        "users": {"domains": None, "per_domain": None},
        "sampling": {"temperature": 0.0, "max_new_tokens": 8},
        "bootstrap": {"resamples": 200, "level": 0.95, "seed": 0},
        "similarity_embedder": None,
    },
    "reward": {"weights": {"prev": 1.0, "curr": 1.0, "fut": 1.0}},
    "tau_pos": 0.5,
    "tau_neg": 0.0,
}


def test_report_names_the_missing_table_and_the_stage_to_run(tmp_path):
    from stages import report

    result = _invoke(report.main, tmp_path, EVAL_PARAMS, "--eval-dir", tmp_path / "eval")
    one_line_error(result, "untrained.parquet", "dvc repro evaluate@untrained")


def test_report_refuses_a_table_with_other_rounds(tmp_path):
    from stages import report

    (tmp_path / "eval").mkdir()
    table = _hand_table()  # rounds 0..2
    for name in ("untrained", "incupdate"):
        complete = table.assign(persona="p", persona_words=1, answers=[[]] * len(table), items=10)
        complete.to_parquet(tmp_path / "eval" / f"{name}.parquet")
    params = {**EVAL_PARAMS, "evaluate": {**EVAL_PARAMS["evaluate"], "rounds": 4}}
    result = _invoke(report.main, tmp_path, params, "--eval-dir", tmp_path / "eval")
    one_line_error(result, "untrained.parquet", "rounds [0, 1, 2]", "evaluate.rounds=4")
    # with matching rounds the same tables make a report
    ok = _invoke(
        report.main,
        tmp_path,
        EVAL_PARAMS,
        "--eval-dir",
        tmp_path / "eval",
        "--metrics",
        tmp_path / "eval.json",
        "--plots-dir",
        tmp_path / "plots",
        "--case-study",
        tmp_path / "case.md",
    )
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "plots" / "mae_by_round.csv").read_text().splitlines()[0] == "method,round,mae"
    assert (tmp_path / "case.md").read_text().startswith("# Case study: user ")


@pytest.mark.parametrize(
    "edit, args, fragments",
    [
        ({"rounds": 0}, ["--method", "incupdate"], ["evaluate.rounds", "must be >= 1, got 0"]),
        ({"sampling": {"temperature": "hot"}}, ["--method", "incupdate"], ["evaluate.sampling.temperature"]),
        ({"users": {"per_domain": -1}}, ["--method", "incupdate"], ["evaluate.users.per_domain"]),
        (
            {
                "methods": {
                    "deeper": {"update": "refine", "model": "policy", "weights": "models/adapters/it2"}
                }
            },
            ["--method", "deeper", "--adapter", "no/such/adapter"],
            ["no/such/adapter", "run the training stage"],
        ),
        (
            {},
            ["--method", "deeper"],
            ["--method", "'deeper' is not one of evaluate.methods: untrained, incupdate"],
        ),
        ({}, ["--method", "incupdate", "--adapter", "."], ["--adapter", "without an adapter"]),
    ],
)
def test_evaluate_bad_settings_are_one_line_errors(tmp_path, edit, args, fragments):
    from stages import evaluate

    params = {**EVAL_PARAMS, "evaluate": {**EVAL_PARAMS["evaluate"], **edit}}
    one_line_error(_invoke(evaluate.main, tmp_path, params, *args), *fragments)


def test_pairwise_accuracy_by_hand():
    from deeper.rollout import pairwise_accuracy

    # actual 5, 3, 3, 1: pairs rated differently (0,1) (0,2) (0,3) (1,3) (2,3); (1,2) is a tie and does not count
    # predicted 4, 2, 4.5, 4.5: (0,1) right, (0,2) wrong, (0,3) wrong, (1,3) wrong, (2,3) tie -> half
    assert pairwise_accuracy([4, 2, 4.5, 4.5], [5, 3, 3, 1]) == (pytest.approx(1.5 / 5), 5)
    assert pairwise_accuracy([1, 2, 3], [1, 2, 3]) == (1.0, 3)
    assert pairwise_accuracy([3, 2, 1], [1, 2, 3]) == (0.0, 3)
    accuracy, pairs = pairwise_accuracy([1, 2], [4, 4])
    assert pairs == 0 and math.isnan(accuracy)  # no pair rated differently: NaN, counted as no pairs


def test_the_evaluate_stage_renders_the_prompt_set_params_name(tmp_path, tiny_llama, monkeypatch):
    """`prompts: published` reaches both halves of a method's rollout: the frozen model's predictions (round 0's
    errors move: the same S_0, other prompts) and the method's own updates (round 1's update chat is the
    published template's: its key is in that run's response cache, the tuned chat's is not)."""
    from deeper.llm import load_llm
    from deeper.llm.cache import ResponseStore, generate_key
    from deeper.methods import IncUpdate
    from deeper.methods.base import UpdateInput
    from deeper.prompts import PROMPT_SETS, load_prompts
    from stages import evaluate

    rows = []
    for u in range(2):
        for w in range(4):
            for p in range(3):
                rows.append(
                    {
                        "domain": "books",
                        "item_type": "book",
                        "seen": True,
                        "user_id": f"e{u}",
                        "split": "eval",
                        "window": w,
                        "pos": p,
                        "item_id": f"{w}-{p}",
                        "title": f"Book {u}-{w}-{p}",
                        "rating": float(1 + (u + w + p) % 5),
                    }
                )
    pd.DataFrame(rows).to_parquet(tmp_path / "windows.parquet", index=False)
    persona0 = "Reader 0 likes sagas."
    pd.DataFrame(
        [
            {"domain": "books", "user_id": f"e{u}", "split": "eval", "persona": f"Reader {u} likes sagas."}
            for u in range(2)
        ]
    ).to_parquet(tmp_path / "init.parquet", index=False)
    model = {"backend": "transformers", "name": str(tiny_llama), "adapter": None, "batch_size": 8}
    sampling = {"temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0, "max_new_tokens": 8, "seed": 0}
    base = {
        **EVAL_PARAMS,
        "models": {"frozen": model, "policy": model},
        "predict": {"mode": "logprob", "rating": "expected"},
        "persona": {"tokenizer": str(tiny_llama)},
        "evaluate": {**EVAL_PARAMS["evaluate"], "sampling": sampling},
    }
    tables = {}
    for name in ("tuned", "published"):
        monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / f"{name}_responses"))
        done = _invoke(
            evaluate.main,
            tmp_path,
            {**base, "prompts": name},
            "--method",
            "incupdate",
            "--windows",
            tmp_path / "windows.parquet",
            "--personas",
            tmp_path / "init.parquet",
            "--out-dir",
            tmp_path / name,
            "--runs-dir",
            tmp_path / f"{name}_runs",
        )
        assert done.exit_code == 0, done.output
        tables[name] = pd.read_parquet(tmp_path / name / "incupdate.parquet").set_index(["user_id", "round"])
    tuned, published = tables["tuned"], tables["published"]
    # eight new tokens: the tiny random model's every update answer ran into the limit, round 0 has none
    assert list(tuned["update_stopped_at_limit"]) == [0, 1, 1] * 2
    assert summarize_domain(tuned.reset_index(), rounds=2)["update_stopped_at_limit_share"] == 1.0
    assert (tuned.xs(0, level="round")["persona"] == published.xs(0, level="round")["persona"]).all()
    assert not np.allclose(tuned.xs(0, level="round")["mae"], published.xs(0, level="round")["mae"])

    llm = load_llm(model)
    user0 = [r for r in rows if r["user_id"] == "e0"]
    history = tuple(
        Window(
            titles=tuple(r["title"] for r in user0 if r["window"] == w),
            ratings=tuple(r["rating"] for r in user0 if r["window"] == w),
        )
        for w in (0, 1)
    )
    item = UpdateInput("book", persona0, history, (3.0, 3.0, 3.0))
    keys = {
        name: generate_key(
            llm,
            IncUpdate(None, Sampling(), load_prompts(PROMPT_SETS[name])).chat(item),
            Sampling(**sampling),
            0,
        )
        for name in ("tuned", "published")
    }
    store = ResponseStore(tmp_path / "published_responses")
    assert set(store.get_many(list(keys.values()))) == {keys["published"]}

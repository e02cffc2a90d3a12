"""Rating prediction: MAE, lenient JSON answers, and both modes on a real (tiny) transformers backend."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from deeper.errors import ConfigError
from deeper.predict import (
    FALLBACK_RATING,
    PredictSettings,
    PredictStats,
    WindowRequest,
    mae,
    normalise_name,
    parse_json_ratings,
    predict_windows,
)

TITLES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    "Four Rooms (1995)",
    "Get Shorty (1995)",
    "Copycat (1995)",
    "Twelve Monkeys (1995)",
    "Babe (1995)",
    "Dead Man Walking (1995)",
    "Richard III (1995)",
    "Seven (Se7en) (1995)",
]
ACTUAL = [5, 3, 4, 3, 3, 5, 4, 1, 5, 3]
PERSONA = (
    "A thoughtful film lover in their forties who prizes strong scripts and memorable characters. They enjoy "
    "animation with heart and clever crime stories, and have little patience for loud, formulaic action."
)


def answer(pairs, fenced=True, after=""):
    body = json.dumps([{"item_name": t, "predict_rating": r} for t, r in pairs], indent=1)
    return (f"Here are my ratings:\n```json\n{body}\n```" if fenced else body) + after


# ---------------------------------------------------------------- mae


def test_mae_is_the_mean_absolute_error():
    assert mae([1, 2, 3], [2, 2, 5]) == pytest.approx(1.0)
    assert mae(np.array([4.5]), [4.5]) == 0.0
    for bad in (([], []), ([1, 2], [1]), ([[1]], [[1]]), ([np.nan], [1]), ([1], [np.inf])):
        with pytest.raises(ValueError):
            mae(*bad)


# ---------------------------------------------------------------- lenient JSON answers


def test_a_clean_fenced_answer_parses_completely():
    parsed = parse_json_ratings(answer(zip(TITLES, ACTUAL), after="\nHope this helps!"), TITLES)
    assert parsed.ratings == [float(r) for r in ACTUAL]
    assert parsed.entries == 10 and parsed.invalid_entries == 0


def test_names_match_by_normalised_title_in_any_order():
    reordered = list(zip(TITLES, ACTUAL))[::-1]
    mangled = [(t.upper().replace("(", "").replace(")", "") + " ", r) for t, r in reordered]
    parsed = parse_json_ratings(answer(mangled, fenced=False), TITLES)
    assert parsed.ratings == [float(r) for r in ACTUAL]
    # a truncated title (year dropped) matches by containment
    parsed = parse_json_ratings(answer([("Twelve Monkeys", 2), ("Babe", 5)]), TITLES)
    assert parsed.ratings[5] == 2.0 and parsed.ratings[6] == 5.0 and parsed.ratings.count(None) == 8
    assert normalise_name('  "Amélie" (2001)!') == normalise_name("amélie 2001")


def test_a_partial_answer_leaves_the_missing_items_unrated():
    parsed = parse_json_ratings(answer(list(zip(TITLES, ACTUAL))[:7]), TITLES)
    assert parsed.ratings[:7] == [float(r) for r in ACTUAL[:7]]
    assert parsed.ratings[7:] == [None, None, None]


def test_unknown_names_fall_back_to_position_only_when_the_counts_agree():
    garbled = [(f"movie number {i}", r) for i, r in enumerate(ACTUAL)]
    assert parse_json_ratings(answer(garbled), TITLES).ratings == [float(r) for r in ACTUAL]
    assert parse_json_ratings(answer(garbled[:9]), TITLES).ratings == [None] * 10


def test_invalid_ratings_are_counted_and_not_used():
    pairs = [
        (TITLES[0], 7),
        (TITLES[1], 0),
        (TITLES[2], "four"),
        (TITLES[3], None),
        (TITLES[4], "4"),
        (TITLES[5], "3/5"),
        (TITLES[6], 4.5),
        (TITLES[7], True),
    ]
    parsed = parse_json_ratings(answer(pairs), TITLES)
    assert parsed.ratings == [None, None, None, None, 4.0, 3.0, 4.5, None, None, None]
    assert parsed.invalid_entries == 5


def test_broken_json_is_read_object_by_object():
    text = (
        "Sure! [ {'item_name': 'Toy Story (1995)', 'predict_rating': 5}\n"
        '{"item_name": "GoldenEye (1995)", "predict_rating": "2"},,\n'
        '{"item_name": "Four Rooms \\"1995\\"", predict_rating: 3},\n'
        '{"item_name": "Get Shorty (1995)", "predict_rat'  # cut off by max_new_tokens
    )
    parsed = parse_json_ratings(text, TITLES)
    assert parsed.ratings[:4] == [5.0, 2.0, 3.0, None]
    assert parsed.entries == 3


def test_answers_without_any_rating_are_unparsed():
    for text in (
        "",
        "I would rate these movies highly.",
        "```json\n[]\n```",
        "[1, 2, 3]",
        "{not json at all",
    ):
        parsed = parse_json_ratings(text, TITLES)
        assert parsed.entries == 0 and parsed.ratings == [None] * 10, text


def test_repeated_titles_fill_in_order_and_wrapped_lists_are_found():
    titles = ["Socks", "Hat", "Socks"]
    text = json.dumps(
        {
            "ratings": [
                {"item_name": "Socks", "predict_rating": 2},
                {"item_name": "socks", "predict_rating": 4},
            ]
        }
    )
    assert parse_json_ratings(text, titles).ratings == [2.0, None, 4.0]


def test_hostile_titles_in_the_answer_still_match():
    titles = ['He said "no"', "{{persona}}", "Line\nbreak"]
    text = answer([(titles[2].replace("\n", " "), 1), (titles[0], 2), (titles[1], 3)])
    assert parse_json_ratings(text, titles).ratings == [2.0, 3.0, 1.0]


# ---------------------------------------------------------------- settings


def test_stats_add_sums_every_count_and_refuses_another_mode():
    counts = [
        f.name for f in dataclasses.fields(PredictStats) if f.name not in ("mode", "first_failed_answer")
    ]
    a = PredictStats("json", **{name: i + 1 for i, name in enumerate(counts)})
    a.add(
        PredictStats("json", **{name: 10 * (i + 1) for i, name in enumerate(counts)}, first_failed_answer="b")
    )
    assert {name: getattr(a, name) for name in counts} == {
        name: 11 * (i + 1) for i, name in enumerate(counts)
    }
    assert a.mode == "json" and a.first_failed_answer == "b"  # the first one seen is kept, not summed
    a.add(PredictStats("json", first_failed_answer="c"))
    assert a.first_failed_answer == "b"
    with pytest.raises(ValueError, match="logprob"):
        a.add(PredictStats("logprob", windows=1))


def test_settings_from_params():
    s = PredictSettings.from_params(
        {"predict": {"mode": "json", "rating": "argmax", "json": {"max_new_tokens": 99}}}
    )
    assert (s.mode, s.rating, s.json_sampling.max_new_tokens, s.json_sampling.temperature) == (
        "json",
        "argmax",
        99,
        0.0,
    )
    assert PredictSettings.from_params({}) == PredictSettings()
    with pytest.raises(ConfigError, match="predict.mode"):
        PredictSettings.from_params({"predict": {"mode": "vibes"}})
    with pytest.raises(ConfigError, match="predict.rating"):
        PredictSettings.from_params({"predict": {"rating": "mean"}})
    with pytest.raises(ConfigError, match="predict.json.max_tokens: unknown key"):
        PredictSettings.from_params({"predict": {"json": {"max_tokens": 5}}})
    with pytest.raises(ConfigError, match="predict.windows_per_call"):
        PredictSettings.from_params({"predict": {"windows_per_call": 0}})


# ---------------------------------------------------------------- both modes on a real backend


@pytest.fixture(scope="module")
def frozen(tiny_llama, tmp_path_factory):
    """The real transformers backend on the tiny model, behind the response cache (as the stages use it)."""
    from deeper.llm import load_llm
    from deeper.llm.cache import CachedLLM

    return CachedLLM(
        load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 8}),
        tmp_path_factory.mktemp("cache"),
    )


def requests_():
    return [
        WindowRequest(PERSONA, "movie", TITLES, ACTUAL),
        WindowRequest("Loves {{items}} <|im_start|>", "movie", ['"Quoted"\ttitle', "{x}"], [1, 5]),
        WindowRequest(PERSONA, "book", ["Dune"]),  # no actual ratings: no MAE
    ]


def test_logprob_mode_gives_ratings_in_range_and_the_rule_switch(frozen):
    expected, stats = predict_windows(
        frozen, requests_(), PredictSettings(rating="expected", windows_per_call=2)
    )
    argmax, _ = predict_windows(frozen, requests_(), PredictSettings(rating="argmax"))
    assert [len(p.ratings) for p in expected] == [10, 2, 1]
    for e, a, req in zip(expected, argmax, requests_()):
        assert np.all((e.ratings >= 1) & (e.ratings <= 5)) and np.isfinite(e.ratings).all()
        assert np.allclose(e.probs.sum(axis=1), 1.0)
        assert np.allclose(e.ratings, e.probs @ np.arange(1, 6))
        assert np.array_equal(a.ratings, e.probs.argmax(axis=1) + 1.0)  # same probabilities, other rule
        assert set(a.ratings) <= {1.0, 2.0, 3.0, 4.0, 5.0}
        assert np.all((e.digit_mass > 0) & (e.digit_mass <= 1))
        assert not e.failed.any()
        if req.actual is None:
            assert e.mae is None
        else:
            assert e.mae == pytest.approx(np.abs(e.ratings - np.asarray(req.actual)).mean())
    m = stats.to_metrics()
    assert (m["mode"], m["windows"], m["items"], m["backend_failed_items"]) == ("logprob", 3, 13, 0)
    assert 0 < m["digit_mass_mean"] <= 1
    # the prediction of one window does not depend on the others in the batch
    alone, _ = predict_windows(frozen, requests_()[1:2], PredictSettings())
    assert np.allclose(alone[0].ratings, expected[1].ratings, atol=1e-5)


def test_json_mode_counts_every_unparsable_item_and_never_gives_nan(frozen):
    """The tiny random model writes no JSON: every item falls back to the midpoint and is counted."""
    settings = PredictSettings.from_params(
        {"predict": {"mode": "json", "json": {"max_new_tokens": 12, "max_parse_failed_share": 1.0}}}
    )
    preds, stats = predict_windows(frozen, requests_(), settings)
    for p, req in zip(preds, requests_()):
        assert isinstance(p.answer, str)
        assert np.isfinite(p.ratings).all() and np.all((p.ratings >= 1) & (p.ratings <= 5))
        assert np.array_equal(p.ratings[p.failed], np.full(p.failed.sum(), FALLBACK_RATING))
    m = stats.to_metrics()
    assert m["items"] == 13 and m["parse_failed_items"] == sum(int(p.failed.sum()) for p in preds)
    assert m["parse_failed_items"] == 13 and m["unparsed_windows"] == 3  # no JSON in random tokens
    assert m["fallback_rating"] == 3.0 and m["parse_failed_share"] == 1.0


def test_empty_windows_and_mismatched_ratings_are_refused(frozen):
    with pytest.raises(ValueError, match="no items"):
        predict_windows(frozen, [WindowRequest(PERSONA, "movie", [])])
    with pytest.raises(ValueError, match="2 titles but 1 actual"):
        predict_windows(frozen, [WindowRequest(PERSONA, "movie", ["a", "b"], [3])])


def test_json_mode_retries_a_failed_parse_once_with_the_next_seed(monkeypatch):
    """Through the openai backend and a local server: the window whose answer (seed 0) leaves items unrated
    is asked once more with seed 1 and the better answer is kept; a window parsed at once is not asked again;
    a retry that is no better keeps the first answer."""
    import re

    from deeper.llm import load_llm
    from tests.openai_fake_server import FakeOpenAIServer

    def reply(messages, seed):
        text = messages[-1]["content"]
        titles = re.findall(r'^\d+\. "(.*)"$', text, flags=re.MULTILINE)
        if "Dune" in titles or (seed == 0 and "Fargo" in titles):  # Dune never parses; Fargo only at seed 1
            return "I would rather not say."
        if "Zodiac" in titles:  # seed 0 rates one of two, seed 1 none: the first answer stays
            return answer([(titles[0], 2)]) if seed == 0 else "No."
        return answer(
            [(t, 4) for t in titles[:-1]] if seed == 0 and "Heat" in titles else [(t, 4) for t in titles]
        )

    monkeypatch.setenv("DEEPER_TEST_KEY", "k")
    requests = [
        WindowRequest(PERSONA, "movie", ["Fargo", "Alien"], [5, 1]),
        WindowRequest(PERSONA, "movie", ["Brazil", "Alien"], [5, 1]),
        WindowRequest(PERSONA, "book", ["Dune"], [2]),
        WindowRequest(PERSONA, "movie", ["Alien", "Heat"], [5, 1]),
        WindowRequest(PERSONA, "movie", ["Alien", "Zodiac"], [5, 1]),
    ]
    settings = PredictSettings.from_params(
        {"predict": {"mode": "json", "json": {"seed": 0, "max_parse_failed_share": 0.25}}}
    )
    with FakeOpenAIServer(reply=reply, reply_sees_seed=True) as server:
        llm = load_llm(
            {
                "backend": "openai",
                "name": "m",
                "base_url": server.base_url,
                "api_key_env": "DEEPER_TEST_KEY",
                "prefill": "none",
            }
        )
        preds, stats = predict_windows(llm, requests, settings)
    seeds = sorted(
        (json.dumps(r["body"]["messages"]).count("Dune"), r["body"]["seed"]) for r in server.requests
    )
    assert len(server.requests) == 5 + 4 and [s for _, s in seeds].count(1) == 4  # all but Brazil again
    assert preds[0].ratings.tolist() == [4, 4] and not preds[0].failed.any()  # seed 1 answered
    assert preds[1].ratings.tolist() == [4, 4]
    assert (
        preds[2].failed.all() and preds[2].answer == "I would rather not say."
    )  # failed twice: a 3, counted
    assert preds[3].ratings.tolist() == [4, 4] and not preds[3].failed.any()  # seed 1 rated both, seed 0 one
    m = stats.to_metrics()
    assert preds[4].ratings.tolist() == [2, FALLBACK_RATING] and preds[4].failed.tolist() == [False, True]
    assert (m["retried_windows"], m["parse_failed_items"], m["items"]) == (4, 2, 9)


def test_json_mode_counts_answers_cut_at_the_token_limit(monkeypatch):
    """An answer that runs into predict.json.max_new_tokens (the server says finish_reason "length") is counted
    in the stats, whether or not its ratings parsed; one that ends in time is not."""
    from deeper.llm import load_llm
    from tests.openai_fake_server import FakeOpenAIServer

    body = answer([("Alien", 4)], fenced=False)
    limit = len(body.split(" ")) + 5  # the fake server counts a word as a token

    def reply(messages):
        return body + (" and so on" * 30 if '"Heat"' in messages[-1]["content"] else "")

    monkeypatch.setenv("DEEPER_TEST_KEY", "k")
    settings = PredictSettings.from_params(
        {"predict": {"mode": "json", "json": {"seed": 0, "max_new_tokens": limit}}}
    )
    requests = [
        WindowRequest(PERSONA, "movie", ["Alien"], [4]),
        WindowRequest(PERSONA, "movie", ["Heat"], [4]),
    ]
    with FakeOpenAIServer(reply=reply) as server:
        llm = load_llm(
            {
                "backend": "openai",
                "name": "m",
                "base_url": server.base_url,
                "api_key_env": "DEEPER_TEST_KEY",
                "prefill": "none",
            }
        )
        preds, stats = predict_windows(llm, requests, settings)
    assert [p.answer.stopped_at_limit for p in preds] == [False, True]
    m = stats.to_metrics()
    assert (m["stopped_at_limit_windows"], m["stopped_at_limit_share"], m["retried_windows"]) == (1, 0.5, 0)


def test_json_mode_stops_with_one_line_past_the_parse_failure_limit(frozen):
    """A model that cannot write JSON (the tiny random model) stops the prediction after the retry, naming the
    model, the share and the first bad answer, instead of predicting 3 for every item; at the limit it goes on."""
    from deeper.errors import DeeperError

    settings = PredictSettings.from_params({"predict": {"mode": "json", "json": {"max_new_tokens": 12}}})
    assert settings.max_parse_failed_share == 0.05  # the default
    with pytest.raises(DeeperError) as caught:
        predict_windows(frozen, requests_(), settings)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("predict.json: transformers model ")
    assert "left 13 of 13 items (100%) without a valid rating after the retry" in message
    assert "more than predict.json.max_parse_failed_share 0.05; first such answer: '" in message
    exactly = PredictSettings.from_params(
        {"predict": {"mode": "json", "json": {"max_new_tokens": 12, "max_parse_failed_share": 1.0}}}
    )
    predict_windows(frozen, requests_(), exactly)  # 13 of 13 is not more than 1.0


def test_the_parse_failure_limit_is_checked_after_every_call_and_counts_all_calls_so_far(monkeypatch):
    """Through the openai backend and a local server: 1 failed item of 4 per call (25%) passes a limit of 0.25
    call after call; a limit of 0.2 stops after the first call, before the second is paid for."""
    import re

    from deeper.errors import ConfigError, DeeperError
    from deeper.llm import load_llm
    from tests.openai_fake_server import FakeOpenAIServer

    def reply(messages):
        titles = re.findall(r'^\d+\. "(.*)"$', messages[-1]["content"], flags=re.MULTILINE)
        return "No idea." if titles == ["Dune"] else answer([(t, 4) for t in titles])

    monkeypatch.setenv("DEEPER_TEST_KEY", "k")
    requests = [
        WindowRequest(PERSONA, "movie", ["Alien", "Heat", "Fargo"], [4, 4, 4]),
        WindowRequest(PERSONA, "book", ["Dune"], [2]),
    ] * 2
    for limit, calls in ((0.25, 2 * 3), (0.2, 3)):  # a call: 2 windows, the failed one asked again
        settings = PredictSettings.from_params(
            {"predict": {"mode": "json", "windows_per_call": 2, "json": {"max_parse_failed_share": limit}}}
        )
        with FakeOpenAIServer(reply=reply) as server:
            llm = load_llm(
                {
                    "backend": "openai",
                    "name": "m",
                    "base_url": server.base_url,
                    "api_key_env": "DEEPER_TEST_KEY",
                    "prefill": "none",
                }
            )
            if limit == 0.25:
                _, stats = predict_windows(llm, requests, settings)
                assert stats.to_metrics()["parse_failed_share"] == 0.25
            else:
                with pytest.raises(
                    DeeperError, match="openai model m left 1 of 4 items \\(25%\\).*'No idea.'"
                ):
                    predict_windows(llm, requests, settings)
        assert len(server.requests) == calls
    with pytest.raises(ConfigError, match="predict.json.max_parse_failed_share"):
        PredictSettings.from_params({"predict": {"mode": "json", "json": {"max_parse_failed_share": 1.5}}})

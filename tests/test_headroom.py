"""Persona headroom (deeper/headroom.py, stage headroom): the shuffle, the paired intervals, every condition's
persona and error checked against an independent computation with a real (tiny) model, the stage's files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from deeper.bootstrap import BootstrapSettings, paired_means
from deeper.headroom import CONDITIONS, HeadroomSettings, measure, shuffled_donors
from deeper.methods.base import Window
from deeper.personas import PersonaSettings, generate_personas
from deeper.predict import PredictSettings, WindowRequest, predict_windows
from deeper.prompts import load_prompts
from deeper.rollout import EvalUser
from tests.conftest import one_line_error

TITLES = ["Toy Story (1995)", "Fargo (1996)", 'Say "Anything..." {1989}', "Star Wars (1977)", "Heat (1995)"]


def make_users(layout: dict[str, int], n_windows: int = 3) -> list[EvalUser]:
    """Users per domain, each with n_windows windows of three items and a distinct S_0."""
    users = []
    for domain, count in layout.items():
        for k in range(count):
            u = len(users)
            windows = tuple(
                Window(
                    titles=tuple(TITLES[(u + w + p) % 5] for p in range(3)),
                    ratings=tuple(float(1 + (u + 2 * w + p) % 5) for p in range(3)),
                )
                for w in range(n_windows)
            )
            users.append(
                EvalUser(domain, f"{domain}-{k}", "movie", True, windows, f"S0 of user {u}: likes dramas.")
            )
    return users


# ---------------------------------------------------------------- the shuffle


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_every_user_gets_another_users_persona_from_its_own_domain(seed):
    users = make_users({"books": 5, "movies": 2, "food": 3})
    donors, across = shuffled_donors(users, seed)
    assert across == 0
    assert sorted(donors) == list(range(len(users)))  # a permutation: every S_0 is used once
    for i, d in enumerate(donors):
        assert d != i and users[d].domain == users[i].domain
    assert shuffled_donors(users, seed) == (donors, 0)  # seeded


def test_a_domain_with_one_user_borrows_from_another_domain_and_is_counted():
    users = make_users({"books": 3, "solo": 1})
    donors, across = shuffled_donors(users, 0)
    assert across == 1
    assert donors[3] != 3 and users[donors[3]].domain == "books"
    assert all(users[donors[i]].domain == "books" and donors[i] != i for i in range(3))


def test_the_shuffle_needs_two_users():
    with pytest.raises(Exception, match="at least two evaluation users"):
        shuffled_donors(make_users({"solo": 1}), 0)


# ---------------------------------------------------------------- paired intervals


def test_paired_contrast_of_a_constant_shift_is_exact_and_means_average_domains():
    rng = np.random.default_rng(0)
    own = rng.uniform(0.5, 1.5, size=8)
    domains = ["a"] * 6 + ["b"] * 2
    values = {"own": own, "shifted": own + 0.25, "other": rng.uniform(0.5, 1.5, size=8)}
    out = paired_means(
        values,
        domains,
        BootstrapSettings(resamples=500, seed=3),
        {"shift": ("shifted", "own"), "diff": ("other", "own")},
    )
    # one draw of users serves every condition: a constant shift has no spread at all
    shift = out["contrasts"]["shift"]
    assert shift["estimate"] == pytest.approx(0.25) and shift["low"] == pytest.approx(0.25)
    assert shift["high"] == pytest.approx(0.25)
    # each domain weighs the same: (mean of a + mean of b) / 2, not the mean over users
    expected = (own[:6].mean() + own[6:].mean()) / 2
    assert out["means"]["own"]["estimate"] == pytest.approx(expected)
    assert out["means"]["own"]["low"] < expected < out["means"]["own"]["high"]
    diff = out["contrasts"]["diff"]
    assert diff["estimate"] == pytest.approx(out["means"]["other"]["estimate"] - expected)
    assert diff["low"] < diff["estimate"] < diff["high"]


def test_paired_means_refuses_values_that_are_not_one_per_user():
    with pytest.raises(Exception, match="one finite value per user"):
        paired_means({"own": [1.0, np.nan]}, ["a", "a"], BootstrapSettings(resamples=100))
    with pytest.raises(Exception, match="one finite value per user"):
        paired_means({"own": [1.0]}, ["a", "a"], BootstrapSettings(resamples=100))


# ---------------------------------------------------------------- the measurement, with a real model

PERSONA = PersonaSettings.from_params(
    {
        "persona": {
            "max_new_tokens": 12,
            "temperature": 0.7,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "seed": 0,
            "retries": 0,
            "min_words": 1,
            "tokenizer": "unused",
        }
    }
)


@pytest.fixture(scope="module")
def frozen(tiny_llama):
    from deeper.llm import load_llm

    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 8})


def test_each_condition_predicts_the_window_with_its_own_persona(frozen):
    users = make_users({"books": 3, "movies": 2}, n_windows=4)
    prompts, predict = load_prompts(), PredictSettings()
    settings = HeadroomSettings(window=2, seed=5)
    result = measure(users, frozen, prompts, PERSONA, predict, settings, BootstrapSettings(resamples=200))
    table = result.table
    assert list(table["condition"]) == [c for c in CONDITIONS for _ in users]
    by = {c: table[table["condition"] == c].reset_index(drop=True) for c in CONDITIONS}

    # the personas each condition was given, computed independently
    donors, _ = shuffled_donors(users, 5)

    def init_chat(u, windows):
        return prompts.render(
            "init", item_type="movie", ratings=[(t, r) for w in windows for t, r in zip(w.titles, w.ratings)]
        )

    written = generate_personas(
        frozen,
        [init_chat(u, [u.windows[2]]) for u in users] + [init_chat(u, u.windows) for u in users],
        PERSONA,
    )
    assert list(by["none"]["persona"]) == [""] * len(users)
    assert list(by["own"]["persona"]) == [u.persona0 for u in users]
    assert list(by["shuffled"]["persona"]) == [users[d].persona0 for d in donors]
    assert list(by["oracle"]["persona"]) == written.personas[: len(users)]
    assert list(by["oracle_all"]["persona"]) == written.personas[len(users) :]

    # every error is the frozen model's on W_2 (not W_1) with that persona
    for condition, rows in by.items():
        requests = [
            WindowRequest(p, "movie", u.windows[2].titles, u.windows[2].ratings)
            for p, u in zip(rows["persona"], users)
        ]
        preds, _ = predict_windows(frozen, requests, predict, prompts)
        assert list(rows["mae"]) == pytest.approx([p.mae for p in preds]), condition
        assert list(rows["spread"]) == pytest.approx([float(np.std(p.ratings)) for p in preds])
        assert [list(a) for a in rows["actual"]] == [list(u.windows[2].ratings) for u in users]

    summary = result.summary
    assert summary["window"] == 2 and summary["users"] == 5 and summary["domains"] == ["books", "movies"]

    def domain_mean(condition):
        frame = by[condition].assign(domain=[u.domain for u in users])
        return frame.groupby("domain")["mae"].mean().mean()

    for condition in CONDITIONS:
        assert summary["conditions"][condition]["mae"]["estimate"] == pytest.approx(domain_mean(condition))
    assert summary["sensitivity"]["estimate"] == pytest.approx(domain_mean("shuffled") - domain_mean("own"))
    assert summary["headroom"]["estimate"] == pytest.approx(domain_mean("own") - domain_mean("oracle"))
    assert summary["headroom_all"]["estimate"] == pytest.approx(
        domain_mean("own") - domain_mean("oracle_all")
    )
    for name in ("sensitivity", "headroom", "headroom_all"):
        assert summary[name]["low"] <= summary[name]["estimate"] <= summary[name]["high"]


def test_the_window_must_exist():
    with pytest.raises(Exception, match="headroom.window: W_6 does not exist"):
        HeadroomSettings.from_params({"headroom": {"window": 6}, "window": {"count": 6}})
    with pytest.raises(Exception, match="headroom.window"):
        HeadroomSettings.from_params({"headroom": {"window": 0}})
    with pytest.raises(Exception, match="headroom.windows: unknown key"):
        HeadroomSettings.from_params({"headroom": {"window": 1, "windows": 2}})
    assert HeadroomSettings.from_params({"headroom": {"window": 5}, "window": {"count": 6}}).window == 5


# ---------------------------------------------------------------- the stage


def windows_frame(users: list[EvalUser]) -> pd.DataFrame:
    rows = []
    for u in users:
        for w, window in enumerate(u.windows):
            for p, (title, rating) in enumerate(zip(window.titles, window.ratings)):
                rows.append(
                    {
                        "domain": u.domain,
                        "item_type": "movie",
                        "seen": True,
                        "user_id": u.user_id,
                        "split": "eval",
                        "window": w,
                        "pos": p,
                        "item_id": f"{p}",
                        "title": title,
                        "rating": rating,
                    }
                )
    return pd.DataFrame(rows)


def test_the_stage_writes_table_metrics_and_plot(tmp_path, tiny_llama, monkeypatch):
    from stages.headroom import main

    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "cache"))
    users = make_users({"books": 3}, n_windows=3)
    windows, personas = tmp_path / "windows.parquet", tmp_path / "init.parquet"
    windows_frame(users).to_parquet(windows, index=False)
    pd.DataFrame(
        {
            "domain": [u.domain for u in users],
            "user_id": [u.user_id for u in users],
            "split": "eval",
            "persona": [u.persona0 for u in users],
        }
    ).to_parquet(personas, index=False)
    spec = {"backend": "transformers", "name": str(tiny_llama), "adapter": None, "batch_size": 8}
    params = {
        "models": {"frozen": spec},
        "headroom": {"window": 1, "seed": 0},
        "persona": {
            "max_new_tokens": 8,
            "temperature": 0.7,
            "top_p": 0.9,
            "repetition_penalty": 1.1,
            "seed": 0,
            "retries": 0,
            "min_words": 1,
            "tokenizer": str(tiny_llama),
        },
        "predict": {"mode": "logprob"},
        "prompts": "tuned",
        "evaluate": {
            "rounds": 1,
            "methods": {"untrained": {"update": "refine", "model": "frozen", "weights": "models/embedded"}},
            "sampling": {"temperature": 0.0, "max_new_tokens": 8},
            "bootstrap": {"resamples": 200, "level": 0.9, "seed": 0},
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out, metrics, plot = tmp_path / "h" / "users.parquet", tmp_path / "h.json", tmp_path / "p" / "h.csv"
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--windows",
        str(windows),
        "--personas",
        str(personas),
        "--out",
        str(out),
        "--metrics",
        str(metrics),
        "--plot",
        str(plot),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "sensitivity" in result.output and "frozen: {" in result.output
    table = pd.read_parquet(out)
    assert len(table) == 3 * len(CONDITIONS)
    summary = json.loads(metrics.read_text())
    assert set(summary["conditions"]) == set(CONDITIONS)
    assert summary["bootstrap"] == {"level": 0.9, "resamples": 200, "seed": 0}
    assert summary["frozen"] == str(tiny_llama) and summary["users"] == 3
    lines = plot.read_text().splitlines()
    assert lines[0] == "condition,mae,low,high" and [line.split(",")[0] for line in lines[1:]] == list(
        CONDITIONS
    )
    first = metrics.read_bytes(), plot.read_bytes()
    again = CliRunner().invoke(main, args)  # from the response cache: the same metrics and plot bytes (the
    assert again.exit_code == 0, (
        again.output
    )  # cache keeps rating probabilities to ~1e-8, as for every stage)
    assert "cache_misses': 0" in again.output
    assert (metrics.read_bytes(), plot.read_bytes()) == first
    assert list(pd.read_parquet(out)["mae"]) == pytest.approx(list(table["mae"]), abs=1e-6)

    params["headroom"]["window"] = 3  # users have W_0 .. W_2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    one_line_error(CliRunner().invoke(main, args), "headroom.window", "W_3 does not exist", "W_0 .. W_2")

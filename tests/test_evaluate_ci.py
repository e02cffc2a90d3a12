"""The evaluation end to end on real data: the DEEPER authors' windows of two domains (../shared/data/deeper),
ingested and windowed by the real library, S_0 by the init_personas stage, then every evaluate@<method>
stage and the report, with the tiny random Llama as frozen and policy model (deeper and deeper_it1 run with a
freshly initialised LoRA adapter, so the adapter path runs). Checks the shape of metrics/eval.json."""

from __future__ import annotations

import csv
import json
import math

import pyarrow.parquet as pq
import pytest
import yaml
from click.testing import CliRunner

from deeper.config import load_params
from deeper.data.ingest import ingest, sources_from_params
from deeper.data.window import DomainSplit, WindowSpec, make_windows
from deeper.methods import methods_from_params
from tests.conftest import REPO
from tests.tiny import make_tiny_bert

DOMAINS = {
    "amazon_clothing_shoes_and_jewelry": True,
    "food_com": False,
}  # domain -> seen (food_com as unseen)
USERS_PER_DOMAIN = 3
ROUNDS = 2
# every method of the repository's params, as its one list says (evaluate.methods)
METHOD_PARAMS = load_params(REPO / "params.yaml")["evaluate"]["methods"]
METHODS = methods_from_params(METHOD_PARAMS)


def _adapter(base, out):
    """A LoRA adapter with random (not zero) weights on the tiny model: its outputs differ from the base's."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    )
    peft_model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, shared_data, tiny_llama):
    authors = shared_data / "deeper"
    if not all((authors / d / "split_data").is_dir() for d in DOMAINS):
        pytest.skip(f"the DEEPER authors' windows of {sorted(DOMAINS)} are absent under {authors}")
    tmp = tmp_path_factory.mktemp("evaluate_ci")
    root = tmp / "raw" / "deeper"
    root.mkdir(parents=True)
    for domain in DOMAINS:  # two domains only: links, never copies
        (root / domain).symlink_to(authors / domain, target_is_directory=True)

    sources = sources_from_params(
        str(tmp / "raw"),
        "deeper_authors",
        {"deeper_authors": [{"format": "deeper_windows", "path": "deeper"}]},
    )
    ingest(sources, tmp / "ratings.duckdb")
    split = {
        d: {"train_users": 0, "eval_users": USERS_PER_DOMAIN, "seen": seen} for d, seen in DOMAINS.items()
    }
    make_windows(
        tmp / "ratings.duckdb",
        tmp / "windows.parquet",
        WindowSpec(size=10, count=ROUNDS + 2, train_count=ROUNDS + 2, seed=0),
        DomainSplit(train_users=0, eval_users=USERS_PER_DOMAIN, seen=True),
        split,
    )

    model = {"backend": "transformers", "name": str(tiny_llama), "adapter": None, "batch_size": 16}
    params = {
        "tau_pos": 0.5,
        "tau_neg": 0.0,
        "models": {"frozen": model, "policy": model},
        # sampled, not greedy: the random model answers greedily with line breaks only (an empty persona)
        "persona": {
            "temperature": 1.0,
            "top_p": 1.0,
            "max_new_tokens": 16,
            "retries": 0,
            "min_words": 0,
            "seed": 0,
            "tokenizer": str(tiny_llama),
        },
        "predict": {"mode": "logprob", "rating": "expected"},
        "reward": {"weights": {"prev": 1.0, "curr": 1.0, "fut": 1.0}},
        "evaluate": {
            "rounds": ROUNDS,
            "methods": METHOD_PARAMS,
            "users": {"domains": None, "per_domain": USERS_PER_DOMAIN},
            "sampling": {
                "temperature": 1.0,
                "top_p": 1.0,
                "repetition_penalty": 1.0,
                "max_new_tokens": 12,
                "seed": 0,
            },
            "bootstrap": {"resamples": 200, "level": 0.95, "seed": 0},
            "similarity_embedder": str(make_tiny_bert(tmp / "tiny-bert")),
        },
    }
    params_path = tmp / "params.yaml"
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))  # the methods keep their order

    from stages import evaluate, init_personas, report

    runner = CliRunner()

    def invoke(command, *args):
        result = runner.invoke(command, ["--params", str(params_path), *map(str, args)])
        assert result.exit_code == 0, result.output
        return result

    invoke(
        init_personas.main,
        "--windows",
        tmp / "windows.parquet",
        "--out",
        tmp / "init.parquet",
        "--metrics",
        tmp / "personas.json",
    )
    adapters = {
        "deeper": _adapter(tiny_llama, tmp / "adapters" / "it2"),
        "deeper_it1": _adapter(tiny_llama, tmp / "adapters" / "it1"),
    }
    for method in METHODS:
        extra = ["--adapter", adapters[method]] if method in adapters else []
        invoke(
            evaluate.main,
            "--method",
            method,
            "--windows",
            tmp / "windows.parquet",
            "--personas",
            tmp / "init.parquet",
            "--out-dir",
            tmp / "eval",
            "--runs-dir",
            tmp / "eval_runs",
            *extra,
        )
    invoke(
        report.main,
        "--eval-dir",
        tmp / "eval",
        "--metrics",
        tmp / "metrics" / "eval.json",
        "--plots-dir",
        tmp / "plots",
        "--case-study",
        tmp / "reports" / "case_study.md",
    )
    return tmp


def test_every_method_writes_one_row_per_user_and_round(pipeline):
    for method in METHODS:
        table = pq.read_table(pipeline / "eval" / f"{method}.parquet").to_pandas()
        assert len(table) == len(DOMAINS) * USERS_PER_DOMAIN * (ROUNDS + 1), method
        assert sorted(table["domain"].unique()) == sorted(DOMAINS)
        assert table["mae"].between(0, 4.5).all() and table["persona_tokens"].ge(0).all()
        first = table[table["round"] <= 1]
        assert first[["mae_w0", "mae_w1", "mae_w2"]].notna().all().all()
        summary = json.loads((pipeline / "eval_runs" / f"{method}.json").read_text())
        assert summary["users"] == len(DOMAINS) * USERS_PER_DOMAIN and summary["rounds"] == ROUNDS
        assert summary["predict"]["items"] > 0
    # same S_0 and frozen model: every method's round-0 error is the same
    r0 = {
        m: pq.read_table(pipeline / "eval" / f"{m}.parquet").to_pandas().query("round == 0")["mae"].tolist()
        for m in METHODS
    }
    assert all(v == pytest.approx(r0["incupdate"]) for v in r0.values())


def test_the_adapter_changes_the_refiner(pipeline):
    untrained = json.loads((pipeline / "eval_runs" / "untrained.json").read_text())
    assert "updater" not in untrained["calls"]  # policy == frozen model and no adapter: loaded once
    for method in ("deeper_it1", "deeper"):
        summary = json.loads((pipeline / "eval_runs" / f"{method}.json").read_text())
        assert summary["adapter"].endswith(("it1", "it2"))
        # Round 1 sends the untrained refiner's exact prompts (same S_0, same predictions); the adapter is part
        # of the model fingerprint, so none of its cached answers are reused: one miss per user and round.
        assert summary["calls"]["updater"]["cache_misses"] == len(DOMAINS) * USERS_PER_DOMAIN * ROUNDS
        personas = (
            pq.read_table(pipeline / "eval" / f"{method}.parquet").to_pandas().query("round == 1")["persona"]
        )
        base = (
            pq.read_table(pipeline / "eval" / "untrained.parquet").to_pandas().query("round == 1")["persona"]
        )
        assert personas.tolist() != base.tolist()


def test_metrics_json_has_the_documented_shape(pipeline):
    metrics = json.loads((pipeline / "metrics" / "eval.json").read_text())
    assert set(metrics) == {"rounds", "methods", "first_update_reward", "bootstrap", "persona_similarity"}
    assert metrics["rounds"] == ROUNDS
    assert sorted(metrics["persona_similarity"]) == sorted(METHODS)
    for by_round in metrics["persona_similarity"].values():
        assert list(by_round) == [f"r{s}" for s in range(1, ROUNDS + 1)] and all(
            -1 <= v <= 1 for v in by_round.values()
        )
    boot = metrics["bootstrap"]
    assert sorted(boot["methods"]) == sorted(METHODS) and sorted(boot["vs_deeper"]) == sorted(
        set(METHODS) - {"deeper"}
    )
    for method, stats in boot["methods"].items():
        all_ = metrics["methods"][method]["all"]
        mean = sum(all_[f"mae_r{s}"] for s in range(1, ROUNDS + 1)) / ROUNDS
        assert stats["mean_mae"]["estimate"] == pytest.approx(mean, abs=2e-4)
        assert stats["reduction_pct"]["estimate"] == pytest.approx(all_["reduction_pct"], abs=2e-3)
        for stat in stats.values():
            assert stat["low"] <= stat["estimate"] <= stat["high"]
    assert list(metrics["methods"]) == sorted(METHODS)  # keys sorted by write_json
    round_keys = {f"mae_r{s}{part}" for s in range(ROUNDS + 1) for part in ("", "_parse_failed_share")}
    for block in metrics["methods"].values():
        assert set(block) == {"domains", "seen", "unseen", "all"}
        assert sorted(block["domains"]) == sorted(DOMAINS)
        for numbers in block["domains"].values():
            assert round_keys | {
                "users",
                "reduction_pct",
                "first_update",
                "persona_tokens",
                "pairwise_accuracy",
                "predict_failed_items",
                "update_failures",
                "update_flags",
                "update_stopped_at_limit_share",
            } == set(numbers)
            assert 0 <= numbers["update_stopped_at_limit_share"] <= 1
            assert set(numbers["pairwise_accuracy"]) == {f"r{s}" for s in range(ROUNDS + 1)}
            assert all(0 <= v <= 1 for v in numbers["pairwise_accuracy"].values())
            assert numbers["users"] == USERS_PER_DOMAIN
            expected = 100 * (numbers["mae_r0"] - numbers[f"mae_r{ROUNDS}"]) / numbers["mae_r0"]
            assert numbers["reduction_pct"] == pytest.approx(expected, abs=0.05)  # from rounded errors
            assert set(numbers["first_update"]) == {"prev", "curr", "fut"}
            for part in numbers["first_update"].values():
                assert set(part) == {"before", "after", "delta"}
                assert part["delta"] == pytest.approx(part["after"] - part["before"], abs=2e-4)
            assert set(numbers["persona_tokens"]) == {f"r{s}" for s in range(ROUNDS + 1)}
        assert (
            block["seen"]["domains"] == 1 and block["unseen"]["domains"] == 1 and block["all"]["domains"] == 2
        )
        seen_domain = next(d for d, s in DOMAINS.items() if s)
        assert block["seen"]["mae_r1"] == pytest.approx(block["domains"][seen_domain]["mae_r1"])
        assert block["all"]["mae_r0"] == pytest.approx(
            sum(block["domains"][d]["mae_r0"] for d in DOMAINS) / len(DOMAINS), abs=1e-4
        )
    refiners = sorted(m for m, spec in METHODS.items() if spec.is_refiner)
    assert (
        sorted(metrics["first_update_reward"])
        == refiners
        == ["deeper", "deeper_it1", "frozen_refiner", "untrained"]
    )
    for summary in metrics["first_update_reward"].values():
        assert summary["candidates"] == len(DOMAINS) * USERS_PER_DOMAIN and summary["unscored"] == 0
        assert math.isfinite(summary["r"]["mean"]) and sorted(summary["domains"]) == sorted(DOMAINS)
        assert 0 <= summary["share_positive"] <= 1


def test_plot_has_one_line_per_method(pipeline):
    with (pipeline / "plots" / "mae_by_round.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], int(r["round"])) for r in rows] == [
        (m, s) for m in METHODS for s in range(ROUNDS + 1)
    ]
    metrics = json.loads((pipeline / "metrics" / "eval.json").read_text())
    for r in rows:
        assert float(r["mae"]) == pytest.approx(
            metrics["methods"][r["method"]]["all"][f"mae_r{r['round']}"], abs=1e-4
        )


def test_user_selection_and_counted_skips(pipeline, tmp_path):
    from deeper.errors import ConfigError, InputError
    from deeper.rollout import load_eval_users

    windows = pipeline / "windows.parquet"
    init = pq.read_table(pipeline / "init.parquet").to_pandas()
    init.iloc[1:].to_parquet(tmp_path / "init.parquet")  # the first user loses S_0
    users, skipped = load_eval_users(windows, tmp_path / "init.parquet", ROUNDS, None, None)
    assert (
        skipped == {"no_persona": 1, "too_few_windows": 0}
        and len(users) == len(DOMAINS) * USERS_PER_DOMAIN - 1
    )
    users, _ = load_eval_users(windows, pipeline / "init.parquet", ROUNDS, ["food_com"], 2)
    assert [u.domain for u in users] == ["food_com"] * 2 and not any(u.seen for u in users)
    assert all(len(u.windows) == ROUNDS + 2 and len(u.windows[0].titles) > 0 for u in users)
    with pytest.raises(InputError, match="no evaluation user"):  # one more round needs one more window
        load_eval_users(windows, pipeline / "init.parquet", ROUNDS + 1, None, None)
    with pytest.raises(ConfigError, match="no domain 'books'"):
        load_eval_users(windows, pipeline / "init.parquet", ROUNDS, ["books"], None)


def test_per_domain_curves_reward_histogram_data_and_case_study(pipeline):
    """Fig. 4's per-domain curves (with the seen / unseen / all averages), Fig. 3's per-user first-update rewards
    of the refiners, and Table 27's case-study page, all from the same tables as metrics/eval.json."""
    metrics = json.loads((pipeline / "metrics" / "eval.json").read_text())
    with (pipeline / "plots" / "mae_by_round_domain.csv").open() as f:
        rows = list(csv.DictReader(f))
    groups = {r["domain"] for r in rows}
    assert groups == set(DOMAINS) | {"seen", "unseen", "all"}
    for row in rows:
        block = metrics["methods"][row["method"]]
        numbers = block["domains"][row["domain"]] if row["domain"] in DOMAINS else block[row["domain"]]
        assert float(row["mae"]) == pytest.approx(numbers[f"mae_r{row['round']}"], abs=1e-4)
    assert len(rows) == len(METHODS) * len(groups) * (ROUNDS + 1)
    with (pipeline / "plots" / "first_update_reward.csv").open() as f:
        rewards = list(csv.DictReader(f))
    refiners = sorted(metrics["first_update_reward"])
    assert sorted({r["method"] for r in rewards}) == refiners
    assert len(rewards) == len(refiners) * 4 * len(DOMAINS) * USERS_PER_DOMAIN
    for method in refiners:
        r = [float(x["reward"]) for x in rewards if x["method"] == method and x["part"] == "r"]
        assert sum(r) / len(r) == pytest.approx(metrics["first_update_reward"][method]["r"]["mean"], abs=1e-3)
    page = (pipeline / "reports" / "case_study.md").read_text()
    assert page.startswith("# Case study: user ")
    assert [line[3:] for line in page.splitlines() if line.startswith("## ")] == list(METHODS)
    assert page.count("### round ") == len(METHODS) * (ROUNDS + 1)

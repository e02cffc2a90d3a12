"""A second policy backbone (the paper's Table 26): the model DPO trains (params models.policy) is separate from
the model that sampled iteration 1's candidates (models.sampler), so switching it re-runs training and what
follows, never the sampling; `embedded:<name>` names a pinned embedded model without a DVC folder dependency."""

from __future__ import annotations

import json
from pathlib import Path

import networkx as nx
import pandas as pd
import pytest
import yaml
from click.testing import CliRunner

from deeper.config import load_params
from deeper.errors import ConfigError
from deeper.llm import check_spec
from deeper.llm.fingerprint import resolve_model
from deeper.profile import load_profile
from deeper.reward import OLD_COLUMNS
from tests.conftest import REPO, one_line_error


def _stage_params(stage) -> set[str]:
    keys = set()
    for dep in stage.params:
        keys |= set(dep.params if isinstance(dep.params, list) else dep.params or [])
    return keys


def _reads(keys: set[str], block: str) -> bool:
    return any(k == block or k.startswith(block + ".") for k in keys)


def test_switching_the_trained_model_reruns_training_onward_not_the_sampling():
    """DVC's own reading of dvc.yaml: the stages that declare models.policy, and everything downstream of
    them, are what `-S models.policy.name=...` re-runs; sample@1 (and what feeds the pairs) is not among them."""
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        graph = repo.index.graph  # an edge runs from a stage to a stage it depends on
        stages = {s.addressing: s for s in repo.index.stages}
        declaring = {name for name, s in stages.items() if _reads(_stage_params(s), "models.policy")}
        rerun = set(declaring)
        for name in declaring:
            rerun |= {s.addressing for s in nx.ancestors(graph, stages[name])}
        assert _reads(_stage_params(stages["sample@1"]), "models.sampler")
        assert not _reads(_stage_params(stages["sample@1"]), "models.policy")
        assert _reads(_stage_params(stages["sample@2"]), "models.policy")  # Model 1 samples iteration 2
        for kept in (
            "init_personas",
            "contexts@1",
            "sample@1",
            "reward@1",
            "pair@1",
            "evaluate@fullregen",
            "evaluate@frozen_refiner",
        ):
            assert kept not in rerun, kept
        for redone in (
            "train@1",
            "refine@1",
            "sample@2",
            "train@2",
            "evaluate@deeper",
            "evaluate@deeper_it1",
            "evaluate@untrained",
            "report",
        ):
            assert redone in rerun, redone
        # and the sampler reaches the pairs: changing it re-runs sample@1 and pair@1
        sampler = {name for name, s in stages.items() if _reads(_stage_params(s), "models.sampler")}
        assert sampler == {"sample@1"}
        assert "pair@1" in {s.addressing for s in nx.ancestors(graph, stages["sample@1"])}


def test_params_yaml_samples_with_the_policy_it_trains():
    params = load_params(REPO / "params.yaml")
    assert params["models"]["sampler"] == params["models"]["policy"]


def test_embedded_names_resolve_to_the_embedded_folder(smollm2_path):
    source = resolve_model("embedded:smollm2-135m", where="models.policy.name")
    assert source.is_local and (Path(source.location) / "config.json").is_file()
    assert source.fingerprint == resolve_model(smollm2_path).fingerprint
    with pytest.raises(ConfigError, match="models.policy.name: .*unknown embedded model 'nope'"):
        resolve_model("embedded:nope", where="models.policy.name")


def test_embedded_names_are_checked_before_anything_is_fetched():
    assert (
        check_spec({"backend": "transformers", "name": "embedded:qwen2.5-coder-0.5b"})[1]["name"]
        == "embedded:qwen2.5-coder-0.5b"
    )
    for spec in (
        {"backend": "transformers", "name": "embedded:minilm-l6-v2"},  # an embedder, not an LLM
        {"backend": "openai", "name": "embedded:smollm2-135m"},
    ):
        with pytest.raises(
            ConfigError, match="models.policy.name: .*embedded:qwen2.5-coder-0.5b, embedded:smollm2"
        ):
            check_spec(spec, where="models.policy")


def test_a_profile_that_swaps_the_policy_must_say_the_sampler(tmp_path):
    params = load_params(REPO / "params.yaml")
    block = dict(params["models"]["policy"], name="other/model")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"models.policy": block}))
    with pytest.raises(ConfigError, match="models.sampler: must be set where models.policy is"):
        load_profile(tmp_path / "p.yaml", params)
    (tmp_path / "q.yaml").write_text(yaml.safe_dump({"models.policy": block, "models.sampler": block}))
    assert set(load_profile(tmp_path / "q.yaml", params)) == {"models.policy", "models.sampler"}
    # a key inside the block (the second backbone) changes only the trained model, on purpose
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"models.policy.name": "embedded:qwen2.5-coder-0.5b"}))
    assert load_profile(tmp_path / "r.yaml", params) == {"models.policy.name": "embedded:qwen2.5-coder-0.5b"}


def test_sample_at_1_loads_the_sampler_and_at_2_the_policy(tiny_llama, tmp_path, monkeypatch):
    """models.policy names a folder that does not exist: sample@1 still runs (it reads models.sampler), and the
    same stage told to use the policy stops with one line naming models.policy."""
    from stages.sample import main
    from tests.test_iteration import make_params

    monkeypatch.setenv("DEEPER_RESPONSE_CACHE", str(tmp_path / "responses"))
    params = make_params(tiny_llama, n=2, max_new_tokens=4)
    params["models"]["sampler"] = params["models"]["policy"]
    params["models"]["policy"] = dict(params["models"]["policy"], name=str(tmp_path / "models/absent"))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    chat = json.dumps([{"role": "user", "content": "Refine: likes films."}])
    pd.DataFrame(
        [
            {
                "context_id": "movielens/u0/t1",
                "domain": "movielens",
                "user_id": "u0",
                "t": 1,
                "item_type": "movie",
                "persona_old": "Likes films.",
                "predicted": [3.0, 3.0],
                "prompt": chat,
                **{c: 0.5 for c in OLD_COLUMNS},
            }
        ]
    ).to_parquet(tmp_path / "contexts.parquet", index=False)
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--iteration",
        "1",
        "--contexts",
        str(tmp_path / "contexts.parquet"),
        "--out",
        str(tmp_path / "s.parquet"),
        "--metrics",
        str(tmp_path / "s.json"),
    ]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    assert "candidates from models.sampler" in done.output
    assert len(pd.read_parquet(tmp_path / "s.parquet")) >= 1
    one_line_error(
        CliRunner().invoke(main, [*args, "--model", "policy"]), "models.policy.name", "model not found"
    )


def test_the_adapter_records_the_params_name_of_its_base(tiny_llama, tmp_path):
    """An `embedded:` base loads from $DEEPER_CACHE_DIR (a path that differs per machine); the adapter's
    config names the model as params do, so the same weights give the same bytes (and DVC hash) anywhere."""
    from deeper.train import TrainConfig, train_dpo
    from tests.test_train import FAST, make_pairs

    train_dpo(
        tiny_llama,
        make_pairs(0),
        make_pairs(0),
        tmp_path / "a",
        TrainConfig(**FAST),
        base_name="embedded:tiny",
    )
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "embedded:tiny"
    train_dpo(tiny_llama, make_pairs(0), make_pairs(0), tmp_path / "b", TrainConfig(**FAST))
    config = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_llama)

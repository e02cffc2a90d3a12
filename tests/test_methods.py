"""Persona update methods on the tiny random Llama: which prompts each one sends, in how many calls, and
what it does with the answers."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deeper.errors import ConfigError
from deeper.llm.base import Sampling
from deeper.methods import (
    FullRegen,
    HierMerge,
    IncUpdate,
    Refine,
    SlideRegen,
    UpdateInput,
    Window,
    methods_from_params,
)
from deeper.methods.base import finish
from deeper.personas import clean_persona
from deeper.prompts import quote_title
from deeper.prompts.render import free_text

REPO = Path(__file__).resolve().parents[1]
# Seeded sampling: the random model answers greedily with line breaks only (an empty persona).
SAMPLED = Sampling(temperature=1.0, max_new_tokens=12, seed=0)


class Recording:
    """The real backend, with every generate call's chats kept for inspection."""

    def __init__(self, llm):
        self.llm, self.calls, self.answers = llm, [], []
        self.backend, self.fingerprint = llm.backend, llm.fingerprint

    def generate(self, chats, n, sampling):
        self.calls.append(chats)
        self.answers.append(self.llm.generate(chats, n, sampling))
        return self.answers[-1]

    def rating_probs(self, groups):
        return self.llm.rating_probs(groups)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llama):
    from deeper.llm import load_llm

    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 4})


def _user(tag: str) -> UpdateInput:
    # Windows W_0..W_2; titles carry the window number so a prompt shows which windows it saw.
    windows = tuple(
        Window(
            titles=(f'{tag} W{w} "Quoted" {{braces}}', f"{tag} W{w} Second\nline"),
            ratings=(float(w + 1), 4.5),
        )
        for w in range(3)
    )
    return UpdateInput(
        item_type="movie",
        persona=f"Old persona of {tag}: likes quiet films.",
        history=windows,
        predictions=(2.25, 3.75),
    )


def _user_text(chat) -> str:
    return next(m["content"] for m in chat if m["role"] == "user")


def _run(cls, tiny_llm):
    llm = Recording(tiny_llm)
    method = cls(llm, SAMPLED)
    inputs = [_user("alice"), _user("bob")]
    return method.update(inputs), llm, inputs


def test_refine_shows_old_persona_and_predicted_vs_actual_of_current_window(tiny_llm):
    results, llm, inputs = _run(Refine, tiny_llm)
    calls = llm.calls
    assert len(calls) == 1 and len(calls[0]) == 2  # all users in one call
    text = _user_text(calls[0][0])
    assert inputs[0].persona in text
    assert (
        f"{quote_title(inputs[0].current.titles[0])}: predicted 2.2, actual 3" in text
    )  # 2.25 -> "2.2" (one decimal)
    assert f"{quote_title(inputs[0].current.titles[1])}: predicted 3.8, actual 4.5" in text
    assert "W0" not in text and "W1" not in text and "bob" not in text
    for result, item, (answer,) in zip(results, inputs, llm.answers[0]):
        assert result.generated == (answer,)
        if clean_persona(answer):
            assert (result.persona, result.failure) == (clean_persona(answer), None)
        else:
            assert (result.persona, result.failure) == (item.persona, "empty")


def test_incupdate_shows_old_persona_and_latest_ratings_only(tiny_llm):
    _, llm, inputs = _run(IncUpdate, tiny_llm)
    calls = llm.calls
    assert len(calls) == 1 and len(calls[0]) == 2
    text = _user_text(calls[0][1])
    assert inputs[1].persona in text
    assert f"{quote_title(inputs[1].current.titles[1])}: 4.5" in text
    assert "W2" in text and "W0" not in text and "W1" not in text and "predicted" not in text


def test_fullregen_sees_all_ratings_so_far_and_not_the_old_persona(tiny_llm):
    _, llm, inputs = _run(FullRegen, tiny_llm)
    calls = llm.calls
    assert len(calls) == 1
    text = _user_text(calls[0][0])
    positions = [text.index(quote_title(t)) for w in inputs[0].history for t in w.titles]
    assert positions == sorted(positions)  # oldest first, all six items
    assert f"{quote_title(inputs[0].history[0].titles[0])}: 1" in text
    assert inputs[0].persona not in text


def test_slideregen_sees_only_the_latest_window(tiny_llm):
    _, llm, inputs = _run(SlideRegen, tiny_llm)
    calls = llm.calls
    assert len(calls) == 1
    text = _user_text(calls[0][0])
    assert "W2" in text and "W0" not in text and "W1" not in text
    assert inputs[0].persona not in text


def test_hiermerge_makes_a_short_term_persona_then_merges_it(tiny_llm):
    results, llm, inputs = _run(HierMerge, tiny_llm)
    calls = llm.calls
    assert len(calls) == 2  # two batched calls: short-term personas, then merges
    short_text = _user_text(calls[0][0])
    assert "W2" in short_text and "W0" not in short_text and inputs[0].persona not in short_text
    short_answers = [texts[0] for texts in llm.answers[0]]
    assert len(calls[1]) == sum(1 for a in short_answers if clean_persona(a))
    merge_text = _user_text(calls[1][0])
    assert inputs[0].persona in merge_text
    assert (
        free_text(clean_persona(short_answers[0])) in merge_text
    )  # as rendered: control characters -> spaces
    assert "W2" not in merge_text  # the merge sees personas only
    assert results[0].generated[0] == short_answers[0]


def test_an_empty_answer_keeps_the_old_persona_and_counts_as_failed():
    failed = finish("old persona", "  **Refined Persona:**  \n ")
    assert (failed.persona, failed.failure) == ("old persona", "empty")
    used = finish("old persona", "Persona: likes jazz. " + "loop loop loop " * 20)
    assert used.persona.startswith("likes jazz.") and used.failure is None and used.flag == "repetitive"


def test_params_hold_the_one_list_of_methods():
    """dvc.yaml's evaluate stages and the report come from params evaluate.methods; nothing else lists them."""
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    methods = methods_from_params(yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["methods"])
    assert dvc["stages"]["evaluate"]["foreach"] == "${evaluate.methods}"
    assert "data/eval" in dvc["stages"]["report"]["deps"]
    assert list(methods) == [
        "deeper",
        "deeper_it1",
        "untrained",
        "frozen_refiner",
        "incupdate",
        "hiermerge",
        "fullregen",
        "slideregen",
    ]
    assert {n for n, m in methods.items() if m.is_refiner} == {
        "deeper",
        "deeper_it1",
        "untrained",
        "frozen_refiner",
    }
    assert (methods["deeper"].role, methods["deeper"].adapter) == ("policy", "models/adapters/it2")
    assert (methods["frozen_refiner"].role, methods["frozen_refiner"].adapter) == ("frozen", None)
    for name in ("incupdate", "hiermerge", "fullregen", "slideregen"):
        assert methods[name].role == "frozen" and methods[name].adapter is None
    with pytest.raises(ConfigError, match=r"evaluate.methods.x.update: 'refiner' is not one of"):
        methods_from_params({"x": {"update": "refiner", "model": "policy", "weights": "models/embedded"}})
    with pytest.raises(ConfigError, match=r"evaluate.methods.x.model: 'gpt' is not one of policy, frozen"):
        methods_from_params({"x": {"update": "refine", "model": "gpt", "weights": "models/embedded"}})
    with pytest.raises(ConfigError, match=r"evaluate.methods.x.adapter: unknown key"):
        methods_from_params({"x": {"update": "refine", "model": "policy", "weights": "w", "adapter": "w"}})


def test_a_new_method_is_one_params_entry(tmp_path):
    """A new use of an existing update (here refine on the frozen model under another name) needs only a params
    entry: DVC's graph then has its evaluate stage, upstream of the report."""
    from dvc.repo import Repo

    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        (tmp_path / name).write_bytes((REPO / name).read_bytes())
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text("[core]\n    no_scm = true\n")
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["evaluate"]["methods"]["frozen_refiner_2"] = {
        "update": "refine",
        "model": "frozen",
        "weights": "models/embedded",
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with Repo(str(tmp_path)) as repo:
        stages = {s.addressing.rsplit(":", 1)[-1]: s for s in repo.index.stages}
        assert "evaluate@frozen_refiner_2" in stages
        import networkx as nx

        upstream = {
            s.addressing.rsplit(":", 1)[-1] for s in nx.descendants(repo.index.graph, stages["report"])
        }
        assert "evaluate@frozen_refiner_2" in upstream


def test_only_the_trained_refiners_depend_on_training():
    """`dvc exp run -S delta=0.8` must not re-run the baselines or the untrained refiner: neither they nor any
    stage upstream of them reads a pair/train/iteration-2 param or a training output (DVC's own graph)."""
    import networkx as nx
    from dvc.repo import Repo

    training_params = ("delta", "alpha", "tau_pos", "tau_neg", "iter2", "train", "pair", "sample", "reward")
    with Repo(str(REPO)) as repo:
        stages = {s.addressing: s for s in repo.index.stages}
        methods = methods_from_params(
            yaml.safe_load((REPO / "params.yaml").read_text())["evaluate"]["methods"]
        )
        for name, spec in methods.items():
            stage = stages[f"evaluate@{name}"]
            upstream = {s.addressing for s in nx.descendants(repo.index.graph, stage)}
            params = {
                p
                for s in [stage, *nx.descendants(repo.index.graph, stage)]
                for d in s.deps
                if hasattr(d, "params")
                for p in d.params
            }
            trained = {
                s for s in upstream if s.startswith(("train@", "pair@", "sample@", "reward@", "contexts@"))
            }
            if spec.adapter is None:
                assert not trained, name
                assert not [p for p in params if p.split(".")[0] in training_params], name
            else:
                iteration = spec.adapter[-1]
                assert f"train@{iteration}" in upstream, name
                assert "train@2" not in upstream or iteration == "2", name


def test_code_finds_the_methods_it_needs_by_place_and_weights_not_by_name():
    """Method names live in params evaluate.methods alone: the reference is the first entry, Model k the policy
    method on train@k's adapter (whatever its update), the untrained one the refiner on the bare policy."""
    from deeper.methods import method_with_adapter, methods_from_params, reference_method

    specs = methods_from_params(
        {
            "m2": {"update": "incupdate", "model": "policy", "weights": "models/adapters/it2"},
            "base": {"update": "incupdate", "model": "policy", "weights": "models/embedded"},
            "bare": {"update": "refine", "model": "policy", "weights": "models/embedded"},
            "m1": {"update": "incupdate", "model": "policy", "weights": "models/adapters/it1"},
            "frozen": {"update": "refine", "model": "frozen", "weights": "models/embedded"},
        }
    )
    assert reference_method(specs) == "m2"
    assert (method_with_adapter(specs, 1), method_with_adapter(specs, 2)) == ("m1", "m2")
    assert method_with_adapter(specs, None) == "bare"  # a refiner, on the policy, with no adapter
    assert method_with_adapter(specs, 3) is None
    assert method_with_adapter({k: v for k, v in specs.items() if k != "bare"}, None) is None

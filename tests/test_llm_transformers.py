"""The transformers backend on the in-process tiny random Llama (real HF and peft code paths, no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deeper.errors import ConfigError
from deeper.llm import load_llm
from deeper.llm.base import RatingGroup, Sampling
from deeper.llm.transformers_backend import (
    PrefixMemo,
    common_prefix_length,
    packing_supported,
    score_naive,
    score_prefix_reuse,
)

PERSONA = (
    "Persona: a curious reader who rates mysteries highly and romance poorly. "
    "The user enjoys thoughtful dramas and dislikes loud action films. " * 3
)
TITLES = [
    "Fargo (1996)",
    "Toy Story (1995)",
    "Star Wars (1977), GoldenEye (1995) and Four Rooms (1995)",
    "X",
    "GoldenEye (1995)",
    "Four Rooms (1995) Four Rooms (1995)",
    "Fargo (1996)",
]


def item_chat(title: str, persona: str = PERSONA) -> list[dict]:
    return [{"role": "system", "content": persona}, {"role": "user", "content": f"Rate {title} from 1 to 5."}]


@pytest.fixture(scope="module")
def llm(tiny_llama):
    return load_llm({"backend": "transformers", "name": str(tiny_llama), "batch_size": 3})


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama, tmp_path_factory):
    """Two peft LoRA adapters on the tiny model with non-zero B weights (so they change the outputs)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        model = get_peft_model(base, config)
        with torch.no_grad():  # make the update large enough to move the tiny model's outputs visibly
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(50)
        out = tmp_path_factory.mktemp(f"adapter{seed}")
        model.save_pretrained(out)
        dirs.append(out)
    return dirs


def test_generate_returns_n_texts_per_chat_and_counts_calls(llm):
    before = llm.counters.calls
    out = llm.generate([item_chat(t) for t in TITLES[:3]], 2, Sampling(max_new_tokens=5, seed=1))
    assert [len(row) for row in out] == [2, 2, 2]
    assert all(isinstance(t, str) for row in out for t in row)
    assert llm.counters.calls - before == 6
    assert llm.counters.completion_tokens > 0


def test_each_generation_says_whether_it_stopped_at_the_limit(smollm2_path):
    """One batch, two rows: the short answer ends with an end token (then pads while the other row goes on), the
    story runs into max_new_tokens. The flag is per row, for sampled and greedy decoding alike."""
    from deeper.llm.base import Generation

    real = load_llm({"backend": "transformers", "name": smollm2_path, "batch_size": 4})
    chats = [
        [{"role": "user", "content": "What colour is a clear daytime sky? Answer with one word."}],
        [{"role": "user", "content": "Write a long story about a dragon who learns to cook."}],
    ]
    for sampling in (
        Sampling(temperature=0.0, max_new_tokens=24),
        Sampling(temperature=0.7, max_new_tokens=24),
    ):
        short, story = (row[0] for row in real.generate(chats, 1, sampling))
        assert isinstance(short, Generation) and isinstance(story, Generation)
        assert len(real.encode([short])[0]) < 24 and not short.stopped_at_limit
        assert len(real.encode([story])[0]) >= 23 and story.stopped_at_limit
    # a limit the short answer also reaches flags it too
    assert real.generate(chats[:1], 1, Sampling(temperature=0.0, max_new_tokens=3))[0][0].stopped_at_limit


def test_rating_probs_are_distributions(llm):
    groups = [
        RatingGroup([item_chat(t) for t in TITLES[:4]]),
        RatingGroup([item_chat("Fargo")]),
        RatingGroup([]),
    ]
    results = llm.rating_probs(groups)
    assert [r.probs.shape for r in results] == [(4, 5), (1, 5), (0, 5)]
    for r in results[:2]:
        np.testing.assert_allclose(r.probs.sum(axis=1), 1.0, atol=1e-9)
        assert np.all(r.probs > 0) and not np.any(np.isnan(r.probs))
        assert np.all((r.digit_mass > 0) & (r.digit_mass <= 1))
        assert not r.failed.any()


def test_digit_tokens_include_space_variants(llm):
    # The tiny tokenizer has both "1" and " 1" ("Ġ1") as tokens: both spellings count for the rating.
    spellings = [[llm.tokenizer.decode([i]) for i in ids] for ids in llm.digit_ids]
    assert all(digit in texts for digit, texts in zip("12345", spellings))
    assert any(len(ids) > 1 for ids in llm.digit_ids)


def test_common_prefix_length():
    assert common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert common_prefix_length([[5, 1], [6, 1]]) == 0
    assert common_prefix_length([[1, 2], [1, 2]]) == 2


@pytest.mark.parametrize("method", ["packed", "batched"])
@pytest.mark.parametrize("size", [2, 3, 5, 7])
def test_prefix_reuse_equals_naive(llm, size, method):
    # batch_size 3: groups of 5 and 7 items run their suffixes in several batches against copies of the cache.
    group = RatingGroup([item_chat(t) for t in TITLES[:size]])
    prompts = llm.rating_prompt_ids(group)
    assert len({len(p) for p in prompts}) > 1 or size == 2  # suffixes of different lengths
    assert common_prefix_length(prompts) > 30  # the persona is shared and reused
    reuse = llm.rating_probs([group], prefix_reuse=method)[0]
    naive = llm.rating_probs([group], prefix_reuse=False)[0]
    np.testing.assert_allclose(reuse.probs, naive.probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reuse.digit_mass, naive.digit_mass, atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["packed", "batched"])
def test_prefix_reuse_with_identical_and_unrelated_prompts(llm, method):
    # Two identical prompts (the whole prompt is the common prefix) and one with a different persona.
    with torch.inference_mode():
        same = llm.rating_prompt_ids(
            RatingGroup([item_chat("Fargo"), item_chat("Fargo"), item_chat("Fargo (1996)")])
        )
        a = score_prefix_reuse(llm.model, same, llm.pad_id, 2, method)
        b = score_naive(llm.model, same, llm.pad_id, 2)
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
        other = llm.rating_prompt_ids(RatingGroup([item_chat("X", "Someone else."), item_chat("X")]))
        torch.testing.assert_close(
            score_prefix_reuse(llm.model, other, llm.pad_id, 4, method),
            score_naive(llm.model, other, llm.pad_id, 4),
            atol=1e-4,
            rtol=0,
        )


@pytest.mark.parametrize("method", ["packed", "batched"])
def test_prefix_memo_reuses_a_repeated_persona_only(llm, method):
    # Consecutive windows of one persona (a candidate's three reward windows) encode the persona once; a new
    # persona, or the same persona after another, is encoded again. Results equal the naive path either way.
    memo = PrefixMemo()
    windows = [TITLES[:3], TITLES[3:6], TITLES[1:4], TITLES[:3]]
    personas = [PERSONA, PERSONA, "Someone who only likes cartoons. " * 5, PERSONA]
    with torch.inference_mode():
        for titles, persona in zip(windows, personas):
            prompts = llm.rating_prompt_ids(RatingGroup([item_chat(t, persona) for t in titles]))
            torch.testing.assert_close(
                score_prefix_reuse(llm.model, prompts, llm.pad_id, 2, method, memo=memo),
                score_naive(llm.model, prompts, llm.pad_id, 2),
                atol=1e-4,
                rtol=0,
            )
    assert memo.hits == 1  # only the second window; the last one follows another persona


def test_packed_prefix_reuse_with_eager_attention(llm, tiny_llama):
    # Eager attention adds a float mask to the scores; sdpa takes a boolean one: both must match naive.
    from transformers import AutoModelForCausalLM

    eager = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="eager").eval()
    assert packing_supported(llm.model) and packing_supported(eager)
    prompts = llm.rating_prompt_ids(RatingGroup([item_chat(t) for t in TITLES[:5]]))
    with torch.inference_mode():
        torch.testing.assert_close(
            score_prefix_reuse(eager, prompts, llm.pad_id, 3, "packed"),
            score_naive(eager, prompts, llm.pad_id, 3),
            atol=1e-4,
            rtol=0,
        )


def test_seeded_sampling_is_reproducible_and_per_sample(llm):
    chats = [item_chat(t) for t in TITLES[:3]]
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=7)
    first = llm.generate(chats, 3, sampling)
    assert llm.generate(chats, 3, sampling) == first
    other_seed = llm.generate(chats, 3, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=100))
    assert other_seed != first
    # Sample k is the sample of seed + k, whatever else is in the batch.
    alone = llm.generate([chats[1]], 1, Sampling(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=9))
    assert alone[0][0] == first[1][2]


def test_greedy_is_deterministic(llm):
    chats = [item_chat(t) for t in TITLES[:2]]
    greedy = Sampling(temperature=0.0, max_new_tokens=6, seed=1)
    out = llm.generate(chats, 2, greedy)
    assert all(row[0] == row[1] for row in out)
    assert llm.generate(chats, 2, Sampling(temperature=0.0, max_new_tokens=6, seed=99)) == out
    # the same as the model's own greedy decoding of the first chat
    prompt = llm.encode(
        [llm.tokenizer.apply_chat_template(chats[0], tokenize=False, add_generation_prompt=True)]
    )[0]
    with torch.inference_mode():
        ref = llm.model.generate(
            torch.tensor([prompt]), do_sample=False, max_new_tokens=6, pad_token_id=llm.pad_id
        )
    assert out[0][0] == llm.tokenizer.decode(ref[0, len(prompt) :], skip_special_tokens=True)


def test_adapter_changes_fingerprint_and_outputs(llm, tiny_llama, adapter_dirs):
    spec = {"backend": "transformers", "name": str(tiny_llama), "batch_size": 4}
    tuned = load_llm(spec, adapter=str(adapter_dirs[0]))
    other = load_llm(spec, adapter=str(adapter_dirs[1]))
    assert len({llm.fingerprint, tuned.fingerprint, other.fingerprint}) == 3
    assert (
        tuned.fingerprint.startswith(llm.fingerprint.split(";")[0]) and "adapter=sha256:" in tuned.fingerprint
    )
    group = RatingGroup([item_chat(t) for t in TITLES[:3]])
    base_probs = llm.rating_probs([group])[0].probs
    tuned_probs = tuned.rating_probs([group])[0].probs
    assert np.abs(base_probs - tuned_probs).max() > 1e-3
    # prefix reuse on the merged adapter matches the naive path too
    np.testing.assert_allclose(
        tuned_probs, tuned.rating_probs([group], prefix_reuse=False)[0].probs, atol=1e-4
    )
    # the backend merges the LoRA weights for speed: same logits as the unmerged peft model
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter_dirs[0])
    ).eval()
    assert not isinstance(tuned.model, PeftModel)
    with torch.inference_mode():
        prompts = tuned.rating_prompt_ids(group)
        torch.testing.assert_close(
            score_naive(tuned.model, prompts, tuned.pad_id, 3),
            score_naive(unmerged, prompts, tuned.pad_id, 3),
            atol=1e-4,
            rtol=0,
        )


def test_fingerprint_sources(tiny_llama, tmp_path):
    import hashlib

    from deeper.llm.fingerprint import folder_fingerprint, resolve_model

    fp = folder_fingerprint(tiny_llama)
    assert fp.startswith("sha256:") and folder_fingerprint(tiny_llama) == fp
    marked = tmp_path / "marked"
    marked.mkdir()
    (marked / "config.json").write_text("{}")
    (marked / "fingerprint.txt").write_text("sha256:abc\n")
    assert folder_fingerprint(marked) == "sha256:abc"
    assert (
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", "v1").fingerprint
        == "hf:HuggingFaceTB/SmolLM2-135M-Instruct@v1"
    )
    gguf = tmp_path / "m.Q4_1.gguf"
    gguf.write_bytes(b"GGUF fake weights")
    source = resolve_model(str(gguf))
    assert (source.location, source.gguf_file) == (str(tmp_path), "m.Q4_1.gguf")
    assert source.fingerprint == "sha256:" + hashlib.sha256(b"GGUF fake weights").hexdigest()
    a = load_llm({"backend": "transformers", "name": str(tiny_llama), "dtype": "float32"})
    b = load_llm({"backend": "transformers", "name": str(tiny_llama), "dtype": "bfloat16"})
    assert a.fingerprint != b.fingerprint  # bf16 weights give other outputs


@pytest.mark.parametrize(
    ("spec", "adapter", "message"),
    [
        (
            {"backend": "nope", "name": "x"},
            None,
            "models.frozen.backend: 'nope' is not one of transformers, openai, vllm",
        ),
        ({"name": "x"}, None, "models.frozen.backend: missing"),
        ({"backend": "transformers"}, None, "models.frozen.name: missing"),
        (
            {"backend": "transformers", "name": "models/embedded/absent"},
            None,
            "model not found: models/embedded/absent",
        ),
        (
            {"backend": "transformers", "name": "TINY", "batchsize": 3},
            None,
            "models.frozen.batchsize: unknown key",
        ),
        (
            {"backend": "transformers", "name": "TINY", "dtype": "float8"},
            None,
            "models.frozen.dtype: 'float8'",
        ),
        (
            {"backend": "transformers", "name": "TINY"},
            "/nonexistent/adapter",
            "no peft adapter at /nonexistent/adapter",
        ),
    ],
)
def test_load_llm_config_errors_are_one_line(tiny_llama, spec, adapter, message):
    spec = {k: (str(tiny_llama) if v == "TINY" else v) for k, v in spec.items()}
    with pytest.raises(ConfigError) as err:
        load_llm(spec, adapter=adapter, where="models.frozen")
    text = str(err.value)
    assert message in text and "\n" not in text and text.startswith("params.yaml: ")


def reference_gumbel_step(generators, warpers, scores):
    """The sampler as it was first written: noise on the whole vocabulary, then argmax."""
    for warper in warpers:
        scores = warper(None, scores)
    uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators])
    return scores.float() + -torch.log(-torch.log(uniform.clamp(min=1e-20, max=1.0 - 1e-7)))


@pytest.mark.parametrize("top_p", [0.4, 0.9, 1.0])
def test_noise_only_where_top_p_kept_draws_what_noise_everywhere_drew(top_p):
    """SeededSampler computes the Gumbel noise on the entries top-p keeps only: the same argmax (the drawn token)
    at every step, the same perturbed score there, and the generators advance as before (so later steps agree)."""
    from deeper.llm.transformers_backend import SeededSampler

    seeds, vocab, steps = [3, 4, 5, 6], 4096, 60
    ours = SeededSampler(seeds, temperature=0.7, top_p=top_p)
    reference_generators = [torch.Generator().manual_seed(s) for s in seeds]
    logits = torch.Generator().manual_seed(0)
    for _ in range(steps):
        scores = torch.randn(len(seeds), vocab, generator=logits) * 3
        got = ours(None, scores.clone())
        want = reference_gumbel_step(reference_generators, ours.warpers, scores.clone())
        assert torch.equal(got.argmax(-1), want.argmax(-1))
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        kept = torch.isfinite(want)
        assert torch.equal(got[kept], want[kept])
        assert (got[~kept] == float("-inf")).all()

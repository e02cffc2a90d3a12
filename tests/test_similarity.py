"""deeper/similarity.py: consecutive-persona similarity (Fig. 7a) with a sentence embedder."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from deeper.errors import ConfigError, InputError
from deeper.similarity import (
    MAX_TOKENS,
    PersonaEmbedder,
    consecutive_similarity,
    embedder_from_params,
    similarity_by_round,
)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    from tests.tiny import make_tiny_bert

    return PersonaEmbedder(make_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def test_unit_vectors_and_standard_pooling_for_short_texts(embedder):
    import torch

    texts = ["The user enjoys thoughtful dramas.", "A curious reader who rates mysteries highly."]
    vectors = embedder.embed(texts)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0)
    enc = embedder.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = embedder.model(**enc).last_hidden_state
    mask = enc["attention_mask"][..., None]
    pooled = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    np.testing.assert_allclose(vectors, pooled, atol=1e-5)  # what sentence-transformers computes


def test_a_long_text_is_embedded_piece_by_piece_and_every_piece_counts(embedder):
    head = "thoughtful dramas " * 200
    tail_a, tail_b = "loud action films " * 200, "quiet mysteries " * 200
    assert len(embedder.tokenizer(head, add_special_tokens=False)["input_ids"]) > MAX_TOKENS
    a, b = embedder.embed([head + tail_a, head + tail_b])
    assert a @ b < 0.999  # truncation at 256 tokens would make them identical
    assert np.isfinite(a).all() and abs(np.linalg.norm(a) - 1) < 1e-9


def test_consecutive_similarity_per_user_and_round(embedder):
    personas = {
        ("ml", "u1"): ["likes dramas", "likes dramas", "rates mysteries highly"],
        ("ml", "u2"): ["a reader", "a reader", "a reader"],
    }
    table = pd.DataFrame(
        [
            {"domain": d, "user_id": u, "round": s, "persona": p}
            for (d, u), ps in personas.items()
            for s, p in enumerate(ps)
        ]
    )
    sims = consecutive_similarity(table.sample(frac=1, random_state=0), 2, embedder)
    got = {(r.user_id, r.round): r.similarity for r in sims.itertuples()}
    assert got[("u1", 1)] == pytest.approx(1.0) and got[("u2", 2)] == pytest.approx(1.0)
    assert got[("u1", 2)] < 0.999
    means = similarity_by_round(sims, 2)
    assert means == pytest.approx({"r1": 1.0, "r2": (got[("u1", 2)] + 1.0) / 2})


def test_params_and_a_missing_model_are_one_line_errors(tmp_path):
    assert embedder_from_params({"evaluate": {"similarity_embedder": None}}) is None
    with pytest.raises(ConfigError, match="evaluate.similarity_embedder: must be a model folder or null"):
        embedder_from_params({"evaluate": {"similarity_embedder": 3}})
    with pytest.raises(InputError, match="no embedding model here"):
        PersonaEmbedder(tmp_path)

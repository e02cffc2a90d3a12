"""The transformers backend on the real embedded model (SmolLM2-135M-Instruct, fetched from a PyPI wheel)."""

from __future__ import annotations

import numpy as np
import pytest

from deeper.llm import load_llm
from deeper.llm.base import RatingGroup

pytestmark = pytest.mark.slow

PERSONA = (
    "This user is a thoughtful film lover who enjoys character-driven dramas, clever comedies and classic "
    "science fiction. They rate slow, loud or formulaic action films poorly."
)
TITLES = ["Toy Story (1995)", "GoldenEye (1995)", "Fargo (1996)", "Star Wars (1977)", "Mortal Kombat (1995)"]


def item_chat(title: str) -> list[dict]:
    system = (
        f"You predict how a user rates movies from 1 (hated it) to 5 (loved it).\n\nUser persona:\n{PERSONA}"
    )
    question = f'Movie: "{title}"\nHow would this user rate it? Answer with one digit from 1 to 5.'
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def smollm2():
    assets = pytest.importorskip(
        "deeper.assets", reason="deeper.assets (the embedded models) is not there yet"
    )
    if not hasattr(assets, "ensure_embedded_model"):
        pytest.skip("deeper.assets.ensure_embedded_model is not there yet")
    path = assets.ensure_embedded_model("smollm2-135m")
    return load_llm({"backend": "transformers", "name": str(path), "batch_size": 16})


def test_rating_prefill_puts_the_mass_on_the_digits_and_prefix_reuse_matches(smollm2):
    group = RatingGroup([item_chat(t) for t in TITLES], prefill="Rating: ")
    reuse = smollm2.rating_probs([group])[0]
    batched = smollm2.rating_probs([group], prefix_reuse="batched")[0]
    naive = smollm2.rating_probs([group], prefix_reuse=False)[0]
    assert np.all(reuse.digit_mass > 0.5)  # measured ~0.95 (without the prefill: ~0.25)
    np.testing.assert_allclose(reuse.probs.sum(axis=1), 1.0, atol=1e-9)
    np.testing.assert_allclose(reuse.probs, naive.probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(reuse.digit_mass, naive.digit_mass, atol=1e-4, rtol=0)
    np.testing.assert_allclose(batched.probs, naive.probs, atol=1e-4, rtol=0)

import os
from pathlib import Path

# One torch thread: the tests' models are tiny, and on a 2-core machine shared with other work two threads
# thrash (measured: 5-9x slower wall time). Set before any test module imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def one_line_error(result, *fragments):
    """A click stage's result: exit 1 and one line `error: ...` holding each fragment (no traceback)."""
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real test files of ../shared/data; tests skip where the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data absent: {SHARED_DATA} (README 'Tests and benchmarks': ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama + ChatML tokenizer saved as an HF folder (built in-process, no download)."""
    from tests.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Tests never write into the user's response cache unless a test sets DEEPER_CACHE_DIR itself."""
    os.environ.setdefault("DEEPER_RESPONSE_CACHE", str(tmp_path_factory.mktemp("responses")))
    yield


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The embedded SmolLM2-135M-Instruct as an HF folder (the fetch stage's output, or built in the cache)."""
    from deeper.assets import ensure_embedded_model

    return str(ensure_embedded_model("smollm2-135m"))


@pytest.fixture(scope="session")
def smollm2_adapter(smollm2_path, tmp_path_factory) -> str:
    """A LoRA adapter for SmolLM2 as the pipeline's train stage writes it (deeper.train): 2 DPO steps at a high
    learning rate, so that it visibly changes the model (the vLLM tests load it as is)."""
    from deeper.train import TrainConfig, train_dpo
    from tests.test_train import FAST, make_pairs

    out = tmp_path_factory.mktemp("smollm2-adapter") / "it1"
    train_dpo(smollm2_path, make_pairs(4), make_pairs(0), out, TrainConfig(**{**FAST, "lr": 2e-3}))
    return str(out)

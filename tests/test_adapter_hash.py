"""A re-trained adapter with the same weights keeps its DVC hash, so the stages after train@k stay cached.

Two things used to change on every run: `train_log.json` (wall-clock seconds, peak RSS) inside the adapter
folder, and the order of `target_modules` in peft's adapter_config.json (written from a set, so it follows the
process's string hash seed). The repo's .dvcignore keeps the log out of the hash; deeper.train.save_adapter
sorts the config.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deeper.train import TRAIN_LOG
from tests.stage_runs import DVC, dvc, init_repo

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(DVC is None, reason="dvc is not installed")

# Writes the same weights every run and a log that differs every run, like stages.train (the log's name is
# the one deeper.train writes, so renaming it without .dvcignore fails here).
TRAIN = (
    "import pathlib, time; d = pathlib.Path('models/adapters/it1'); d.mkdir(parents=True, exist_ok=True); "
    "(d / 'adapter_model.safetensors').write_bytes(b'same weights'); "
    f"(d / '{TRAIN_LOG}').write_text(str(time.time()))"
)
SAMPLE = "import pathlib; pathlib.Path('samples.txt').write_text('candidates of Model 1')"


def test_a_new_train_log_does_not_change_the_adapter_hash(tmp_path):
    repo = init_repo(tmp_path / "repo", dvcignore=True)
    stages = {
        "train": {"cmd": f'{sys.executable} -c "{TRAIN}"', "outs": ["models/adapters/it1"]},
        "sample": {
            "cmd": f'{sys.executable} -c "{SAMPLE}"',
            "deps": ["models/adapters/it1"],
            "outs": ["samples.txt"],
        },
    }
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    dvc("repro", cwd=repo)
    log = repo / "models/adapters/it1" / TRAIN_LOG
    first_log = log.read_text()
    lock = (repo / "dvc.lock").read_text()

    dvc("repro", "--force", "--single-item", "train", cwd=repo)  # train again: same weights, a new log
    assert log.read_text() != first_log
    assert (repo / "dvc.lock").read_text() == lock
    assert "up to date" in dvc("status", cwd=repo).lower()  # sample@k would not re-run


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_save_adapter_writes_the_config_in_one_order(tiny_llama, tmp_path, hash_seed):
    # A child process per string hash seed: the order peft gives target_modules follows the seed.
    code = (
        "import sys; from pathlib import Path; from peft import LoraConfig, get_peft_model; "
        "from transformers import AutoModelForCausalLM; from deeper.train import save_adapter; "
        "model = AutoModelForCausalLM.from_pretrained(sys.argv[1]); "
        "lora = LoraConfig(r=4, lora_alpha=8, target_modules='all-linear', task_type='CAUSAL_LM'); "
        "save_adapter(get_peft_model(model, lora), Path(sys.argv[2]))"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run(
        [sys.executable, "-c", code, str(tiny_llama), str(tmp_path)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=300,
    )
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    modules = config["target_modules"]
    assert len(modules) > 1 and modules == sorted(modules)
    assert list(config) == sorted(config)


# train_dpo with no training pairs writes a fresh, untrained LoRA adapter (B = 0, A random) for the DAG to go on
CARRY = (
    "import sys, pandas as pd; from deeper.train import TrainConfig, train_dpo; "
    "empty = pd.DataFrame(columns=['context_id', 'prompt', 'chosen', 'rejected', 'split']); "
    "train_dpo(sys.argv[1], empty, empty, sys.argv[2], TrainConfig(seed=int(sys.argv[3])))"
)


def _carried_over(model: Path, out: Path, seed: int, hash_seed: str) -> bytes:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", CARRY, str(model), str(out), str(seed)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return (out / "adapter_model.safetensors").read_bytes() + (out / "adapter_config.json").read_bytes()


def test_an_adapter_carried_over_untrained_has_the_same_bytes_in_every_process(tiny_llama, tmp_path):
    """No pair survived (e.g. -S delta=5): the untrained adapter's random LoRA A is drawn from train.seed, so
    two runs (other processes, other hash seeds) write the same bytes: the same DVC hash, the same cache keys."""
    first = _carried_over(tiny_llama, tmp_path / "a", 0, "1")
    assert _carried_over(tiny_llama, tmp_path / "b", 0, "2") == first
    assert _carried_over(tiny_llama, tmp_path / "c", 1, "1") != first  # the seed is what decides them

"""train@k under several processes, for real: `dvc repro` runs the dvc.yaml train stage whose command is
templated from params `train.launcher`, here `accelerate launch --multi_gpu --num_processes 2` with DDP over
gloo on the CPU (ACCELERATE_USE_CPU=true: accelerate's `--cpu` flag alone starts one process), training the
tiny in-process Llama for two steps. A probe in front of `-m stages.train` (tests/ddp_train_probe.py) records
per process what it wrote: exactly one adapter and one metrics file, both by rank 0, and equal LoRA weights on
both ranks (DDP averaged the gradients).
On GPUs the paper profile's launcher is the same command without ACCELERATE_USE_CPU (docs/parity.md).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.ddp_train_probe import lora_digest
from tests.stage_runs import DVC, dvc_env, dvc_run, pipeline_repo
from tests.test_train import make_pairs

BIN = Path(sys.executable).parent
ACCELERATE = shutil.which("accelerate", path=str(BIN)) or shutil.which("accelerate")
pytestmark = [
    pytest.mark.skipif(DVC is None, reason="dvc is not installed"),
    pytest.mark.skipif(
        ACCELERATE is None or importlib.util.find_spec("accelerate") is None,
        reason="accelerate is not installed",
    ),
]
LAUNCHER = "ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 -m tests.ddp_train_probe"


@pytest.fixture(scope="module")
def ddp_run(tiny_llama, tmp_path_factory):
    """A scratch DVC repo running this repository's train stage and code, after `dvc repro --single-item train@1`."""
    # 8 train pairs, 2 per process and step: one epoch is 2 optimizer steps when 2 processes share the data.
    train = {
        "launcher": LAUNCHER,
        "max_steps": 2,
        "per_device_batch": 2,
        "grad_accum": 1,
        "lr": 1e-2,
        "max_length": 256,
        "gradient_checkpointing": True,
    }
    overrides = {
        "models.policy": {"backend": "transformers", "name": str(tiny_llama)},
        **{f"train.{key}": value for key, value in train.items()},
    }
    repo = pipeline_repo(tmp_path_factory.mktemp("ddp-repo"), ["train"], overrides, {})
    (repo / "tests").mkdir()
    (repo / "tests" / "__init__.py").write_text("")
    shutil.copy(REPO / "tests" / "ddp_train_probe.py", repo / "tests" / "ddp_train_probe.py")
    (repo / "models" / "embedded").mkdir(parents=True)
    (repo / "models" / "embedded" / "README").write_text(
        "the train stage's dependency; the model is tiny_llama\n"
    )
    (repo / "data" / "pairs" / "it1").mkdir(parents=True)
    make_pairs(10).assign(split=["train"] * 8 + ["val"] * 2).to_parquet(
        repo / "data" / "pairs" / "it1" / "pairs.parquet"
    )

    env = dvc_env(OMP_NUM_THREADS="1", DEEPER_PROBE_DIR=str(repo / "probe"), PYTHONPATH="")
    result = dvc_run("repro", "--single-item", "train@1", cwd=repo, env=env, timeout=900)
    return repo, result


def test_the_stage_command_comes_from_train_launcher(ddp_run):
    repo, result = ddp_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train@1"]["cmd"] == f"{LAUNCHER} -m stages.train --iteration 1"
    assert lock["stages"]["train@1"]["params"]["params.yaml"]["train"]["launcher"] == LAUNCHER
    # the main process alone logs
    assert result.stderr.count("training on 8 pairs") == 1, result.stderr[-3000:]
    assert result.stderr.count("wrote models/adapters/it1 after 2 steps") == 1


def test_two_processes_trained_and_only_rank_0_wrote(ddp_run):
    repo, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    records = {r["rank"]: r for r in (json.loads(p.read_text()) for p in (repo / "probe").glob("rank*.json"))}
    assert sorted(records) == [0, 1]
    assert all(r["world_size"] == 2 and r["exit_code"] == 0 for r in records.values())
    # the adapter is saved into its partial folder, swapped in whole (deeper.outputs.replacing)
    assert records[0]["wrote"] == [
        ["adapter", "models/adapters/.it1.partial"],
        ["metrics", "metrics/train_it1.json"],
    ]
    assert records[1]["wrote"] == []
    # DDP: both replicas ended with the same LoRA weights, and rank 0 saved exactly those
    assert records[0]["lora_sha256"] == records[1]["lora_sha256"]
    from safetensors.torch import load_file

    saved = load_file(repo / "models" / "adapters" / "it1" / "adapter_model.safetensors")
    assert lora_digest(saved) == records[0]["lora_sha256"]


def test_the_metrics_describe_one_run_over_two_processes(ddp_run):
    repo, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((repo / "metrics" / "train_it1.json").read_text())
    assert metrics["processes"] == 2 and metrics["trained"] is True
    # 8 pairs over 2 processes x 2 per step: the 2 steps are one full epoch (one process would do half)
    assert metrics["steps"] == 2 and metrics["epochs"] == 1.0
    assert metrics["pairs"] == {"train": 8, "val": 2} and isinstance(metrics["eval"]["loss"], float)


def test_the_adapter_loads_and_is_trained(ddp_run, tiny_llama):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    repo, result = ddp_run
    assert result.returncode == 0, result.stderr[-3000:]
    adapter = repo / "models" / "adapters" / "it1"
    assert sorted(p.name for p in adapter.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_log.json",
    ]  # train_log: rank 0 only
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: the adapter was trained
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()

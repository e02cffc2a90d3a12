"""bench/gpu_check.sh, the GPU check for when a GPU is lent (issue 21 item 8), in its CPU mode: the same code path
(the training stage's DPO with the paper profile's trainer settings, the transformers backend's generation and
ratings), a tiny model, float32."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_check_runs_the_paper_trainer_and_the_backend_in_cpu_mode(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu", "--out", str(out)],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    numbers = json.loads(out.read_text())
    train = numbers["train"]
    # the paper profile's trainer settings reach the trainer (CPU mode: float32, a smaller batch)
    assert {
        k: train["settings"][k] for k in ("lora_r", "lora_alpha", "beta", "sft_weight", "sft_normalization")
    } == {
        "lora_r": 16,
        "lora_alpha": 32,
        "beta": 0.2,
        "sft_weight": 0.1,
        "sft_normalization": "per_pair",
    }
    assert train["settings"]["gradient_checkpointing"] and train["settings"]["disable_dropout"]
    assert train["steps"] == 4 and train["steps_per_s"] > 0 and train["loss_falls"]
    assert train["loss_last"] < train["loss_first"]
    assert numbers["generate"]["tokens"] > 0 and numbers["ratings"]["items"] == 80
    assert numbers["ratings"]["probs_sum_to_1"]
    assert "DPO: 4 steps" in result.stderr and "loss" in result.stderr


def test_the_gpu_check_carries_the_projects_pins():
    """The wheels it installs on the GPU machine are pyproject.toml's pins of what the GPU image lacks or has in
    another version: the script reads them from pyproject.toml, so a moved pin moves the check."""
    script = (REPO / "bench" / "gpu_check.sh").read_text()
    pins_line = next(line for line in script.splitlines() if line.startswith("PINS="))
    pins = subprocess.run(
        ["bash", "-c", pins_line.removeprefix("PINS=").strip("$()")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    pyproject = (REPO / "pyproject.toml").read_text()
    assert sorted(p.split("==")[0] for p in pins) == ["datasets", "peft", "transformers", "trl"]
    assert all(f'"{pin}"' in pyproject for pin in pins)

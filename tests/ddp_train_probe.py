"""`python -m tests.ddp_train_probe -m MODULE ARGS...`: runs MODULE as `python -m MODULE ARGS...` would, and
records what this process wrote, for tests/test_train_ddp.py.

Put in front of `-m stages.train` in a multi-process launcher (params `train.launcher`), every process
writes `$DEEPER_PROBE_DIR/rank<RANK>.json`: its rank and world size, each adapter save and metrics write it
made (peft `save_pretrained`, `deeper.metrics.write_json`), and a digest of the LoRA weights it ended with
(DDP keeps them equal across processes).
"""

from __future__ import annotations

import hashlib
import json
import os
import runpy
import sys
from pathlib import Path


def lora_digest(state: dict) -> str:
    """sha256 over the sorted names and float32 values of a LoRA state dict (as saved or as trained)."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[1] != "-m":
        print("usage: python -m tests.ddp_train_probe -m MODULE [ARGS...]", file=sys.stderr)
        return 2
    module, args = sys.argv[2], sys.argv[3:]
    rank = int(os.environ.get("RANK", "0"))
    record = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")), "wrote": []}

    import peft
    from peft import get_peft_model_state_dict

    import deeper.metrics
    import deeper.train

    save_pretrained, write_json, build_trainer = (
        peft.PeftModel.save_pretrained,
        deeper.metrics.write_json,
        deeper.train.build_trainer,
    )
    trainers = []

    def save(self, directory, *a, **k):
        record["wrote"].append(["adapter", str(directory)])
        return save_pretrained(self, directory, *a, **k)

    def write(path, data, *a, **k):
        record["wrote"].append(["metrics", str(path)])
        return write_json(path, data, *a, **k)

    def build(*a, **k):
        trainers.append(build_trainer(*a, **k))
        return trainers[-1]

    peft.PeftModel.save_pretrained = save
    deeper.metrics.write_json = write  # before the module imports it by name
    deeper.train.build_trainer = build
    code = 0
    sys.argv = [module, *args]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        if trainers:
            state = get_peft_model_state_dict(trainers[-1].model, adapter_name="default")
            record["lora_sha256"] = lora_digest(state)
        record["exit_code"] = code
        out = Path(os.environ["DEEPER_PROBE_DIR"])
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    return code


if __name__ == "__main__":
    sys.exit(main())

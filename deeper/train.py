"""DPO with a LoRA adapter and an SFT term on the chosen answer (paper Sec. 3.4): L = L_DPO + alpha * L_SFT.

TRL 1.16 DPOTrainer, sigmoid loss; the SFT term is normalised as `train.sft_normalization` says:
- per_token: TRL's own `loss_type=["sigmoid", "sft"]`, `loss_weights=[1.0, alpha]` (`rpo_alpha` is gone since
  TRL 0.29): one mean negative log-likelihood over all chosen completion tokens of the batch (pooled).
- per_pair: what the authors' LLaMA-Factory DPO trainer computes (`sft_loss = -chosen_logps / chosen_length`,
  then the mean over the batch): each pair's chosen NLL divided by its own token count, averaged over pairs
  (`PerPairSFTDPOTrainer`). The two coincide for batches of one pair (the embedded default); with the paper's
  4 pairs per device a long chosen answer weighs more under per_token.
The dataset is conversational (prompt = the refine chat, chosen/rejected = one assistant message), so the
model's chat template is applied.

The DPO reference model (nothing is loaded twice; the base weights are shared):
- iteration 1 (a fresh adapter): TRL disables the adapter -> the base model.
- iteration 2 continues from Model 1's adapter (`init_adapter`); `reference` chooses
  - "base": the adapter-1 weights are loaded into a fresh adapter made by TRL from the same LoRA config, so
    TRL again disables the adapter for the reference -> the base model (as the authors' LLaMA-Factory run had it).
  - "previous": the model is passed to TRL as a PeftModel with adapter 1 trainable; TRL 1.16 then copies it
    into a frozen adapter named "ref" and uses that for the reference -> Model 1 (base + adapter 1).
    The "ref" copy's LoRA dropout is switched off so the reference is deterministic in train mode.

TRL keeps every completion token up to `max_length` (prompt + completion; `keep_start` cuts the completion's
end) and drops pairs whose prompt alone fills `max_length`; both are counted and reported.

The returned summary (the stage's metrics) holds only what the run's inputs decide; the wall-clock seconds
and peak memory are printed on one line and written to `train_log.json` in the adapter folder, which the repo's
.dvcignore keeps out of the folder's DVC hash. With `adapter_config.json` written in a fixed order too, a re-run
that trains the same weights gives the same hash, so DVC does not re-run what follows.

Several processes (`accelerate launch --multi_gpu --num_processes N -m stages.train`, params `train.launcher`):
the Trainer runs DDP, each process sees 1/N of every global batch (global batch = per_device_batch x grad_accum
x N) and the logged losses and rewards are averaged over processes. Only the main process (rank 0) writes the
adapter (and, in stages.train, the metrics); every process returns the same summary keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pandas as pd

from deeper.config import get
from deeper.errors import ConfigError, DeeperError, InputError
from deeper.metrics import write_json
from deeper.outputs import replacing
from deeper.params import NumberRule, number
from deeper.tables import first_bad_row, read_parquet_checked

REFERENCES = ("base", "previous")
SFT_NORMALIZATIONS = ("per_token", "per_pair")  # see the module docstring
PAIR_COLUMNS = ("context_id", "prompt", "chosen", "rejected", "split")  # what training reads of pairs.parquet
TRAIN_LOG = "train_log.json"  # in the adapter folder: wall-clock seconds and peak RSS of the run
# Keys of params `train` that are not trainer settings: the command that starts the stage (dvc.yaml's cmd).
NOT_TRAINER_KEYS = ("launcher",)


def is_main_process() -> bool:
    """True in the process that writes files: the only one, or rank 0 of `accelerate launch` / torchrun."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class TrainConfig:
    # Paper values (Table 12, LLaMA-Factory) in the comments; defaults here fit a 2-core CPU in minutes.
    lora_r: int = 16  # paper 16
    lora_alpha: int = 32  # paper 32
    lora_dropout: float = 0.2  # paper 0.2
    target_modules: str | list = "all-linear"  # paper: all linear layers
    beta: float = 0.2  # paper 0.2 (sigmoid loss)
    sft_weight: float = 0.1  # alpha, top-level param; paper 0.1
    max_length: int = 768  # prompt + completion tokens; paper 2048
    truncation_mode: str = "keep_start"  # the only mode TRL 1.16 supports without deprecation
    per_device_batch: int = 1  # paper 4
    grad_accum: int = 2  # paper 8
    lr: float = 1e-4  # paper 5e-6
    scheduler: str = "cosine"  # paper cosine
    warmup_steps: int = 0  # paper 250
    epochs: float = 1.0  # paper 4
    max_steps: int = 6  # > 0 overrides epochs; paper: -1 (epochs)
    eval_steps: int | None = None  # paper 100; null: evaluate once at the end
    checkpoint_steps: int | None = (
        None  # save a resumable checkpoint every N steps (null: none; see train_dpo)
    )
    max_grad_norm: float = 1.0  # paper 1.0
    bf16: bool = False  # paper true (GPU); CPU autocast to bf16 is slow
    dtype: str = "float32"  # weights as loaded; bfloat16 halves memory on a GPU
    gradient_checkpointing: bool = True
    precompute_ref_log_probs: bool = (
        False  # TRL: the reference forward once per pair before training, not per step
    )
    disable_dropout: bool = False  # TRL's default (true) would also zero the LoRA dropout above; the paper
    # profile sets true: LLaMA-Factory's DPO trainer did, so 0.2 never ran
    sft_normalization: str = (
        "per_token"  # per_pair: LLaMA-Factory's (the paper profile); see the module docstring
    )
    seed: int = 0

    @classmethod
    def from_params(cls, params: dict, iteration: int = 1) -> TrainConfig:
        """`train` (+ `iter2.train` overrides for iteration 2) and the top-level `alpha`."""
        raw = get(params, "train")
        overrides: dict = {}
        if iteration == 2:
            overrides = get(params, "iter2.train", None) or {}
        for key, value in (("train", raw), ("iter2.train", overrides)):
            if not isinstance(value, dict):
                raise ConfigError(key, f"must be a mapping, got {value!r}")
        if "launcher" in overrides:
            raise ConfigError(
                "iter2.train.launcher", "both iterations start with train.launcher; set it there"
            )
        for key in CONTINUED_KEYS:
            if key in overrides:
                raise ConfigError(
                    f"iter2.train.{key}",
                    "cannot take effect: iteration 2 continues Model 1's adapter, "
                    "whose LoRA shape and dropout are set by train.lora",
                )
        raw = {k: v for k, v in {**raw, **overrides}.items() if k not in NOT_TRAINER_KEYS}
        lora = raw.pop("lora", None) or {}
        if not isinstance(lora, dict):
            raise ConfigError("train.lora", f"must be a mapping, got {lora!r}")
        known = {f.name for f in fields(cls)}
        values = {f"lora_{k}" if k in ("r", "alpha", "dropout") else k: v for k, v in lora.items()}
        values.update(raw)
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError("train", f"unknown keys {unknown}")
        values["sft_weight"] = get(params, "alpha")
        config = cls(
            **{
                name: number(value, _param_key(name), **NUMBER_RULES[name]) if name in NUMBER_RULES else value
                for name, value in values.items()
            }
        )
        config.validate()
        return config

    def validate(self) -> None:
        for name, rule in NUMBER_RULES.items():
            number(getattr(self, name), _param_key(name), **rule)
        if self.truncation_mode != "keep_start":
            raise ConfigError(
                "train.truncation_mode", "TRL 1.16 supports only keep_start (keep_end is deprecated)"
            )
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                "train.scheduler", f"must be one of {', '.join(SCHEDULERS)}, got {self.scheduler!r}"
            )
        modules = self.target_modules
        if not (isinstance(modules, str) and modules) and not (
            isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)
        ):
            raise ConfigError(
                "train.lora.target_modules", f"must be all-linear or a list of module names, got {modules!r}"
            )
        for name in ("bf16", "gradient_checkpointing", "precompute_ref_log_probs", "disable_dropout"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"train.{name}", f"must be true or false, got {getattr(self, name)!r}")
        if self.sft_normalization not in SFT_NORMALIZATIONS:
            raise ConfigError(
                "train.sft_normalization",
                f"must be one of {', '.join(SFT_NORMALIZATIONS)}, got {self.sft_normalization!r}",
            )
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("train.dtype", f"must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.max_steps and self.max_steps > 0) and not self.epochs > 0:
            raise ConfigError("train.max_steps", "set max_steps > 0 or epochs > 0")


# The numeric trainer settings and their ranges (deeper.params.number); lora_* are params train.lora.*.
NUMBER_RULES: dict[str, NumberRule] = {
    "lora_r": {"integer": True, "low": 1},
    "lora_alpha": {"low": 0.0, "low_open": True},
    "lora_dropout": {"low": 0.0, "high": 1.0, "high_open": True},
    "beta": {"low": 0.0, "low_open": True},
    "sft_weight": {"low": 0.0},
    "max_length": {"integer": True, "low": 16},
    "per_device_batch": {"integer": True, "low": 1},
    "grad_accum": {"integer": True, "low": 1},
    "lr": {"low": 0.0, "low_open": True},
    "warmup_steps": {"integer": True, "low": 0},
    "epochs": {"low": 0.0},
    "max_steps": {"integer": True, "low": -1},  # -1 (or 0): train `epochs` epochs
    "eval_steps": {"integer": True, "low": 1, "nullable": True},
    "checkpoint_steps": {"integer": True, "low": 1, "nullable": True},
    "max_grad_norm": {"low": 0.0, "low_open": True},
    "seed": {"integer": True, "low": 0},
}
# transformers' SchedulerType values (checked here so a typo fails before a model is loaded)
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
)
# iteration 2 continues adapter 1: its LoRA shape (and dropout, stored in its config) is adapter 1's
CONTINUED_KEYS = ("lora",)


def _param_key(name: str) -> str:
    return (
        "alpha"
        if name == "sft_weight"
        else f"train.lora.{name[5:]}"
        if name.startswith("lora_")
        else f"train.{name}"
    )


def read_pairs(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The pair stage's output split into (train, val) pairs; InputError (file, row) if unusable."""
    path = Path(path)
    pairs = read_parquet_checked(path, PAIR_COLUMNS, "run the pair stage first (`dvc repro`)")
    bad = ~pairs["split"].isin(["train", "val"])
    if bad.any():
        raise InputError(
            path, f"split must be train or val, got {pairs['split'][bad].iloc[0]!r}", first_bad_row(bad)
        )
    straddling = pairs.groupby("context_id")["split"].nunique()
    if (straddling > 1).any():
        raise InputError(
            path, f"context {straddling[straddling > 1].index[0]!r} has pairs in both train and val"
        )
    return pairs[pairs["split"] == "train"], pairs[pairs["split"] == "val"]


def pairs_to_examples(pairs: pd.DataFrame, source: str) -> list[dict]:
    """Rows (prompt as chat JSON, chosen, rejected texts) -> TRL conversational preference examples."""
    missing = [c for c in ("prompt", "chosen", "rejected") if c not in pairs.columns]
    if missing:
        raise InputError(source, f"missing columns {missing}; have {list(pairs.columns)}")
    examples = []
    for i, (prompt, chosen, rejected) in enumerate(
        zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]), 1
    ):
        try:
            messages = json.loads(prompt)
        except (TypeError, json.JSONDecodeError):
            raise InputError(source, "prompt is not chat-messages JSON", i) from None
        if not (
            isinstance(messages, list)
            and messages
            and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise InputError(source, "prompt must be a non-empty JSON list of {role, content} messages", i)
        if messages[-1]["role"] != "user":
            raise InputError(
                source, f"prompt must end with a user message, ends with {messages[-1]['role']!r}", i
            )
        for name, text in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(text, str) or not text.strip():
                raise InputError(source, f"{name} is empty", i)
        examples.append(
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in messages],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        )
    return examples


def length_counts(dataset, max_length: int) -> dict:
    """Over a dataset tokenized by TRL (prompt_ids, chosen_ids, rejected_ids): pairs whose longer sequence
    exceeds max_length (their completion end is cut) and the longest sequence."""
    longest, truncated = 0, 0
    for p, c, r in zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"]):
        n = len(p) + max(len(c), len(r))
        longest = max(longest, n)
        truncated += n > max_length
    return {"truncated": int(truncated), "longest_tokens": int(longest)}


def build_trainer(
    base_model: str | Path,
    train_examples: list[dict],
    val_examples: list[dict],
    config: TrainConfig,
    work_dir: str | Path,
    init_adapter: str | Path | None = None,
    reference: str = "base",
):
    """A ready DPOTrainer (see the module docstring for the reference model)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeftConfig, PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    from trl import DPOConfig

    if reference not in REFERENCES:
        raise ConfigError("iter2.reference", f"must be one of {list(REFERENCES)}, got {reference!r}")
    if not train_examples:
        raise DeeperError("no training pairs: nothing to train on (see the pair stage's metrics)")
    try:
        args = _dpo_config(config, work_dir, DPOConfig, with_eval=bool(val_examples))
    except ValueError as e:  # e.g. bf16 without a GPU: checked before an 8B model is loaded
        message = " ".join(str(e).split())
        raise ConfigError("train.bf16" if "bf16" in message else "train", message) from None
    base_model = str(base_model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base_model)
        model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(
            base_model, dtype=getattr(torch, config.dtype)
        )
    except OSError as e:
        raise ConfigError(
            "models.policy.name", f"cannot load {base_model}: {str(e).splitlines()[0]}"
        ) from None
    lora: LoraConfig | None = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    load_after = None
    if init_adapter is not None:
        init_adapter = Path(init_adapter)
        if not (init_adapter / "adapter_config.json").is_file():
            raise InputError(init_adapter, "not a LoRA adapter folder (adapter_config.json missing)")
        if reference == "previous":
            # TRL copies the trainable "default" adapter into a frozen "ref" adapter: reference = Model 1.
            model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
            lora = None
        else:
            # Same LoRA shape as adapter 1 (continuing needs it); weights are loaded once TRL made the adapter.
            lora = PeftConfig.from_pretrained(str(init_adapter))
            lora.inference_mode = False
            load_after = init_adapter
    train_ds = Dataset.from_list(train_examples)
    val_ds = Dataset.from_list(val_examples) if val_examples else None
    trainer = _trainer_class(config)(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=val_ds,
        processing_class=tokenizer,
        peft_config=lora,
    )
    if load_after is not None:
        _load_adapter_weights(trainer.model, load_after)
    if init_adapter is not None and reference == "previous":
        _freeze_reference_dropout(trainer.model)
    return trainer


def _dpo_config(config: TrainConfig, work_dir, DPOConfig, with_eval: bool):
    return DPOConfig(
        output_dir=str(work_dir),
        # per_pair adds its SFT term itself (PerPairSFTDPOTrainer)
        loss_type=["sigmoid", "sft"] if config.sft_normalization == "per_token" else ["sigmoid"],
        loss_weights=[1.0, config.sft_weight] if config.sft_normalization == "per_token" else [1.0],
        beta=config.beta,
        max_length=config.max_length,
        truncation_mode=config.truncation_mode,
        per_device_train_batch_size=config.per_device_batch,
        per_device_eval_batch_size=config.per_device_batch,
        gradient_accumulation_steps=config.grad_accum,
        gradient_checkpointing=config.gradient_checkpointing,
        precompute_ref_log_probs=config.precompute_ref_log_probs,
        learning_rate=config.lr,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_steps,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps and config.max_steps > 0 else -1,
        max_grad_norm=config.max_grad_norm,
        bf16=config.bf16,
        seed=config.seed,
        data_seed=config.seed,
        disable_dropout=config.disable_dropout,
        eval_strategy="steps" if (config.eval_steps and with_eval) else "no",
        eval_steps=config.eval_steps or None,
        logging_steps=1,
        report_to="none",
        dataloader_pin_memory=False,
        # checkpoints (train_dpo's checkpoint_dir): the latest one only, everything the Trainer needs to resume
        save_strategy="steps" if config.checkpoint_steps else "no",
        save_steps=config.checkpoint_steps or 500,
        save_total_limit=1,
        # DDP (several processes): every LoRA weight gets a gradient, so no search for unused ones per step.
        ddp_find_unused_parameters=False,
    )


def per_pair_sft_loss(log_probs, completion_mask):
    """LLaMA-Factory's SFT term of DPO+SFT: the mean over pairs of -(summed log-prob of the chosen completion) /
    (its token count). `log_probs`: the policy's per-token log-probs of the batch [chosen..., rejected...] as
    TRL's forward returns them (aligned with completion_mask[:, 1:]); `completion_mask`: TRL's batch key."""
    shifted = completion_mask[..., 1:]
    per_token = log_probs[:, -shifted.size(1) :] * shifted
    chosen_logps, _ = per_token.sum(dim=1).chunk(2, dim=0)
    chosen_length, _ = shifted.sum(dim=1).chunk(2, dim=0)
    return (-chosen_logps / chosen_length.clamp(min=1)).mean()


class _RecordingModel:
    """Calls the policy model and keeps its first output of the step (TRL's policy forward)."""

    def __init__(self, model):
        self.model, self.outputs = model, None

    def __call__(self, *args, **kwargs):
        outputs = self.model(*args, **kwargs)
        if self.outputs is None:
            self.outputs = outputs
        return outputs


def _trainer_class(config: TrainConfig):
    from trl import DPOTrainer

    if config.sft_normalization == "per_token":
        return DPOTrainer

    class PerPairSFTDPOTrainer(DPOTrainer):
        """TRL's sigmoid DPO + alpha x `per_pair_sft_loss` on the policy's own forward of the step (no extra
        pass): TRL's `_compute_loss` calls the policy through its `model` argument and the reference through
        `self.model` / `self.ref_model`, so the recorded output is the policy's."""

        def _compute_loss(self, model, inputs, return_outputs):
            policy = _RecordingModel(model)
            result = super()._compute_loss(policy, inputs, return_outputs)
            loss = result[0] if return_outputs else result
            sft = per_pair_sft_loss(policy.outputs.log_probs, inputs["completion_mask"])
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["sft_per_pair"].append(
                self.accelerator.gather_for_metrics(sft.detach()).mean().item()
            )
            loss = loss + config.sft_weight * sft
            return (loss, result[1]) if return_outputs else loss

    return PerPairSFTDPOTrainer


def _load_adapter_weights(model, adapter_dir: Path) -> None:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(adapter_dir, "adapter_model.safetensors missing")
    # torch's _IncompatibleKeys (missing_keys, unexpected_keys); peft annotates it as `namedtuple`, not a type
    result: Any = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name="default")
    missing_lora = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing_lora:
        raise InputError(
            weights,
            f"adapter does not fit the model: unexpected {result.unexpected_keys[:3]}, "
            f"missing {missing_lora[:3]}",
        )


def _freeze_reference_dropout(model) -> None:
    import torch

    if "ref" not in model.peft_config:
        raise DeeperError(
            "TRL did not create the 'ref' adapter for reference=previous (TRL version changed?)"
        )
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and name.endswith(".ref"):
            module.p = 0.0


# What the training curves hold (TRL's logged names, train and eval_): the run's inputs decide every value, so the
# curves are the same bytes on a re-run; wall-clock keys (train_runtime, *_per_second) are left out.
CURVE_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "sft_per_pair",
)


def curve_name(key: str) -> str | None:
    """TRL's logged key -> the DVCLive metric name (`train/...` or `eval/...`), None for keys the curves leave out."""
    split, name = ("eval", key[len("eval_") :]) if key.startswith("eval_") else ("train", key)
    return f"{split}/{name}" if name in CURVE_KEYS else None


def training_curves(directory: str | Path):
    """transformers' DVCLive integration (DVCLiveCallback), writing `<directory>/plots/metrics/{train,eval}/...tsv`
    (columns step and value, one row per logged optimizer step: `dvc plots` of the train stage) and nothing else:
    no params file (params.yaml has them; the trainer's arguments hold a temporary folder), no summary (the stage's
    metrics file is the summary), no timestamps. Rows are written as they are logged, so `dvc plots show` follows
    a run in progress. The Live object is made in the main process only (its constructor empties the folder)."""
    from dvclive import Live
    from transformers.integrations import DVCLiveCallback

    class TrainingCurves(DVCLiveCallback):
        def setup(self, args, state, model):
            self._initialized = True  # DVCLiveCallback would log the trainer's arguments as params

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            # resumed from a checkpoint (train_dpo): its log history holds the rows before it, written again
            # here, so the curves of a resumed run are those of an uninterrupted one
            if state.is_world_process_zero:
                for entry in state.log_history:
                    self._write(entry.get("step", 0), entry)

        def on_log(self, args, state, control, model=None, logs=None, **kwargs):
            if state.is_world_process_zero:
                self._write(state.global_step, logs or {})

        def _write(self, step: int, logs: dict) -> None:
            assert self.live is not None  # made with live= (below)
            self.live.step = step  # train and eval rows of one optimizer step share its number
            for key, value in logs.items():
                name = curve_name(key)
                if name is not None and value is not None:
                    self.live.log_metric(name, float(value))

        def on_train_end(self, args, state, control, **kwargs):
            pass  # the final evaluation logs after training; Live.end would write a summary file

    class CurvesOnly(Live):
        """Live without its DVC integration, which the curves do not use (no experiment, no dvc.yaml): dvclive
        3.49.1 probes git there and fails in a repository without a commit (`scm.get_rev()` before its own
        `no_commits` check: SCMError "Empty git repo", seen in tests/test_train_ddp.py's fresh scratch repo)."""

        def _init_dvc(self):
            pass

    return TrainingCurves(live=CurvesOnly(str(directory), save_dvc_exp=False, dvcyaml=None, report=None))


def _world_size() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def _logged_at(history: list[dict], step: int, key: str) -> dict | None:
    """The log entry of `step` that holds `key` (e.g. the Trainer's own evaluation at the last step), or None."""
    for entry in reversed(history):
        if entry.get("step") == step and key in entry:
            return entry
    return None


def _last_logged(history: list[dict], key: str):
    for entry in reversed(history):
        if key in entry:
            return entry[key]
    return None


def _write_train_log(folder: Path, started: float, out_dir: str | Path) -> dict:
    """Wall-clock seconds and peak memory: printed on one line and written to train_log.json in the adapter
    `folder` being built for `out_dir`, not into the metrics (they differ on every run and would make
    `dvc metrics diff` noisy)."""
    log = {
        "seconds": time.monotonic() - started,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    write_json(Path(folder) / TRAIN_LOG, log)
    print(
        f"train: {log['seconds']:.1f} s, peak RSS {log['peak_rss_mb']:.0f} MB "
        f"(in {Path(out_dir) / TRAIN_LOG})",
        flush=True,
    )
    return log


def save_adapter(model, out_dir: Path, base_name: str | None = None, **kwargs) -> None:
    """`model.save_pretrained`, then adapter_config.json with sorted keys and `target_modules`: peft writes the
    modules from a set, whose order follows each process's string hash seed, so the same adapter would get a
    new file (and DVC hash) on every run. `base_name` (the params name of the base model) replaces the folder
    the weights were loaded from: an `embedded:` model loads from $DEEPER_CACHE_DIR, which differs per machine."""
    model.save_pretrained(str(out_dir), **kwargs)
    path = Path(out_dir) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if base_name is not None:
        config["base_model_name_or_path"] = base_name
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_carried_over(base_model, out_dir: Path, config: TrainConfig, init_adapter, base_name=None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    if init_adapter is not None:
        for item in Path(init_adapter).iterdir():
            if item.is_file():
                shutil.copy2(item, out_dir / item.name)
        return
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=getattr(torch, config.dtype))
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=config.target_modules,
        task_type="CAUSAL_LM",
        bias="none",
    )
    # LoRA A starts random (B is zero, so the model is unchanged): seeded, the carried-over adapter has the same
    # bytes on every run and machine, so its DVC hash and the response-cache keys that hold it stay put
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora)
    save_adapter(peft_model, out_dir, base_name)


def run_key(
    base_model,
    train_examples: list[dict],
    val_examples: list[dict],
    config: TrainConfig,
    init_adapter,
    reference: str,
) -> str:
    """A checkpoint folder's name: the hash of everything that decides the run (a checkpoint of other inputs is
    never resumed). The adapter to continue counts by its bytes, the base model by its location."""
    digest = hashlib.sha256()
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name != "checkpoint_steps"}
    digest.update(
        json.dumps(
            [str(base_model), train_examples, val_examples, settings, reference], sort_keys=True, default=str
        ).encode()
    )
    if init_adapter is not None:
        for item in sorted(Path(init_adapter).iterdir()):
            if item.is_file() and item.name != TRAIN_LOG:
                digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()[:16]


def latest_checkpoint(work_dir) -> Path | None:
    """The Trainer's latest complete checkpoint in work_dir (`checkpoint-<step>` holding its trainer_state.json,
    which the Trainer writes last), or None."""
    done = [
        p
        for p in Path(work_dir).glob("checkpoint-*")
        if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()
    ]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)


def usable_checkpoint(work_dir) -> Path | None:
    """latest_checkpoint, if its adapter weights, optimizer and trainer state read back; a damaged one (a disk
    filled or a file cut while it was written) is one warning line and removed, and the run starts from step 0
    instead of failing."""
    import torch
    from safetensors.torch import load_file

    checkpoint = latest_checkpoint(work_dir)
    if checkpoint is None:
        return None
    try:
        json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        load_file(str(checkpoint / "adapter_model.safetensors"))
        torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reason it cannot be read is the same: it cannot be resumed
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        print(
            f"warning: {checkpoint}: damaged checkpoint ({reason}); removed, training from step 0", flush=True
        )
        shutil.rmtree(checkpoint, ignore_errors=True)
        return None
    return checkpoint


def _no_curves(directory: Path) -> None:
    """The curves folder of a run without training pairs: one note instead of curves (the folder is a DVC output)."""
    with replacing(directory, folder=True) as building:
        (building / "untrained.txt").write_text(
            "no training pairs: the model was carried over untrained, no curves\n", encoding="utf-8"
        )


def _carry_over(
    base_model,
    out_dir,
    config: TrainConfig,
    init_adapter,
    reference: str,
    val_pairs: int,
    started: float,
    base_name: str | None = None,
) -> dict:
    """No training pairs: the output adapter is the input model (adapter 1, or a fresh LoRA whose B is zero).
    Written by the main process only."""
    if is_main_process():  # the whole folder or none: a kill or a full disk leaves no half adapter
        with replacing(out_dir, folder=True) as building:
            _write_carried_over(base_model, building, config, init_adapter, base_name)
            _write_train_log(building, started, out_dir)
    none = {
        "loss": None,
        "reward_accuracy": None,
        "reward_margin": None,
        "reward_chosen": None,
        "reward_rejected": None,
    }
    return {
        "trained": False,
        "pairs": {"train": 0, "val": val_pairs},
        "dropped_prompt_too_long": {"train": 0, "val": 0},
        "truncated_pairs": {"train": 0},
        "longest_tokens": 0,
        "max_length": config.max_length,
        "steps": 0,
        "epochs": 0.0,
        "processes": _world_size(),
        "train": {
            "loss_mean": None,
            "loss_last": None,
            "reward_accuracy_last": None,
            "reward_margin_last": None,
            "reward_chosen_last": None,
            "reward_rejected_last": None,
        },
        "eval": none,
        "init_adapter": init_adapter is not None,
        "reference": reference if init_adapter is not None else "base",
    }


def train_dpo(
    base_model: str | Path,
    train_pairs: pd.DataFrame,
    val_pairs: pd.DataFrame,
    out_dir: str | Path,
    config: TrainConfig,
    init_adapter: str | Path | None = None,
    reference: str = "base",
    source: str = "pairs",
    base_name: str | None = None,
    curves_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
    callbacks: tuple = (),
) -> dict:
    """Train, save the adapter (safetensors) to out_dir and return the summary for metrics. `base_model` is
    where the weights load from; `base_name`, if given, is the name written in adapter_config.json; `curves_dir`,
    if given, gets the training curves (`training_curves`).

    Resumable (`train.checkpoint_steps` and a `checkpoint_dir`): the Trainer saves a checkpoint (adapter,
    optimizer, scheduler, RNG states) every checkpoint_steps steps in `checkpoint_dir/<run_key>`; a run killed
    midway and started again with the same inputs resumes from the latest one, and the folder is removed once
    the adapter is written. `callbacks`: extra TrainerCallbacks (the tests interrupt a run with one)."""
    started = time.monotonic()
    train_examples = pairs_to_examples(train_pairs, source)
    val_examples = pairs_to_examples(val_pairs, source)
    if not train_examples:
        # A knob such as -S delta=0.8 can leave no pair. The DAG must still run to the evaluation, so the
        # model is carried over untrained (reported as steps 0, trained false) instead of failing the stage.
        if curves_dir is not None and is_main_process():
            _no_curves(Path(curves_dir))
        return _carry_over(
            base_model, out_dir, config, init_adapter, reference, len(val_examples), started, base_name
        )
    resumable = config.checkpoint_steps is not None and checkpoint_dir is not None
    work_context: contextlib.AbstractContextManager[str]
    if resumable:
        assert checkpoint_dir is not None  # resumable implies it (above)
        work = Path(checkpoint_dir) / run_key(
            base_model, train_examples, val_examples, config, init_adapter, reference
        )
        work.mkdir(parents=True, exist_ok=True)
        work_context = contextlib.nullcontext(str(work))
    else:
        work_context = tempfile.TemporaryDirectory(prefix="deeper-train-")
    with work_context as work_dir, warnings.catch_warnings():
        # transformers 5 renamed gradient_checkpointing; TRL 1.16 still uses the old name on every step.
        warnings.filterwarnings(
            "ignore", message=".*gradient_checkpointing.* is deprecated", category=FutureWarning
        )
        trainer = build_trainer(
            base_model, train_examples, val_examples, config, work_dir, init_adapter, reference
        )
        for callback in callbacks:
            trainer.add_callback(callback)
        if curves_dir is not None and trainer.is_world_process_zero():
            trainer.add_callback(training_curves(curves_dir))
        train_ds, val_ds = trainer.train_dataset, trainer.eval_dataset
        dropped = {
            "train": len(train_examples) - len(train_ds),
            "val": len(val_examples) - (len(val_ds) if val_ds is not None else 0),
        }
        if len(train_ds) == 0:
            raise ConfigError("train.max_length", f"every training prompt is >= {config.max_length} tokens")
        lengths = {"train": length_counts(train_ds, config.max_length)}
        if val_ds is not None and len(val_ds):
            lengths["val"] = length_counts(val_ds, config.max_length)
        resume_from = usable_checkpoint(work_dir) if resumable else None
        if resume_from is not None and is_main_process():
            print(f"train: resuming from {resume_from} (step {resume_from.name.split('-')[-1]})", flush=True)
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        history = trainer.state.log_history
        final_eval: dict = {}
        if val_ds is not None and len(val_ds):
            # with eval_steps, the Trainer evaluates at the last step itself: once is enough (and one curve row)
            final_eval = _logged_at(history, trainer.state.global_step, "eval_loss") or trainer.evaluate()
        if trainer.is_world_process_zero():  # several processes hold the same adapter: one writes it
            # the whole folder or none: a kill or a full disk leaves no half adapter for the next stage
            with replacing(out_dir, folder=True) as building:
                save_adapter(trainer.model, building, base_name, selected_adapters=["default"])
                _write_train_log(building, started, out_dir)
            if resumable:
                shutil.rmtree(work_dir, ignore_errors=True)  # done: nothing to resume
    summary = {
        "trained": True,
        "pairs": {"train": len(train_examples), "val": len(val_examples)},
        "dropped_prompt_too_long": dropped,
        "truncated_pairs": {k: v["truncated"] for k, v in lengths.items()},
        "longest_tokens": max(v["longest_tokens"] for v in lengths.values()),
        "max_length": config.max_length,
        "steps": int(trainer.state.global_step),
        "epochs": float(trainer.state.epoch or 0.0),
        "processes": int(trainer.args.world_size),
        "train": {
            "loss_mean": float(output.training_loss),
            "loss_last": _last_logged(history, "loss"),
            "reward_accuracy_last": _last_logged(history, "rewards/accuracies"),
            "reward_margin_last": _last_logged(history, "rewards/margins"),
            "reward_chosen_last": _last_logged(history, "rewards/chosen"),
            "reward_rejected_last": _last_logged(history, "rewards/rejected"),
        },
        "eval": {
            "loss": final_eval.get("eval_loss"),
            "reward_accuracy": final_eval.get("eval_rewards/accuracies"),
            "reward_margin": final_eval.get("eval_rewards/margins"),
            "reward_chosen": final_eval.get("eval_rewards/chosen"),
            "reward_rejected": final_eval.get("eval_rewards/rejected"),
        },
        "init_adapter": init_adapter is not None,
        "reference": reference if init_adapter is not None else "base",
    }
    return summary

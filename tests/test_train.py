"""DPO + LoRA + SFT training on the tiny random Llama: what is trained, the loss, the reference model, lengths."""

import json
import math
from typing import ClassVar

import pandas as pd
import pytest
import torch
import yaml
from click.testing import CliRunner
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from deeper.config import load_params
from deeper.errors import ConfigError, InputError
from deeper.train import TrainConfig, build_trainer, pairs_to_examples, train_dpo
from tests.conftest import REPO

PROMPT = json.dumps(
    [
        {"role": "system", "content": "Refine the persona."},
        {
            "role": "user",
            "content": "Persona: a curious reader who rates mysteries highly. Predicted rating 3, actual rating 5.",
        },
    ]
)
CHOSEN = "The user enjoys thoughtful dramas and dislikes loud action films."
# Fast settings for the tiny model: a high learning rate so that a few steps visibly move the adapter.
FAST = {
    "max_steps": 2,
    "per_device_batch": 2,
    "grad_accum": 1,
    "lr": 1e-2,
    "warmup_steps": 0,
    "max_length": 256,
}


def make_pairs(n=8, chosen=None):
    return pd.DataFrame(
        {
            "context_id": [f"c{i}" for i in range(n)],
            "prompt": PROMPT,
            "chosen": [chosen or f"{CHOSEN} {i}" for i in range(n)],
            "rejected": [f"Toy Story (1995), Fargo (1996) {i}" for i in range(n)],
        }
    )


def completion_logps(model, batch):
    """Sum of log p(token) over the completion tokens, computed directly (no TRL): (chosen, rejected)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logps * batch["completion_mask"][:, 1:]).sum(-1).chunk(2)


@pytest.fixture(scope="module")
def model_1(tiny_llama, tmp_path_factory):
    """Iteration 1 through the public entry point: the adapter folder and the summary."""
    out = tmp_path_factory.mktemp("it1") / "adapter"
    summary = train_dpo(
        tiny_llama, make_pairs(8), make_pairs(2), out, TrainConfig(**{**FAST, "max_steps": 3})
    )
    return out, summary


def test_iteration_1_saves_a_trained_adapter_and_a_summary(model_1):
    out, summary = model_1
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".safetensors")) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_log.json",
    ]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (16, 32, 0.2)
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # LoRA B starts at zero: all were trained
    assert not any(".ref." in k for k in weights)
    assert summary["steps"] == 3 and summary["pairs"] == {"train": 8, "val": 2}
    assert summary["reference"] == "base" and summary["init_adapter"] is False
    for key in ("loss", "reward_accuracy", "reward_margin", "reward_chosen", "reward_rejected"):
        assert isinstance(summary["eval"][key], float)
    assert summary["train"]["loss_last"] is not None and summary["truncated_pairs"] == {"train": 0, "val": 0}
    # wall-clock time and memory change on every run: in the adapter folder's train_log.json, not the metrics
    assert "seconds" not in summary and "peak_rss_mb" not in summary
    log = json.loads((out / "train_log.json").read_text())
    assert set(log) == {"seconds", "peak_rss_mb"} and log["peak_rss_mb"] > 0 and log["seconds"] > 0


def test_only_the_adapter_learns_and_the_sft_term_is_in_the_loss(tiny_llama, tmp_path):
    # Every pair has the same prompt and chosen text, so the first batch's SFT term is known in advance.
    pairs = make_pairs(4, chosen=CHOSEN)
    trainer = build_trainer(
        tiny_llama, pairs_to_examples(pairs, "p"), [], TrainConfig(**FAST, sft_weight=1.0), tmp_path
    )
    params = dict(trainer.model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    assert all(not v.requires_grad for k, v in params.items() if "lora_" not in k)
    trainer.train()
    lora_b = [k for k in params if "lora_B" in k]
    base = [k for k in params if "lora_" not in k]
    assert lora_b and all(not torch.equal(before[k], params[k]) for k in lora_b)
    assert base and all(torch.equal(before[k], params[k]) for k in base)
    # Step 1: the policy equals the reference (B = 0), so sigmoid DPO gives log 2 and the rest is
    # alpha (1.0) x the mean NLL of the chosen tokens under the base model.
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    base_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    with torch.no_grad():
        logits = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].bool()
    chosen_nll = -logps[:2][mask[:2]].mean().item()
    first_loss = trainer.state.log_history[0]["loss"]
    assert first_loss == pytest.approx(math.log(2) + chosen_nll, abs=1e-3)
    assert chosen_nll > 1.0  # the SFT term is not negligible here: without it the loss would be log 2


@pytest.mark.parametrize("normalization", ["per_token", "per_pair"])
def test_sft_term_is_normalised_per_token_or_per_pair_as_configured(tiny_llama, tmp_path, normalization):
    """Two pairs whose chosen answers differ in length (one batch, one step). At step 1 the policy is the
    reference (B = 0), so the loss is log 2 + the SFT term, computed here by hand from the base model's logits:
    per_token pools every chosen token of the batch (TRL's "sft"), per_pair averages each pair's
    -sum log p / length (LLaMA-Factory's `-chosen_logps / chosen_length`, then the batch mean)."""
    pairs = make_pairs(2)
    pairs.loc[0, "chosen"] = "Loves dramas."
    pairs.loc[1, "chosen"] = (
        CHOSEN + " She also reads long historical novels about the sea and its sailors every winter."
    )
    config = TrainConfig(**{**FAST, "max_steps": 1}, sft_weight=1.0, sft_normalization=normalization)
    trainer = build_trainer(tiny_llama, pairs_to_examples(pairs, "p"), [], config, tmp_path)
    trainer.train()
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tiny_llama)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits.double()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    mask = batch["completion_mask"][:, 1:].bool()
    lengths = mask[:2].sum(1)
    assert lengths[0] * 3 < lengths[1]  # the two normalisations differ only when the lengths do
    pooled = -logps[:2][mask[:2]].mean().item()
    per_pair = sum(-logps[i][mask[i]].sum().item() / lengths[i].item() for i in range(2)) / 2
    assert abs(pooled - per_pair) > 0.01
    expected = pooled if normalization == "per_token" else per_pair
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2) + expected, abs=1e-4)
    assert trainer.args.loss_type == (["sigmoid", "sft"] if normalization == "per_token" else ["sigmoid"])


def test_disable_dropout_zeroes_the_lora_dropout_as_llamafactory_did(tiny_llama, tmp_path):
    """TRL (like LLaMA-Factory's CustomDPOTrainer) disables dropout after the adapter is made, so the LoRA
    dropout of train.lora.dropout only acts when train.disable_dropout is false."""
    examples = pairs_to_examples(make_pairs(2), "p")
    for disable, p in ((False, 0.2), (True, 0.0)):
        model = build_trainer(
            tiny_llama, examples, [], TrainConfig(**FAST, disable_dropout=disable), tmp_path
        ).model
        dropouts = {
            m.p for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and "lora_dropout" in n
        }
        assert dropouts == {p}


@pytest.mark.parametrize("reference", ["base", "previous"])
def test_iteration_2_reference_is_base_or_model_1(tiny_llama, model_1, tmp_path, reference):
    adapter, _ = model_1
    trainer = build_trainer(
        tiny_llama,
        pairs_to_examples(make_pairs(4), "p"),
        [],
        TrainConfig(**FAST),
        tmp_path,
        init_adapter=adapter,
        reference=reference,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.model.train()  # as during training: LoRA dropout is active in the policy
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    base_chosen, base_rejected = completion_logps(AutoModelForCausalLM.from_pretrained(tiny_llama), batch)
    model1 = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_llama), str(adapter)
    ).merge_and_unload()
    m1_chosen, m1_rejected = completion_logps(model1, batch)
    assert (base_chosen - m1_chosen).abs().min() > 0.05  # the two references differ measurably
    expected = (base_chosen, base_rejected) if reference == "base" else (m1_chosen, m1_rejected)
    torch.testing.assert_close(ref_chosen, expected[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(ref_rejected, expected[1], atol=1e-4, rtol=1e-5)
    # whatever the reference, the policy starts as Model 1 (its adapter is loaded and trainable)
    policy_chosen, _ = completion_logps(trainer.model, batch)
    torch.testing.assert_close(policy_chosen, m1_chosen, atol=1e-4, rtol=1e-5)
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if ".default." in n)


def test_iteration_2_continues_model_1(tiny_llama, model_1, tmp_path):
    adapter, _ = model_1
    out = tmp_path / "it2"
    summary = train_dpo(
        tiny_llama,
        make_pairs(4),
        make_pairs(0),
        out,
        TrainConfig(**{**FAST, "max_steps": 1}),
        init_adapter=adapter,
        reference="previous",
    )
    assert summary["reference"] == "previous" and summary["eval"]["loss"] is None  # no val pairs: no eval
    before, after = (
        load_file(adapter / "adapter_model.safetensors"),
        load_file(out / "adapter_model.safetensors"),
    )
    assert set(before) == set(after)  # only the trained adapter is saved, not TRL's frozen "ref" copy
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert not (out / "ref").exists()


def test_long_pairs_are_counted_truncated_or_dropped(tiny_llama, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    pairs = make_pairs(4)
    pairs.loc[1, "chosen"] = "Toy Story (1995) " * 30
    pairs.loc[2, "rejected"] = "GoldenEye (1995) " * 30
    long_prompt = json.dumps([{"role": "user", "content": "Predicted rating 3, actual rating 5. " * 40}])
    pairs.loc[3, "prompt"] = long_prompt
    max_length = 100

    def length(messages, **kw):
        return len(
            tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]
        )

    examples = pairs_to_examples(pairs, "p")
    prompt_lengths = [length(e["prompt"], add_generation_prompt=True) for e in examples]
    full = [max(length(e["prompt"] + e["chosen"]), length(e["prompt"] + e["rejected"])) for e in examples]
    assert prompt_lengths[3] >= max_length > prompt_lengths[0]  # the case TRL drops
    expected_truncated = sum(f > max_length for f, p in zip(full, prompt_lengths) if p < max_length)
    assert expected_truncated == 2
    summary = train_dpo(
        tiny_llama,
        pairs,
        make_pairs(0),
        tmp_path / "a",
        TrainConfig(**{**FAST, "max_length": max_length, "max_steps": 1}),
    )
    assert summary["dropped_prompt_too_long"] == {"train": 1, "val": 0}
    assert summary["truncated_pairs"] == {"train": expected_truncated}
    assert summary["longest_tokens"] == max(f for f, p in zip(full, prompt_lengths) if p < max_length)


def test_config_from_params():
    params = load_params(REPO / "params.yaml")
    config = TrainConfig.from_params(params, 1)
    assert (config.lora_r, config.lora_alpha, config.lora_dropout, config.beta) == (16, 32, 0.2, 0.2)
    assert config.sft_weight == params["alpha"] and config.target_modules == "all-linear"
    params["train"]["lr"] = "1e-4"  # YAML reads this as a string
    params["iter2"]["train"] = {"max_steps": 3}
    assert TrainConfig.from_params(params, 1).lr == 1e-4
    assert (
        TrainConfig.from_params(params, 2).max_steps == 3
        and TrainConfig.from_params(params, 1).max_steps != 3
    )
    params["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="train.lr: must be a number"):
        TrainConfig.from_params(params, 1)
    params["train"]["lr"] = 1e-4
    params["train"]["optimiser"] = "sgd"
    with pytest.raises(ConfigError, match=r"train: unknown keys \['optimiser'\]"):
        TrainConfig.from_params(params, 1)


def test_bad_pair_rows_are_one_line_errors():
    pairs = make_pairs(3)
    pairs.loc[1, "prompt"] = "not json"
    with pytest.raises(InputError, match=r"^p.parquet:2: prompt is not chat-messages JSON$"):
        pairs_to_examples(pairs, "p.parquet")
    pairs = make_pairs(3)
    pairs.loc[2, "prompt"] = json.dumps([{"role": "assistant", "content": "x"}])
    with pytest.raises(InputError, match=r"^p.parquet:3: prompt must end with a user message"):
        pairs_to_examples(pairs, "p.parquet")
    pairs = make_pairs(3)
    pairs.loc[0, "rejected"] = " "
    with pytest.raises(InputError, match=r"^p.parquet:1: rejected is empty$"):
        pairs_to_examples(pairs, "p.parquet")


def test_stage_writes_adapter_and_metrics_and_reports_bad_input(tiny_llama, tmp_path):
    from stages.train import main

    params = load_params(REPO / "params.yaml")
    params["models"] = {"policy": {"backend": "transformers", "name": str(tiny_llama)}}
    params["train"].update(max_steps=1, per_device_batch=2, grad_accum=1)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    pairs = make_pairs(6).assign(split=["train"] * 5 + ["val"])
    pairs.to_parquet(tmp_path / "pairs.parquet")
    args = [
        "--params",
        str(tmp_path / "params.yaml"),
        "--pairs",
        str(tmp_path / "pairs.parquet"),
        "--out",
        str(tmp_path / "it1"),
        "--metrics",
        str(tmp_path / "train_it1.json"),
        "--curves",
        str(tmp_path / "curves"),
    ]  # never the repository's plots/train
    result = CliRunner().invoke(main, ["--iteration", "1", *args])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "it1" / "adapter_model.safetensors").is_file()
    metrics = json.loads((tmp_path / "train_it1.json").read_text())
    assert metrics["steps"] == 1 and metrics["pairs"] == {"train": 5, "val": 1}
    assert "seconds" not in metrics and "peak_rss_mb" not in metrics
    log = json.loads((tmp_path / "it1" / "train_log.json").read_text())
    assert f"train: {log['seconds']:.1f} s, peak RSS" in result.stdout  # one line on stdout
    assert isinstance(metrics["eval"]["loss"], float)

    pairs.loc[5, "context_id"] = "c0"  # c0 now has a train and a val pair
    pairs.to_parquet(tmp_path / "pairs.parquet")
    result = CliRunner().invoke(main, ["--iteration", "1", *args])
    assert result.exit_code == 1
    assert result.output.strip().endswith("pairs.parquet: context 'c0' has pairs in both train and val")
    result = CliRunner().invoke(main, ["--iteration", "2", "--init-adapter", str(tmp_path / "none"), *args])
    assert result.exit_code == 1 and "none: no LoRA adapter here" in result.output


def test_no_training_pairs_carries_the_model_over_untrained(tiny_llama, model_1, tmp_path):
    """-S delta=0.8 can leave no pair: the stage still writes an adapter (the input model) and says so."""
    empty = make_pairs(0)
    fresh = train_dpo(tiny_llama, empty, make_pairs(1), tmp_path / "it1", TrainConfig(**FAST))
    assert fresh["trained"] is False and fresh["steps"] == 0 and fresh["pairs"] == {"train": 0, "val": 1}
    weights = load_file(tmp_path / "it1" / "adapter_model.safetensors")
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() == 0 for v in lora_b)  # B = 0: exactly the base model

    adapter_1, _ = model_1
    carried = train_dpo(
        tiny_llama, empty, empty, tmp_path / "it2", TrainConfig(**FAST), init_adapter=adapter_1
    )
    assert carried["trained"] is False and carried["init_adapter"] is True
    assert (tmp_path / "it2" / "adapter_model.safetensors").read_bytes() == (
        adapter_1 / "adapter_model.safetensors"
    ).read_bytes()
    assert set(carried) == set(model_1[1])  # the metrics keep their shape
    assert set(json.loads((tmp_path / "it2" / "train_log.json").read_text())) == {"seconds", "peak_rss_mb"}


def test_train_launcher_is_not_a_trainer_setting():
    params = load_params(REPO / "params.yaml")
    assert params["train"]["launcher"] == "python"  # dvc.yaml: `${train.launcher} -m stages.train`
    params["train"]["launcher"] = "accelerate launch --multi_gpu --num_processes 4"
    assert TrainConfig.from_params(params, 2) == TrainConfig.from_params(load_params(REPO / "params.yaml"), 2)
    params["iter2"]["train"] = {"launcher": "python"}
    with pytest.raises(ConfigError, match="iter2.train.launcher: both iterations start with train.launcher"):
        TrainConfig.from_params(params, 2)


def test_a_process_other_than_the_main_one_writes_nothing(tiny_llama, tmp_path, monkeypatch):
    """Under `accelerate launch` every process runs the stage; RANK (set by the launcher) picks the writer.
    The trained path is tested for real in tests/test_train_ddp.py; here the carried-over one."""
    from stages.train import run

    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    make_pairs(0).assign(split=[]).to_parquet(tmp_path / "pairs.parquet")
    params = load_params(REPO / "params.yaml")
    params["models"] = {"policy": {"backend": "transformers", "name": str(tiny_llama)}}
    (tmp_path / "it1").mkdir()
    (tmp_path / "it1" / "stale.txt").write_text("from an earlier run")
    summary = run(params, 1, tmp_path / "pairs.parquet", None, tmp_path / "it1", tmp_path / "train_it1.json")
    assert summary["trained"] is False and summary["processes"] == 2
    assert [p.name for p in (tmp_path / "it1").iterdir()] == ["stale.txt"]  # rank 0 clears and writes it
    assert not (tmp_path / "train_it1.json").exists()
    monkeypatch.setenv("RANK", "0")
    run(params, 1, tmp_path / "pairs.parquet", None, tmp_path / "it1", tmp_path / "train_it1.json")
    assert sorted(
        p.name for p in (tmp_path / "it1").iterdir() if p.suffix != ".md" and p.name != "train_log.json"
    ) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "train_it1.json").read_text())["processes"] == 2


def read_curve(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [tuple(float(x) for x in line.split("\t")) for line in lines[1:]]


def test_training_curves_are_dvclive_files_one_row_per_step_same_bytes_on_a_rerun(tiny_llama, tmp_path):
    """DVCLive's per-step TSVs of the train and validation pairs (dvc.yaml's train_* plots): step and value only
    (no timestamp), the logged values themselves, and the same bytes when the same run is repeated."""
    config = TrainConfig(**{**FAST, "max_steps": 3, "eval_steps": 2})
    runs = []
    for name in ("a", "b"):
        summary = train_dpo(
            tiny_llama,
            make_pairs(8),
            make_pairs(2),
            tmp_path / name / "adapter",
            config,
            curves_dir=tmp_path / name / "curves",
        )
        runs.append((summary, tmp_path / name / "curves" / "plots" / "metrics"))
    summary, curves = runs[0]
    files = sorted(str(p.relative_to(curves)) for p in curves.rglob("*.tsv"))
    assert files == sorted(
        f"{split}/{name}.tsv"
        for split in ("train", "eval")
        for name in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
    )
    header, rows = read_curve(curves / "train" / "loss.tsv")
    assert header == ["step", "loss"] and [r[0] for r in rows] == [1, 2, 3]
    header, rows = read_curve(curves / "eval" / "rewards" / "margins.tsv")
    # every eval_steps (2) and the final evaluation at the last step (3)
    assert header == ["step", "margins"] and [r[0] for r in rows] == [2, 3]
    assert rows[-1][1] == pytest.approx(summary["eval"]["reward_margin"], rel=1e-6)
    _, train_acc = read_curve(curves / "train" / "rewards" / "accuracies.tsv")
    assert train_acc[-1][1] == pytest.approx(summary["train"]["reward_accuracy_last"], rel=1e-6)
    assert not list((tmp_path / "a" / "curves").glob("*.json"))  # no params or summary file beside the curves
    for path in curves.rglob("*.tsv"):
        assert path.read_bytes() == (runs[1][1] / path.relative_to(curves)).read_bytes(), path


def test_curve_names_keep_the_dpo_keys_and_drop_wall_clock():
    from deeper.train import curve_name

    assert curve_name("loss") == "train/loss" and curve_name("eval_loss") == "eval/loss"
    assert curve_name("rewards/margins") == "train/rewards/margins"
    assert curve_name("eval_rewards/accuracies") == "eval/rewards/accuracies"
    for key in (
        "train_runtime",
        "train_samples_per_second",
        "eval_runtime",
        "learning_rate",
        "epoch",
        "grad_norm",
    ):
        assert curve_name(key) is None, key


def test_a_run_without_pairs_leaves_a_note_instead_of_curves(tiny_llama, tmp_path):
    curves = tmp_path / "curves"
    (curves / "plots").mkdir(parents=True)
    (curves / "plots" / "stale.tsv").write_text("step\tloss\n1\t0.5\n")
    train_dpo(
        tiny_llama, make_pairs(0), make_pairs(0), tmp_path / "it1", TrainConfig(**FAST), curves_dir=curves
    )
    assert [p.name for p in curves.rglob("*") if p.is_file()] == ["untrained.txt"]


def test_precomputed_reference_log_probs_train_the_same_adapter(tiny_llama, tmp_path):
    """TRL's precompute_ref_log_probs (bench/dpo_step.py) moves the reference forward before training; the
    reference is the same base model, so the same steps give the same weights."""
    weights = {}
    for precompute in (False, True):
        out = tmp_path / str(precompute)
        config = TrainConfig(
            **{**FAST, "max_steps": 2, "lora_dropout": 0.0, "precompute_ref_log_probs": precompute}
        )
        summary = train_dpo(tiny_llama, make_pairs(4), make_pairs(0), out, config)
        weights[precompute] = load_file(out / "adapter_model.safetensors")
        assert summary["steps"] == 2
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="train.precompute_ref_log_probs: must be true or false"):
        TrainConfig(precompute_ref_log_probs="yes").validate()


def test_a_killed_run_resumes_from_its_checkpoint_to_the_same_adapter_and_curves(tiny_llama, tmp_path):
    """train.checkpoint_steps: a run stopped by an exception after step 3 (of 5; checkpoints every 2) and started
    again with the same inputs resumes from checkpoint-2 and ends with the same adapter bytes and curves as a run
    that was never stopped; the checkpoint folder is gone once the adapter is written."""
    from transformers import TrainerCallback

    from deeper.train import latest_checkpoint

    class Killed(Exception):
        pass

    class KillAfterStep3(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    config = TrainConfig(
        **{**FAST, "max_steps": 5, "per_device_batch": 1, "checkpoint_steps": 2, "eval_steps": 2}
    )
    whole = train_dpo(
        tiny_llama,
        make_pairs(6),
        make_pairs(2),
        tmp_path / "whole",
        config,
        curves_dir=tmp_path / "whole-curves",
        checkpoint_dir=tmp_path / "ckpt-whole",
    )
    assert not any((tmp_path / "ckpt-whole").iterdir())  # removed after the adapter was written
    with pytest.raises(Killed):
        train_dpo(
            tiny_llama,
            make_pairs(6),
            make_pairs(2),
            tmp_path / "resumed",
            config,
            curves_dir=tmp_path / "resumed-curves",
            checkpoint_dir=tmp_path / "ckpt",
            callbacks=(KillAfterStep3(),),
        )
    (run_dir,) = (tmp_path / "ckpt").iterdir()
    assert latest_checkpoint(run_dir).name == "checkpoint-2"

    class StepsRun(TrainerCallback):
        steps: ClassVar[list] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.steps.append(state.global_step)

    resumed = train_dpo(
        tiny_llama,
        make_pairs(6),
        make_pairs(2),
        tmp_path / "resumed",
        config,
        curves_dir=tmp_path / "resumed-curves",
        checkpoint_dir=tmp_path / "ckpt",
        callbacks=(StepsRun(),),
    )
    assert StepsRun.steps == [3, 4, 5]  # resumed after step 2, not from the start
    assert resumed["steps"] == whole["steps"] == 5 and not run_dir.exists()
    assert (tmp_path / "resumed" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "whole" / "adapter_model.safetensors"
    ).read_bytes()
    whole_curves, resumed_curves = tmp_path / "whole-curves", tmp_path / "resumed-curves"
    for path in whole_curves.rglob("*.tsv"):
        assert (resumed_curves / path.relative_to(whole_curves)).read_bytes() == path.read_bytes(), path
    assert resumed["eval"] == whole["eval"] and resumed["train"]["loss_last"] == whole["train"]["loss_last"]


def test_a_checkpoint_of_other_inputs_is_never_resumed(tiny_llama, tmp_path):
    from deeper.train import run_key

    config = TrainConfig(**{**FAST, "checkpoint_steps": 2})
    examples = pairs_to_examples(make_pairs(2), "p")
    key = run_key(tiny_llama, examples, [], config, None, "base")
    assert key == run_key(
        tiny_llama, examples, [], TrainConfig(**{**FAST, "checkpoint_steps": 5}), None, "base"
    )
    assert key != run_key(tiny_llama, examples[:1], [], config, None, "base")
    assert key != run_key(
        tiny_llama, examples, [], TrainConfig(**{**FAST, "lr": 0.5, "checkpoint_steps": 2}), None, "base"
    )
    assert key != run_key(tiny_llama, examples, [], config, None, "previous")
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"1")
    first = run_key(tiny_llama, examples, [], config, adapter, "base")
    (adapter / "adapter_model.safetensors").write_bytes(b"2")
    assert first != run_key(tiny_llama, examples, [], config, adapter, "base") != key


@pytest.mark.parametrize("damage", ["adapter_model.safetensors", "optimizer.pt", "trainer_state.json"])
def test_a_damaged_checkpoint_is_a_warning_and_training_starts_over(tiny_llama, tmp_path, capsys, damage):
    """A checkpoint cut while it was written (disk full, power off): one warning line naming it, then the run
    trains from step 0 and writes the adapter an uninterrupted run writes."""
    from transformers import TrainerCallback

    class Killed(Exception):
        pass

    class KillAfterStep3(TrainerCallback):  # checkpoint-2 is saved after step 2's callbacks
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 3:
                raise Killed

    config = TrainConfig(**{**FAST, "max_steps": 4, "per_device_batch": 1, "checkpoint_steps": 2})
    with pytest.raises(Killed):
        train_dpo(
            tiny_llama,
            make_pairs(4),
            make_pairs(0),
            tmp_path / "a",
            config,
            checkpoint_dir=tmp_path / "ckpt",
            callbacks=(KillAfterStep3(),),
        )
    (checkpoint,) = (tmp_path / "ckpt").glob("*/checkpoint-2")
    path = checkpoint / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    capsys.readouterr()
    summary = train_dpo(
        tiny_llama, make_pairs(4), make_pairs(0), tmp_path / "a", config, checkpoint_dir=tmp_path / "ckpt"
    )
    out = capsys.readouterr().out
    (line,) = [x for x in out.splitlines() if x.startswith("warning:")]
    assert f"{checkpoint}: damaged checkpoint (" in line and line.endswith("removed, training from step 0")
    assert summary["steps"] == 4
    train_dpo(tiny_llama, make_pairs(4), make_pairs(0), tmp_path / "b", config)
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "b" / "adapter_model.safetensors"
    ).read_bytes()


def test_training_curves_are_written_in_a_git_repository_without_a_commit(tiny_llama, tmp_path, monkeypatch):
    """A fresh `git init` + `dvc init` with no commit yet (the DDP test's scratch repo, a new user's first run):
    dvclive's git probe used to fail there ("Empty git repo"); the curves need no git."""
    import subprocess

    from tests.stage_runs import dvc

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    dvc("init", "-q", cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    train_dpo(
        tiny_llama,
        make_pairs(2),
        make_pairs(0),
        tmp_path / "a",
        TrainConfig(**{**FAST, "max_steps": 1}),
        curves_dir=tmp_path / "curves",
    )
    assert (tmp_path / "curves" / "plots" / "metrics" / "train" / "loss.tsv").is_file()


def test_sampling_and_training_render_the_models_own_chat_template_with_its_system_turn(tiny_llama, tmp_path):
    """Llama-3.1's own chat template adds a system turn ("Cutting Knowledge Date: ...") to a chat without one;
    LLaMA-Factory's `llama3` template, which the authors trained with, adds none. This project renders every
    chat with the model's own template, the same text in sampling (deeper.llm.scoring.render_prompt: the
    transformers and vLLM backends) and in DPO training (TRL's conversational prompt): the parity table's
    "chat template" row. A model whose template adds a system turn shows it in both."""
    import shutil

    from deeper.llm.scoring import render_prompt

    model = tmp_path / "dated"
    shutil.copytree(tiny_llama, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nCutting Knowledge Date: December 2023"
        "<|im_end|>\n' }}{% endif %}" + tokenizer.chat_template
    )
    tokenizer.save_pretrained(model)
    chat = [m for m in json.loads(PROMPT) if m["role"] == "user"]  # the published prompts: one user message
    sampled = render_prompt(AutoTokenizer.from_pretrained(model), chat)
    assert sampled.startswith(
        "<|im_start|>system\nCutting Knowledge Date: December 2023<|im_end|>\n<|im_start|>user\n"
    )
    pairs = make_pairs(2).assign(prompt=json.dumps(chat))
    trainer = build_trainer(model, pairs_to_examples(pairs, "p"), [], TrainConfig(**FAST), tmp_path / "o")
    trained = trainer.processing_class.decode(trainer.train_dataset[0]["prompt_ids"])
    assert trained == sampled  # the policy is trained on exactly the prompt text it samples from

"""The paper profile's parity table: each setting of the paper (arXiv 2502.11078) and of the authors' released
code and run (sheep333c/DEEPER: windows, LLaMA-Factory configs; LLaMA-Factory's own defaults), the value the
profile gives it (read from the applied profile, so the table cannot drift from profiles/paper.yaml) and the
test that pins it. A setting the paper leaves open is marked `open`.

`python -m stages.profile paper` prints it; docs/parity.md#paper-parity is `render(...)` of it
(tests/test_profile.py checks both).
"""

from __future__ import annotations

from dataclasses import dataclass

from deeper.config import get


@dataclass(frozen=True)
class Row:
    setting: str
    paper: str
    authors: str
    keys: tuple[
        str, ...
    ]  # params keys whose profile values the row shows; () with `code` for fixed behaviour
    test: str  # tests/<file>.py::<test function>; "" where nothing pins it yet
    open: bool = False  # the paper does not state it: the profile's value is a choice
    code: str = ""  # what the code does where no key sets it


_P = "tests/test_profile.py::"
SETTINGS = "test_the_profile_holds_the_papers_settings"
TRAIN = "test_paper_training_reaches_trl_and_stops_at_bf16_without_a_gpu"

PAPER = (
    Row(
        "frozen predictor",
        "GPT-4o-mini",
        "OpenAI API, gpt-4o-mini",
        ("models.frozen.name",),
        _P + SETTINGS,
        open=True,
    ),  # which snapshot: not stated
    Row("S_0 temperature", "not stated", "0 (greedy)", ("persona.temperature",), _P + SETTINGS, open=True),
    Row(
        "generation limits",
        "not stated; personas ~245 tokens, ~430-530 after 4 rounds (Table 2)",
        "a very large max_tokens",
        (
            "persona.max_new_tokens",
            "sample.max_new_tokens",
            "evaluate.sampling.max_new_tokens",
            "predict.json.max_new_tokens",
        ),
        _P + SETTINGS,
        open=True,
    ),
    Row(
        "generations cut at the limit",
        "not stated",
        "not counted",
        (),
        "tests/test_llm_transformers.py::test_each_generation_says_whether_it_stopped_at_the_limit",
        open=True,
        code="counted by every generating stage: stopped_at_limit_share in its metrics (vLLM/OpenAI: finish_reason "
        '"length"; transformers: no end token)',
    ),
    Row(
        "persona length tokenizer",
        "not stated (Table 2)",
        "not stated",
        ("persona.tokenizer",),
        _P + SETTINGS,
        open=True,
    ),
    Row(
        "prompts",
        "Appendix A, Tables 4-10 (one user message each)",
        "prompt scripts; FullRegen's differs (next row)",
        ("prompts",),
        "tests/test_prompts.py::test_the_published_set_is_the_papers_tables_word_for_word",
    ),
    Row(
        "list rendering",
        "not shown: the tables hold placeholders",
        "one Python dict a line (`str({'item_name': ..., 'user_rating': ..., 'predict_rating': ...})`), S_0's "
        "ratings as JSON lines keyed `item`, the items to predict as one Python list",
        ("prompts",),
        "tests/test_prompts.py::test_the_published_set_renders_lists_as_the_authors_scripts_did",
    ),
    Row(
        "initial persona answer",
        'Table 4: plain text after "User Persona(at least **200 words**):"',
        'a JSON answer {"persona": ...} in a ```json block, parsed',
        (),
        "tests/test_prompts.py::test_the_published_set_is_the_papers_tables_word_for_word",
        code="Table 4's plain-text answer (the table speaks; its text is the one both readers have)",
    ),
    Row(
        "chat template",
        "not stated",
        "LLaMA-Factory `template: llama3`: no system turn",
        (),
        "tests/test_train.py::test_sampling_and_training_render_the_models_own_chat_template_with_its_system_turn",
        open=True,
        code="the model's own chat template (Llama-3.1's adds a dated system turn to a chat without one), the same "
        "text in sampling, DPO training and evaluation",
    ),
    Row(
        "baseline word counts",
        "none in Tables 7, 8, 10",
        "FullRegen asks for at least 250 words, SlideRegen and HierMerge's short-term persona for at least 190",
        (),
        "tests/test_prompts.py::test_the_published_set_is_the_papers_tables_word_for_word",
        open=True,
        code="the tables' wording (no count); the initial persona keeps Table 4's \"at least **200 words**\"",
    ),
    Row(
        "rating prediction",
        "one JSON list per window (Appendix A.2)",
        "the same",
        ("predict.mode",),
        _P + "test_frozen_block_predicts_json_windows_through_a_local_server",
    ),
    Row(
        "unparsable JSON answer",
        "not stated",
        "not stated",
        (),
        "tests/test_predict.py::test_json_mode_retries_a_failed_parse_once_with_the_next_seed",
        open=True,
        code="one retry with seed + 1, then 3 (counted: mae_r<s>_parse_failed_share)",
    ),
    Row(
        "policy (refiner)", "Llama-3.1-8B-Instruct", "the same, LoRA", ("models.policy.name",), _P + SETTINGS
    ),
    Row(
        "iteration-1 candidates from",
        "the base policy (Sec. 3.4)",
        "the same",
        ("models.sampler.name",),
        _P + SETTINGS,
    ),
    Row(
        "second backbone (Table 26)",
        "Qwen2-7B-Instruct trained on the same pairs",
        "not released",
        (),
        "tests/test_backbone.py::test_switching_the_trained_model_reruns_training_onward_not_the_sampling",
        code="-S models.policy.name=Qwen/Qwen2-7B-Instruct: train@1 onward re-runs, models.sampler's pairs stay",
    ),
    Row("candidates per context", "15 (Appendix A.5)", "15", ("sample.n",), _P + SETTINGS),
    Row(
        "candidate sampling",
        "temperature 1, top_p 0.4, repetition penalty 1.1",
        "the same",
        ("sample.temperature", "sample.top_p", "sample.repetition_penalty"),
        _P + SETTINGS,
    ),
    Row(
        "reward weights",
        "balanced (prev, curr, fut) = (1, 1, 1) (Table 19)",
        "the same",
        ("reward.weights",),
        _P + SETTINGS,
    ),
    Row(
        "positive / negative / margin",
        "tau+ 0.5, tau- 0, delta 0.5; iteration 2 delta 0.8",
        "the same",
        ("tau_pos", "tau_neg", "delta", "iter2.delta"),
        _P + SETTINGS,
    ),
    Row(
        "pairs per context",
        "34,782 pairs from 10,800 contexts (~3.2); selection rule not stated",
        "not released",
        ("pair.strategy", "pair.max_per_context"),
        "tests/test_pairs.py::test_pairs_per_context_counts_this_iterations_pairs_over_every_sampled_context",
        open=True,
    ),
    Row("validation split", "10% of pairs", "10%", ("pair.val_fraction",), _P + SETTINGS),
    Row(
        "replay (iteration 2)",
        "5,000 iteration-1 pairs with margin > 0.8, randomly selected (A.5)",
        "not released",
        ("iter2.replay_max", "iter2.replay_order"),
        "tests/test_pairs.py::test_random_replay_is_a_seeded_sample_of_the_pairs_above_delta",
    ),
    Row(
        "DPO reference, iteration 2",
        "not stated",
        "LLaMA-Factory: the base model (adapter disabled)",
        ("iter2.reference",),
        "tests/test_train.py::test_iteration_2_reference_is_base_or_model_1",
        open=True,
    ),
    Row(
        "LoRA rank / alpha", "16 / 32 (Table 12)", "16 / 32", ("train.lora.r", "train.lora.alpha"), _P + TRAIN
    ),
    Row(
        "LoRA dropout",
        "0.2 (Table 12)",
        "0: LLaMA-Factory's DPO trainer disables dropout after LoRA is made",
        ("train.lora.dropout", "train.disable_dropout"),
        "tests/test_train.py::test_disable_dropout_zeroes_the_lora_dropout_as_llamafactory_did",
    ),
    Row("DPO loss, beta", "sigmoid, 0.2", "sigmoid, 0.2", ("train.beta",), _P + TRAIN),
    Row(
        "SFT term",
        "weight 0.1; normalisation not stated",
        "LLaMA-Factory: chosen NLL / its length, mean over pairs",
        ("alpha", "train.sft_normalization"),
        "tests/test_train.py::test_sft_term_is_normalised_per_token_or_per_pair_as_configured",
        open=True,
    ),
    Row(
        "batch",
        "4 per device x 8 accumulation x 4 GPUs = 128",
        "the same",
        ("train.per_device_batch", "train.grad_accum", "train.launcher"),
        _P + SETTINGS,
    ),
    Row(
        "optimiser schedule",
        "lr 5e-6, cosine, 250 warmup steps, 4 epochs",
        "the same",
        ("train.lr", "train.scheduler", "train.warmup_steps", "train.epochs"),
        _P + TRAIN,
    ),
    Row(
        "sequence length, precision",
        "2048, bf16",
        "2048, bf16",
        ("train.max_length", "train.bf16"),
        _P + TRAIN,
    ),
    Row(
        "windows",
        "10 ratings; 4 rounds need W_0..W_5",
        "windows of 10, 5 in the CSVs + 2 in the JSONL",
        ("window.size", "window.count", "evaluate.rounds"),
        _P + SETTINGS,
    ),
    Row(
        "training users",
        ">= 50 ratings (Sec. 4.1)",
        "five windows each",
        ("window.train_count",),
        "tests/test_window.py::test_the_paper_profile_trains_only_users_with_fifty_ratings",
    ),
    Row(
        "users per domain",
        "Table 11 (sports 236, grocery 185, local business 826)",
        "test files: sports 185, grocery 236, local business 824 (followed)",
        (
            "window.domains.amazon_sports.eval_users",
            "window.domains.amazon_grocery.eval_users",
            "window.domains.local_business.eval_users",
        ),
        "tests/test_window.py::test_the_authors_folders_are_the_papers_domains_with_their_users_and_flags",
    ),
    Row(
        "users",
        "which users: not released with the paper",
        "their train and test windows (data/data_process): every evaluation user, training users of three domains",
        ("ingest.preset",),
        _P + SETTINGS,
    ),
    Row(
        "item-type labels",
        "not stated ({item_type} in Tables 4-10)",
        "the files' labels: `book`, `clothing_shoes_jewelry`, `movies_and_TV`, `recipe`, `local_business`, "
        "`movie`, `art_crafts_sewing`, `automative`, ...",
        ("ingest.preset",),
        "tests/test_window.py::test_the_authors_folders_are_the_papers_domains_with_their_users_and_flags",
    ),
    Row(
        "validation split",
        "10% of the pairs; how they are drawn: not stated",
        "LLaMA-Factory `val_size: 0.1`: pairs drawn at random",
        ("pair.val_fraction",),
        "tests/test_pairs.py::test_validation_holds_out_whole_contexts_by_seeded_hash",
        open=True,
        code="whole contexts held out (a context's pairs never straddle train and validation)",
    ),
    Row(
        "Food.com rating 0",
        "not stated",
        "kept in the windows, counted by the MAE",
        ("ingest.zero_ratings",),
        "tests/test_readers.py::test_a_foodcom_zero_is_dropped_or_kept_as_ingest_zero_ratings_says",
        open=True,
    ),
    Row(
        "update generation (evaluation)",
        "not stated",
        "temperature 0 (their update scripts, DEEPER's and the baselines')",
        ("evaluate.sampling.temperature",),
        _P + SETTINGS,
        open=True,
    ),
)


def _value(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def profile_value(row: Row, params: dict) -> str:
    """The row's keys and their values in `params` (the profile applied), or what the code does."""
    values = [f"`{key}: {_value(get(params, key))}`" for key in row.keys]
    return "; ".join(values + ([row.code] if row.code else []))


def render(rows: tuple[Row, ...], params: dict) -> str:
    """A markdown table: setting, paper, the authors' code or run, the profile's value, the pinning test."""
    lines = ["| setting | paper | authors' code / run | profile | pinned by |", "|---|---|---|---|---|"]
    for row in rows:
        paper = f"**open**: {row.paper}" if row.open else row.paper
        test = f"`{row.test}`" if row.test else "nothing yet"
        lines.append(f"| {row.setting} | {paper} | {row.authors} | {profile_value(row, params)} | {test} |")
    return "\n".join(lines)


PARITY = {"paper": PAPER}  # profiles with a parity table

"""A tiny random Llama with a ChatML byte-level BPE tokenizer, built in-process (no download).

For unit tests of the LLM backends and training: fast, deterministic, with real HF/peft/TRL code paths.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# SmolLM2-135M's layer shapes (its config.json): a random model of the embedded model's compute
SMOLLM2_SHAPE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
}
CORPUS = [
    "The user enjoys thoughtful dramas and dislikes loud action films. Rating: 1 2 3 4 5",
    "Persona: a curious reader who rates mysteries highly and romance poorly.",
    "Predicted rating 3, actual rating 5. Refine the persona to reflect the differences.",
    "Toy Story (1995), GoldenEye (1995), Four Rooms (1995), Star Wars (1977), Fargo (1996)",
] * 20


def make_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (default: CORPUS): texts like the corpus take few tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_llama(
    directory: str | Path,
    seed: int = 0,
    initializer_range: float = 0.02,
    corpus: list[str] | None = None,
    vocab_size: int = 400,
    shape: dict | None = None,
) -> Path:
    """Save a tiny random Llama (2 layers, hidden 64) and its tokenizer to `directory`; return the path.

    With the default (HF's) initializer_range its logits are nearly flat and hardly depend on the prompt:
    sampled at temperature 1, every prompt gets the same text for one seed. Around 0.3, each prompt its own."""
    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    tokenizer = make_tiny_tokenizer(corpus, vocab_size)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
    )
    # e.g. SMOLLM2_SHAPE: a random model of a real model's size (bench/gpu_check.py)
    for key, value in (shape or {}).items():
        setattr(config, key, value)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_tiny_bert(directory: str | Path, seed: int = 0) -> Path:
    """A tiny random BERT encoder with a WordPiece tokenizer (the shape of all-MiniLM-L6-v2's folder)."""
    from tokenizers import normalizers
    from tokenizers import pre_tokenizers as pre
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory = Path(directory)
    if (directory / "config.json").exists():
        return directory
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre.BertPreTokenizer()
    tok.train_from_iterator(
        CORPUS, WordPieceTrainer(vocab_size=300, special_tokens=special, show_progress=False)
    )
    directory.mkdir(parents=True, exist_ok=True)
    fast = BertTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(seed)
    BertModel(
        BertConfig(
            vocab_size=len(fast),
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=512,
        )
    ).save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory

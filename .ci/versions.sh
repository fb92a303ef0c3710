#!/usr/bin/env bash
# The fast test suite on pinned dependency versions, each combination in its own virtualenv:
#   min        .ci/constraints-min.txt        the oldest versions that pass (pyproject's lower bounds)
#   gpu-image  .ci/constraints-gpu-image.txt  the GPU image's stack, dapo installed over it --no-deps
# Each runs the fast suite (vLLM tests left out: they have .ci/vllm.sh) and the FSDP2 tests (the test
# files that launch torchrun --nproc-per-node; marked slow, ~1.5 min; FSDP2 on CPU is what sets the torch floor).
# Usage: bash .ci/versions.sh [min|gpu-image] [pytest args]   (no combination named: both)
# A virtualenv is reused while its .installed marker exists; delete the virtualenv to rebuild it.
# DAPO_DISCARD_VENVS=1 (set by .ci/run) removes each one after its tests, to free its ~5 GB of disk.
# torch comes from PyPI (CUDA builds, ~5 GB a virtualenv with the nvidia-* wheels; they import
# and run on a CPU-only machine). Each combination converts the default model into its own
# DAPO_CACHE inside its virtualenv: a copy saved by another transformers may not load (4.x cannot
# read 5.x's tokenizer_config), and the conversion itself is part of what is tested.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}

combos=(min gpu-image)
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
    case "$1" in
        min|gpu-image) combos=("$1"); shift ;;
        *) echo "unknown combination '$1' (min or gpu-image)" >&2; exit 2 ;;
    esac
fi

# Requirements of one combination: the pins of its constraints file, then dapo's dependencies and
# its test extra from pyproject.toml, each package pinned there taking the pin instead.
requirements() {
    "$PYTHON" - "$1" <<'PY'
import re, sys, tomllib
name = lambda r: re.split(r"[\s=<>!~\[;(]", r.strip(), maxsplit=1)[0].lower().replace("_", "-")
pins = {}
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        pins[name(line)] = line
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = dict(pins)
for r in project["dependencies"] + project["optional-dependencies"]["test"]:
    reqs.setdefault(name(r), r)
print("\n".join(reqs.values()))
PY
}

failed=()
for combo in "${combos[@]}"; do
    case "$combo" in
        min) venv=.venv-min ;;
        gpu-image) venv=.venv-gpuimage ;;
    esac
    pins=".ci/constraints-$combo.txt"
    pip="$venv/bin/pip --disable-pip-version-check -q"
    echo "=== $combo ($venv, $pins)"
    start=$(date +%s)
    if [ ! -f "$venv/.installed" ]; then
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
        $pip install "$(grep -E '^torch==' "$pins")"
        requirements "$pins" > "$venv/requirements.txt"
        $pip install -r "$venv/requirements.txt"
        $pip install --no-deps -e .
        touch "$venv/.installed"
        echo "$combo: installed in $(( $(date +%s) - start )) s, $(du -sh "$venv" | cut -f1)"
    fi
    # Every pin must be what is installed (a later requirement must not have moved one).
    "$venv/bin/python" - "$pins" <<'PY'
import sys
from importlib.metadata import version
bad = []
for line in open(sys.argv[1]):
    line = line.split("#", 1)[0].strip()
    if line:
        pkg, want = line.split("==")
        have = version(pkg)
        print(f"  {pkg:<14} {have}")
        if have.split("+")[0] != want:
            bad.append(f"{pkg} {have} (pinned {want})")
import torch
print(f"  (torch CUDA build: {torch.version.cuda}, CUDA available: {torch.cuda.is_available()})")
sys.exit("not as pinned: " + ", ".join(bad) if bad else 0)
PY
    tests_start=$(date +%s)
    if DAPO_CACHE="$PWD/$venv/dapo-cache" "$venv/bin/python" -m pytest -q -m "not slow" -p no:cacheprovider \
            --ignore-glob='*/test_vllm_engine.py' --ignore-glob='*/test_vllm_training.py' "$@"; then
        echo "$combo: fast suite passed in $(( $(date +%s) - tests_start )) s"
    else
        echo "$combo: fast suite FAILED after $(( $(date +%s) - tests_start )) s"
        failed+=("$combo")
    fi
    fsdp_start=$(date +%s)
    mapfile -t fsdp_tests < <(grep -rl -- '--nproc-per-node' tests --include='test_*.py' | sort)
    if [ ${#fsdp_tests[@]} -eq 0 ]; then
        echo "$combo: no FSDP2 test file found (one launching torchrun --nproc-per-node)"; failed+=("$combo (FSDP2)"); continue
    fi
    if DAPO_CACHE="$PWD/$venv/dapo-cache" "$venv/bin/python" -m pytest -q -p no:cacheprovider "${fsdp_tests[@]}" "$@"; then
        echo "$combo: FSDP2 tests passed in $(( $(date +%s) - fsdp_start )) s"
    else
        echo "$combo: FSDP2 tests FAILED after $(( $(date +%s) - fsdp_start )) s"
        failed+=("$combo (FSDP2)")
    fi
    if [ "${DAPO_DISCARD_VENVS:-0}" = 1 ]; then rm -rf "$venv"; fi
done

if [ ${#failed[@]} -gt 0 ]; then
    echo "failed: ${failed[*]}"
    exit 1
fi

#!/usr/bin/env bash
# Runs the core tests against the OLDEST dependency versions setup.cfg declares (the full suite runs
# against the newest, in the system install). Called by .ci/run after the full suite; runs alone too:
#     bash .ci/oldest-deps.sh
# The venv (git-ignored) sees the system site-packages, so numpy, pillow, pytest and hf_vattr itself
# (the editable install; pytest run from the repo root imports this checkout) are reused; only the
# pins below are installed into it. A second run reuses the venv. pip's notes about system packages
# that want newer versions (kernels, gradio) are expected: the core tests do not import them.
# Keep the pins in sync with setup.cfg install_requires and docs/compatibility.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

VENV=${OLDEST_VENV:-.venv-oldest}
PINS=(
    transformers==5.23.0      # setup.cfg's floor (5.23 added sdpa_attention.pack_gqa, which capture uses)
    torch==2.6.0              # setup.cfg's floor (transformers >= 5.20 turns torch < 2.6 off)
    torchvision==0.21.0       # torch 2.6's; the system torchvision is built for the system torch
    tokenizers==0.23.1        # the oldest transformers 5.23.0 accepts
    huggingface_hub==1.31.0   # the oldest transformers 5.23.0 accepts; setup.cfg's floor
    safetensors==0.8.0        # the oldest transformers 5.23.0 accepts; setup.cfg's floor
)
CORE_TESTS=(
    tests/test_capture.py
    tests/test_streamer.py
    tests/test_streamer_lifecycle.py
    tests/test_layouts.py
    tests/test_streamer_batches.py  # padded batches: the pack_gqa path the other files do not reach
    tests/test_streamer_scope.py    # scoping, static cache, pipeline, thread isolation, exit
)

start=$SECONDS
if [ ! -x "$VENV/bin/python" ]; then
    python -m venv --system-site-packages "$VENV"
fi
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
# Each pin must be the version the venv imports (its own site-packages first, then the system's), and import.
"$VENV/bin/python" - "${PINS[@]}" <<'PY'
import importlib
import importlib.metadata as md
import sys

bad = []
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    importlib.import_module(name)
    have = md.version(name)
    if have.split("+")[0] != want:
        bad.append(f"{name}: want {want}, got {have}")
if bad:
    sys.exit("oldest-deps: wrong versions in the venv: " + "; ".join(bad))
print("oldest-deps:", ", ".join(sys.argv[1:]), f"(python {sys.version.split()[0]})")
PY
echo "oldest-deps: venv ready in $((SECONDS - start)) s"

# A hang fails the run (timeout exits 124) instead of stalling CI; faulthandler prints the stacks first.
rc=0
timeout 900 "$VENV/bin/python" -m pytest -q -o faulthandler_timeout=300 "${CORE_TESTS[@]}" || rc=$?
case $rc in
    0) echo "oldest-deps: core tests passed ($((SECONDS - start)) s in all)" ;;
    5) echo "oldest-deps: pytest collected no tests" >&2 ;;
    124) echo "oldest-deps: the core tests ran past 900 s" >&2 ;;
    *) echo "oldest-deps: core tests failed (pytest exit $rc)" >&2 ;;
esac
exit $rc

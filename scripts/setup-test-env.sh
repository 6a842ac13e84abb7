#!/usr/bin/env bash
# Extra pieces the end-to-end tests use. Every step checks first and is safe to run again.
#   - Python: the server, ONNX, video and Ray extras, httpx (API tests), schemathesis (API fuzzer) and
#     Playwright (browser test; its own browser download is never used: the tests drive Debian's Chromium).
#   - Debian's chromium at /usr/bin/chromium for the browser test.
#   - onnxruntime-web from the npm registry, copied into anyseg/server/static/ort/ (git-ignored) so
#     that the page can decode clicks itself.
# A step that cannot be done here prints a warning and the tests that need it skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"

warn() { echo "setup-test-env: warning: $*" >&2; }

# --- Python packages (pip does nothing for requirements already met) ---------------------------------
"$PYTHON" -m pip install -q -e ".[server,onnx,video,ray,sam3,text,inpaint,medical]" "httpx>=0.24" "playwright>=1.40" "scikit-image>=0.19" \
  "schemathesis>=4.32,<5"
# The CLIP BPE vocabulary for SAM 3's tokenizer ships in open_clip_torch; only that file is read, so the
# package goes in without its dependencies (they would pull a CUDA torch and torchvision).
"$PYTHON" -m pip install -q --no-deps "open_clip_torch==3.3.0"
# The text extra's transformers does not depend on torch, so the pinned CPU torch stays; checked here.
"$PYTHON" -c "import sys, torch; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" \
  || warn "torch is no longer 2.13.0 after installing the extras; reinstall it with make install-test"

# --- Chromium from Debian -----------------------------------------------------------------------------
if [ ! -x /usr/bin/chromium ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } \
      || warn "could not install chromium; the browser test will skip"
  else
    warn "chromium is missing and apt-get (as root) is not available; the browser test will skip"
  fi
fi

# --- onnxruntime-web for the page -------------------------------------------------------------------
if command -v npm >/dev/null 2>&1; then
  # npm ci again only when the installed onnxruntime-web is missing or not the version package.json pins.
  if ! (cd web && node -e "const w = require('./package.json').dependencies['onnxruntime-web'];
        process.exit(require('./node_modules/onnxruntime-web/package.json').version === w ? 0 : 1)" 2>/dev/null); then
    (cd web && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error) \
      || warn "npm ci failed; the page will decode on the server"
  fi
  if [ -f web/node_modules/onnxruntime-web/package.json ]; then
    (cd web && node build.mjs) || warn "copying onnxruntime-web failed; the page will decode on the server"
  fi
else
  warn "npm is missing; the page will decode on the server (install Node.js and npm to test in-page decoding)"
fi

echo "test environment ready"

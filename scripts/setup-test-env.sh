#!/usr/bin/env bash
# Extra system pieces the end-to-end tests use. Each step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "test environment ready"

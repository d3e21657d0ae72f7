#!/usr/bin/env bash
# Runs every atrest test on a fresh machine: installs what the tests need
# (Debian packages, a Python venv for the client interop tests), then runs
# the whole workspace test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."

"$(dirname "$0")/setup-test-deps.sh"
export ATREST_TEST_PYTHON="$PWD/.venv/bin/python"

cargo build --workspace --all-targets
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

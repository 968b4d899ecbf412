#!/usr/bin/env bash
# weft's main job: build the example recipes through the daemon (started in the background
# if none is running), run what was built, and verify the store.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
state="${WEFT_STATE_DIR:-/var/lib/weft}"

# The C example compiles with the host's gcc, which builders see through sandbox-paths.
if [ ! -e "$state/weft.toml" ]; then
  mkdir -p "$state"
  printf 'sandbox-paths = ["/usr", "/lib", "/lib64"]\n' > "$state/weft.toml"
fi

report=$(store-build examples/recipes.py)
echo "built: $report"
cat "$report"
hello=$(store-build -o "${TMPDIR:-/tmp}/weft-hello" examples/recipes.py:hello)
echo "built: $hello"
"$hello/bin/hello"
store-query --closure "$report"
# Build environments (docs/environments.md): a wrapper that logs every step around a
# build, and one that runs its builder under tighter limits.
store-build examples/environments/instrument.py examples/environments/limit.py
store-verify --check-contents

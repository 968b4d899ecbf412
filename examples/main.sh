#!/usr/bin/env bash
# weft's main job, for now: put a tree in the store through the daemon (started in the
# background if none is running), query it, round-trip its archive, verify the store.
# (Builds arrive with `store-build`.)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"

src=$(store-add examples/hello)
echo "added: $src"
store-query --info "$src"
store-query --closure "$src"
"$src/run.sh"
out=$(mktemp -d)
store-dump "$src" | nix-store --restore "$out/hello"
diff -r examples/hello "$out/hello" && echo "archive round trip through nix-store: identical"
rm -rf "$out"
store-verify

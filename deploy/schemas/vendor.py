#!/usr/bin/env python3
"""Refreshes the Compose Specification schema vendored in deploy/schemas/.

    python3 deploy/schemas/vendor.py

Needs npm with access to the npm registry; nothing else does (CI only reads the vendored
file). After a refresh, update the version and checksums in deploy/schemas/README.md (this
script prints them) and run scripts/validate-deploy.

Source: schemas/compose.schema.json of the npm package `dclint` (a Compose linter that ships
the upstream compose-spec schema unmodified). The Kubernetes schemas are not vendored: they
ship inside the PyPI package kubernetes-validate, pinned in requirements.txt.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile

HERE = pathlib.Path(__file__).resolve().parent

DCLINT = "dclint@3.1.0"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        subprocess.run(
            ["npm", "pack", "--silent", DCLINT, "--pack-destination", str(tmp)],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tarball = next(tmp.glob("dclint-*.tgz"))
        with tarfile.open(tarball) as tar:
            member = tar.extractfile("package/schemas/compose.schema.json")
            assert member is not None
            compose = member.read()
        json.loads(compose)  # must be JSON
        out = HERE / "compose-spec.json"
        out.write_bytes(compose)
        print(f"{out.relative_to(HERE.parent.parent)}  sha256 {sha256(out)}")
        print(f"  from {tarball.name}  sha256 {sha256(tarball)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

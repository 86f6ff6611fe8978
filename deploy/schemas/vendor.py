#!/usr/bin/env python3
"""Refreshes the JSON schemas vendored in deploy/schemas/ from pinned registry packages.

    python3 deploy/schemas/vendor.py

Needs pip and npm with access to PyPI and the npm registry; nothing else does (CI only reads
the vendored files). After a refresh, update the versions and checksums in
deploy/schemas/README.md (this script prints them) and run scripts/validate-deploy.

Sources:
  * Compose Specification schema: schemas/compose.schema.json of the npm package `dclint`
    (a Compose linter that ships the upstream compose-spec schema unmodified).
  * Kubernetes schemas: the PyPI package `kubernetes-validate`, which bundles JSON schemas
    generated from the Kubernetes OpenAPI definitions, in "local-strict" form
    (additionalProperties: false everywhere). Only the kinds the manifests use are kept,
    each version as one self-contained file: every kind's top-level schema plus the
    definitions it reaches, with descriptions dropped to keep the files small.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

HERE = pathlib.Path(__file__).resolve().parent

DCLINT = "dclint@3.1.0"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"
# The oldest Kubernetes the manifests are meant for, and the newest the package knows.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# (apiVersion, kind) used under deploy/k8s; add a pair here when a manifest needs a new kind.
KINDS = [
    ("v1", "Namespace"),
    ("v1", "Secret"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("v1", "PersistentVolumeClaim"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("batch/v1", "Job"),
]
DEFS_URI = "/api/_definitions.json#/$defs/"


def sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def schema_file_name(api_version: str, kind: str) -> str:
    """kubernetes-validate's naming: ("apps/v1", "Deployment") -> "deployment-apps-v1",
    ("v1", "Secret") -> "secret-v1"; a group's domain is dropped (rbac.authorization.k8s.io
    -> rbac)."""
    if "/" in api_version:
        group, version = api_version.split("/")
        return f"{kind.lower()}-{group.split('.')[0]}-{version}"
    return f"{kind.lower()}-{api_version}"


def strip(node):
    """Drops descriptions and nested $id/$schema (an $id inside a bundle would move the
    base URI of the refs below it)."""
    if isinstance(node, dict):
        return {
            k: strip(v)
            for k, v in node.items()
            if k not in ("description", "$id", "$schema")
        }
    if isinstance(node, list):
        return [strip(v) for v in node]
    return node


def rewrite_refs(node):
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith(DEFS_URI):
                out[k] = "#/$defs/" + v[len(DEFS_URI):]
            else:
                out[k] = rewrite_refs(v)
        return out
    if isinstance(node, list):
        return [rewrite_refs(v) for v in node]
    return node


def refs(node, found: set[str]):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str) and v.startswith("#/$defs/"):
                found.add(v[len("#/$defs/"):])
            else:
                refs(v, found)
    elif isinstance(node, list):
        for v in node:
            refs(v, found)


def bundle_kubernetes(root: pathlib.Path, version: str) -> dict:
    folder = root / f"v{version}-local-strict"
    definitions = json.loads((folder / "_definitions.json").read_text())["$defs"]
    defs: dict[str, dict] = {}
    kinds: dict[str, str] = {}
    for api_version, kind in KINDS:
        name = schema_file_name(api_version, kind)
        top = json.loads((folder / f"{name}.json").read_text())
        defs[name] = strip(rewrite_refs(top))
        kinds[f"{api_version} {kind}"] = name
    # Close over the definitions the kinds reach.
    pending = set()
    for schema in defs.values():
        refs(schema, pending)
    while pending:
        name = pending.pop()
        if name in defs:
            continue
        schema = strip(rewrite_refs(definitions[name]))
        defs[name] = schema
        refs(schema, pending)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$comment": (
            f"Kubernetes v{version} strict schemas for the kinds in x-kinds, bundled from "
            f"{KUBERNETES_VALIDATE} by deploy/schemas/vendor.py. Do not edit by hand."
        ),
        "x-kinds": kinds,
        "$defs": dict(sorted(defs.items())),
    }


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)

        # Compose Specification schema.
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

        # Kubernetes schemas.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
             KUBERNETES_VALIDATE, "-d", str(tmp)],
            check=True,
        )
        wheel = next(tmp.glob("kubernetes_validate-*.whl"))
        with zipfile.ZipFile(wheel) as z:
            for version in KUBERNETES_VERSIONS:
                prefix = f"kubernetes_validate/kubernetes-json-schema/v{version}-local-strict/"
                for name in z.namelist():
                    if name.startswith(prefix):
                        z.extract(name, tmp / "kv")
        root = tmp / "kv" / "kubernetes_validate" / "kubernetes-json-schema"
        for version in KUBERNETES_VERSIONS:
            bundle = bundle_kubernetes(root, version)
            out = HERE / "kubernetes" / f"v{version}-strict.json"
            out.parent.mkdir(exist_ok=True)
            out.write_text(json.dumps(bundle, indent=1, sort_keys=False) + "\n")
            print(f"{out.relative_to(HERE.parent.parent)}  sha256 {sha256(out)}"
                  f"  ({len(bundle['$defs'])} definitions)")
        print(f"  from {wheel.name}  sha256 {sha256(wheel)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

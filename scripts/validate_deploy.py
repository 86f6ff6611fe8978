"""Validates the deployment files (run through scripts/validate-deploy).

The generic checks are made by maintained tools, pinned in deploy/schemas/requirements.txt
(or found on the machine), each on every file it applies to:
  * yamllint, configured by .yamllint: every YAML file of the deployment (syntax, duplicate
    keys, YAML 1.1 booleans such as `yes`, indentation, trailing spaces, line length).
  * check-jsonschema: docker-compose.yml and the overrides in deploy/, each file as written,
    against the vendored Compose Specification schema (deploy/schemas/compose-spec.json).
  * `docker compose config -q` (Compose v2, where installed; it needs no Docker Engine):
    each combination of files (COMPOSE_COMBINATIONS) loaded, interpolated and merged by
    Compose itself, with the values of .env.example.
  * `kubectl kustomize` (where kubectl is installed): renders deploy/k8s and each overlay.
  * kubernetes-validate --strict: every object of every render against the Kubernetes
    schemas of KUBERNETES_VERSIONS (unknown fields are errors, and so is a kind it has no
    schema for).

This file checks what only this project knows:
  * Compose: ${VARS} interpolated from .env.example (a required one missing there is an
    error), the files merged as Compose merges them; then references between services
    (depends_on, named volumes, mounted config files, health probe ports).
  * Kubernetes: the same renders made here, for the part of kustomize deploy/k8s uses (the
    only render where kubectl is missing; where it is there, both must agree); each
    kustomization must use every YAML file in its folder, and its patches, replicas entries
    and replacements must match an object. Then resources and security settings of every
    pod, and references between objects (Secret keys, checked against the example Secret
    where a render has none; ConfigMaps, claims, the generators' addresses).
  * Service configuration files (deploy/config/*.toml and the TOML in the ConfigMaps)
    against the services' own configuration structs, read from crates/*/src (the services
    reject unknown keys at start-up), with no secrets in them; HIR_<SERVICE>__* variables
    must name real configuration keys.
  * The images' toolchain and features against rust-toolchain.toml and the crates.
  * Self-test: every known-bad example in deploy/schemas/testdata/ must be rejected by each
    check its `# expect CHECK: TEXT` lines name, with an error that contains TEXT.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from typing import Any, Callable, Iterable

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"
TESTDATA = SCHEMAS / "testdata"
COMPOSE_SCHEMA = SCHEMAS / "compose-spec.json"
YAMLLINT_CONFIG = ROOT / ".yamllint"
K8S_DIR = ROOT / "deploy" / "k8s"
# The Secret every deployment needs, made by hand; only the example-secret overlay applies it.
EXAMPLE_SECRET = K8S_DIR / "overlays" / "example-secret" / "secret.example.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
COMPOSE_SMOKE = ROOT / "deploy" / "compose.smoke.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG_DIR = ROOT / "deploy" / "config"

# The files Compose is run with, together, and the variables each combination needs beyond
# .env.example (scripts/compose-smoke sets HIR_SMOKE_TASKS to a folder it generates).
COMPOSE_COMBINATIONS: list[tuple[list[pathlib.Path], dict[str, str]]] = [
    ([COMPOSE_FILE], {}),
    ([COMPOSE_FILE, COMPOSE_GPU], {}),
    ([COMPOSE_FILE, COMPOSE_SMOKE], {"HIR_SMOKE_TASKS": "/tmp/hindsight-smoke-tasks"}),
]
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27)
# and the newest the pinned kubernetes-validate knows; both ship inside that package.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]

# Each service: its binary, the crate whose configuration struct it reads, the struct.
SERVICES = {
    "generator": ("hir-generator", "crates/hir-generator/src", "GeneratorConfig"),
    "relabeler": ("hir-relabeler", "crates/hir-relabeler/src", "RelabelerConfig"),
    "trainer": ("hir-trainer", "crates/hir-trainer/src", "TrainerConfig"),
}
BINARY_SERVICE = {binary: service for service, (binary, _, _) in SERVICES.items()}
# Keys that hold secrets: they must come from the environment, never from a file.
SECRET_KEY = re.compile(r"(^|_)token$|^database_url$")


def rel(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


class Errors:
    """Collects error messages, each prefixed by where it was found."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        item = f"{where}: {message}"
        if item not in self.items:  # a file reached twice (e.g. a mounted config) counts once
            self.items.append(item)

    def __len__(self) -> int:
        return len(self.items)


# ------------------------------------------------------------------------------------------
# YAML (its syntax, duplicate keys and style are yamllint's to check)


def load_yaml_docs(path: pathlib.Path, errors: Errors) -> list[Any]:
    try:
        with path.open() as f:
            return [d for d in yaml.safe_load_all(f) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        errors.add(rel(path), f"cannot read YAML: {e}")
        return []


# ------------------------------------------------------------------------------------------
# Tools. Each runs in the background from its start to `wait()`; what it reports is parsed
# into problems by file ({file as given: [message]}, "" for those of no file).


class Run:
    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        try:
            self.proc: subprocess.Popen | None = subprocess.Popen(
                argv, cwd=ROOT, env=env, text=True, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as e:
            self.proc, self.failure = None, f"{argv[0]}: {e}"

    def wait(self) -> tuple[int, str, str]:
        """(exit status, stdout, stderr)."""
        if self.proc is None:
            return 127, "", self.failure
        try:
            out, err = self.proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            return 124, out, err + "\ntimed out after 300 s"
        return self.proc.returncode, out, err


Problems = dict[str, list[str]]


def python_tool(module: str, *args: str) -> list[str]:
    """A tool installed from deploy/schemas/requirements.txt, run by this interpreter."""
    return [sys.executable, "-m", module, *args]


def leftover(problems: Problems, status: int, out: str, err: str) -> Problems:
    """A tool that failed without a problem named: all it said is the problem."""
    if status != 0 and not problems:
        problems[""] = [line for line in (out + err).splitlines() if line.strip()] or [
            f"exit status {status}"]
    return problems


def yamllint(files: list[str]) -> Run | None:
    if not files:
        return None
    # .yamllint's top-level `ignore` (the known-bad examples) is for yamllint run by hand:
    # here every file is named, the known-bad ones only when the self-test checks them.
    config = yaml.safe_load(YAMLLINT_CONFIG.read_text())
    config.pop("ignore", None)
    return Run(python_tool("yamllint", "--format", "parsable", "--config-data",
                           json.dumps(config), *files))


LINT_LINE = re.compile(r"^(?P<file>.+?):(?P<line>\d+):(?P<col>\d+): \[\w+\] (?P<message>.+)$")


def line_problems(run: Run | None, pattern: re.Pattern[str],
                  message: Callable[[re.Match[str]], str]) -> Problems:
    """A tool's report of one problem per line, grouped by the file each line names; any
    other output is kept under "" and a failure without a matching line is reported too."""
    if run is None:
        return {}
    status, out, err = run.wait()
    problems: Problems = {}
    for line in (out + err).splitlines():
        m = pattern.match(line)
        if m:
            problems.setdefault(m["file"], []).append(message(m))
        elif line.strip():
            problems.setdefault("", []).append(line)
    return leftover(problems, status, out, err)


def yamllint_problems(run: Run | None) -> Problems:
    return line_problems(run, LINT_LINE, lambda m: f"{m['line']}:{m['col']}: {m['message']}")


def check_jsonschema(files: list[str]) -> Run | None:
    if not files:
        return None
    return Run(python_tool("check_jsonschema", "--schemafile", rel(COMPOSE_SCHEMA),
                           "--output-format", "json", *files))


def check_jsonschema_problems(run: Run | None) -> Problems:
    if run is None:
        return {}
    status, out, err = run.wait()
    problems: Problems = {}
    try:
        report = json.loads(out) if out.strip() else {}
    except json.JSONDecodeError:
        report = {}
    for error in report.get("errors", []):
        # For a oneOf/anyOf failure, the error deepest in the file says what is wrong.
        best = (error.get("has_sub_errors") and error.get("best_deep_match")) or error
        problems.setdefault(error.get("filename", ""), []).append(
            f"{best.get('path')}: {best.get('message')}")
    for error in report.get("parse_errors", []):
        problems.setdefault(error.get("filename", ""), []).append(
            f"cannot read: {error.get('message', error)}")
    return leftover(problems, status, out, err)


def compose_command() -> tuple[list[str], str] | None:
    """How Compose v2 is run here, and its version; None where it is not installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        status, out, _ = Run(command + ["version", "--short"]).wait()
        version = out.strip().removeprefix("v")
        if status == 0 and version.startswith("2."):
            return command, version
    return None


def compose_config(command: list[str], files: list[pathlib.Path], extra: dict[str, str]) -> Run:
    """`config -q`: the files loaded, interpolated with .env.example's values, merged and
    checked by Compose itself. It needs no Docker Engine; none is reachable from it here,
    and no variable of the caller's environment (or .env) changes what it sees."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG", "TMPDIR")}
    env["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    env.update(extra)
    argv = command + ["--env-file", rel(ENV_EXAMPLE)]
    for path in files:
        argv += ["--file", rel(path)]
    return Run(argv + ["config", "--quiet"], env=env)


def compose_problems(runs: dict[str, Run]) -> Problems:
    problems: Problems = {}
    for name, run in runs.items():
        status, out, err = run.wait()
        if status != 0:
            problems[name] = leftover({}, status, out, err)[""]
    return problems


def kubernetes_validate(files: list[str]) -> Run | None:
    if not files:
        return None
    versions = [arg for version in KUBERNETES_VERSIONS for arg in ("-k", version)]
    return Run(python_tool("kubernetes_validate", "--strict", "--quiet", *versions, *files))


# kubernetes-validate's report: one line per object and version that fails (only the first
# error of each); WARN for a kind it has no schema for, which is an error here.
VALIDATE_LINE = re.compile(r"^(?:ERROR|WARN|FATAL) (?P<file>\S+) (?P<message>.+)$")


def kubernetes_validate_problems(run: Run | None) -> Problems:
    return line_problems(
        run, VALIDATE_LINE,
        lambda m: m["message"].removeprefix("did not validate for resource "))


def deployment_yaml_files() -> list[pathlib.Path]:
    """docker-compose.yml and every YAML file under deploy/, but the known-bad examples."""
    found = [p for p in sorted((ROOT / "deploy").rglob("*"))
             if p.suffix in (".yml", ".yaml") and TESTDATA not in p.parents]
    return [COMPOSE_FILE] + found


def json_path(parts: Iterable[Any]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


def schema_errors(validator, instance: Any) -> list[tuple[str, str]]:
    """(path, message) of every error, the most specific one for oneOf/anyOf failures."""
    out = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path)):
        best = jsonschema.exceptions.best_match([error])
        out.append((json_path(best.absolute_path), best.message))
    return out


# ------------------------------------------------------------------------------------------
# Service configuration: schemas derived from the Rust configuration structs.

STRUCT_RE = re.compile(r"^pub struct (\w+)\s*\{\n(.*?)^\}", re.S | re.M)
ENUM_RE = re.compile(r"^pub enum (\w+)\s*\{\n(.*?)^\}", re.S | re.M)
FIELD_RE = re.compile(r"^\s*pub (\w+): (.+),\s*$", re.M)
VARIANT_RE = re.compile(r"^\s*(\w+),\s*$", re.M)
INTEGER_TYPES = {"u8", "u16", "u32", "u64", "usize", "i8", "i16", "i32", "i64", "isize"}


def snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def attributes_before(text: str, start: int) -> str:
    """The attribute and doc-comment lines right above the item starting at `start`."""
    lines = text[:start].splitlines()
    block = []
    for line in reversed(lines):
        if line.startswith(("#[", "///", "//")):
            block.append(line)
        else:
            break
    return "\n".join(reversed(block))


class RustConfigSchemas:
    """Builds a JSON schema for each service's configuration from the serde structs in its
    crate: field names, nesting, scalar types, enum values, deny_unknown_fields."""

    def __init__(self) -> None:
        self.cache: dict[str, dict] = {}

    def schema(self, service: str) -> dict:
        if service not in self.cache:
            _, src, root = SERVICES[service]
            self.cache[service] = self._build(ROOT / src, root)
        return self.cache[service]

    def _build(self, src: pathlib.Path, root: str) -> dict:
        structs: dict[str, tuple[list[tuple[str, str]], bool]] = {}
        enums: dict[str, list[str]] = {}
        files = sorted(src.rglob("*.rs"))
        if not files:
            raise ValueError(f"no Rust sources under {rel(src)}")
        for path in files:
            text = path.read_text()
            for m in STRUCT_RE.finditer(text):
                attrs = attributes_before(text, m.start())
                if "Deserialize" not in attrs:
                    continue
                body = re.sub(r"^\s*(///|//|#\[).*$", "", m.group(2), flags=re.M)
                fields = FIELD_RE.findall(body)
                structs[m.group(1)] = (fields, "deny_unknown_fields" in attrs)
            for m in ENUM_RE.finditer(text):
                attrs = attributes_before(text, m.start())
                if "Deserialize" not in attrs:
                    continue
                body = re.sub(r"^\s*(///|//|#\[).*$", "", m.group(2), flags=re.M)
                variants = VARIANT_RE.findall(body)
                if 'rename_all = "snake_case"' in attrs:
                    variants = [snake_case(v) for v in variants]
                elif 'rename_all = "lowercase"' in attrs:
                    variants = [v.lower() for v in variants]
                enums[m.group(1)] = variants
        if root not in structs:
            raise ValueError(f"struct {root} (with Deserialize) not found under {rel(src)}")

        def of_type(ty: str, trail: str) -> dict:
            ty = ty.strip()
            m = re.fullmatch(r"Option<(.+)>", ty)
            if m:  # TOML has no null: an optional key is either absent or of the inner type
                return of_type(m.group(1), trail)
            m = re.fullmatch(r"Vec<(.+)>", ty)
            if m:
                return {"type": "array", "items": of_type(m.group(1), trail)}
            if ty in ("String", "PathBuf"):
                return {"type": "string"}
            if ty == "SocketAddr":
                return {"type": "string", "pattern": r"^(\[[0-9a-fA-F:.]+\]|[0-9.]+):[0-9]{1,5}$"}
            if ty == "bool":
                return {"type": "boolean"}
            if ty in INTEGER_TYPES:
                schema: dict = {"type": "integer"}
                if ty.startswith("u"):
                    schema["minimum"] = 0
                return schema
            if ty in ("f32", "f64"):
                return {"type": "number"}
            if ty in enums:
                return {"enum": enums[ty]}
            if ty in structs:
                return of_struct(ty, trail)
            raise ValueError(
                f"{trail}: type `{ty}` is not understood by scripts/validate_deploy.py"
            )

        def of_struct(name: str, trail: str) -> dict:
            fields, deny = structs[name]
            return {
                "type": "object",
                "properties": {f: of_type(t, f"{trail}.{f}") for f, t in fields},
                "additionalProperties": not deny,
            }

        return of_struct(root, root)


def config_key_exists(schema: dict, path: list[str]) -> bool:
    node = schema
    for part in path:
        props = node.get("properties")
        if props is None or part not in props:
            return False
        node = props[part]
    return True


def secret_keys(config: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(config, dict):
        for k, v in config.items():
            key = f"{prefix}{k}"
            if SECRET_KEY.search(k):
                out.append(key)
            out += secret_keys(v, key + ".")
    return out


def check_config_text(text: str, service: str, where: str, schemas: RustConfigSchemas,
                      errors: Errors) -> dict | None:
    """Validates the TOML of one service configuration; returns it parsed."""
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        errors.add(where, f"invalid TOML: {e}")
        return None
    try:
        schema = schemas.schema(service)
    except ValueError as e:
        errors.add(where, f"cannot derive the {service} configuration schema: {e}")
        return config
    validator = jsonschema.Draft202012Validator(schema)
    for path, message in schema_errors(validator, config):
        errors.add(where, f"{path}: {message}")
    for key in secret_keys(config):
        errors.add(where, f"{key}: secrets must come from the environment, not the file")
    return config


def check_env_name(name: str, service: str | None, where: str, schemas: RustConfigSchemas,
                   errors: Errors) -> None:
    """HIR_<SERVICE>__A__B must be set on that service and name the key a.b."""
    m = re.fullmatch(r"HIR_([A-Z]+)__(.+)", name)
    if not m:
        return
    target = m.group(1).lower()
    if target not in SERVICES:
        errors.add(where, f"{name}: no service `{target}`")
        return
    if service is not None and target != service:
        errors.add(where, f"{name}: set on the {service}, but configures the {target}")
        return
    path = [p.lower() for p in m.group(2).split("__")]
    try:
        schema = schemas.schema(target)
    except ValueError as e:
        errors.add(where, f"cannot derive the {target} configuration schema: {e}")
        return
    if not config_key_exists(schema, path):
        errors.add(where, f"{name}: the {target} has no configuration key `{'.'.join(path)}`")


def service_of_command(command: Any) -> str | None:
    if isinstance(command, list) and command:
        return BINARY_SERVICE.get(str(command[0]))
    if isinstance(command, str) and command.split():
        return BINARY_SERVICE.get(command.split()[0])
    return None


def config_argument(command: Any) -> str | None:
    args = command if isinstance(command, list) else str(command or "").split()
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return str(args[i + 1])
        if isinstance(arg, str) and arg.startswith("--config="):
            return arg.split("=", 1)[1]
    return None


def listen_port(config: dict | None) -> int | None:
    if config and isinstance(config.get("listen"), str):
        try:
            return int(config["listen"].rsplit(":", 1)[1])
        except (IndexError, ValueError):
            return None
    return None


# ------------------------------------------------------------------------------------------
# Compose

INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)"
    r"|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


def read_env_file(path: pathlib.Path, errors: Errors) -> dict[str, str]:
    env: dict[str, str] = {}
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        errors.add(rel(path), f"cannot read: {e}")
        return env
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)", line)
        if not m:
            errors.add(f"{rel(path)}:{n}", "expected KEY=VALUE")
            continue
        value = m.group(2).strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[m.group(1)] = value
    return env


def interpolate(node: Any, env: dict[str, str], where: str, path: list, errors: Errors) -> Any:
    """Compose's ${VAR} interpolation of every string value, variables from `env` only."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, where, path + [k], errors) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, where, path + [i], errors) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node

    def substitute(m: re.Match) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("named")
        op, arg = m.group("op"), m.group("arg") or ""
        value = env.get(name)
        unset_or_empty = value is None or (value == "" and op and op.startswith(":"))
        if op in (":-", "-"):
            return arg if unset_or_empty else value
        if op in (":?", "?"):
            if unset_or_empty:
                errors.add(where, f"{json_path(path)}: ${{{name}}} is required ({arg or 'unset'})"
                           f" and not set in {rel(ENV_EXAMPLE)}")
                return ""
            return value
        if op in (":+", "+"):
            return "" if unset_or_empty else arg
        if value is None:
            errors.add(where, f"{json_path(path)}: ${{{name}}} has no default and is not set"
                       f" in {rel(ENV_EXAMPLE)}")
            return ""
        return value

    return INTERPOLATION.sub(substitute, node)


# Compose merge rules (compose-spec merge.md), as far as validation needs them: mappings
# merge key by key, these sequences are replaced, other sequences are appended (unique).
REPLACED_SEQUENCES = {"command", "entrypoint", "test", "device_ids", "capabilities"}


def compose_merge(base: Any, override: Any, key: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = compose_merge(base[k], v, k) if k in base else v
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED_SEQUENCES:
        return base + [v for v in override if v not in base]
    return override


def check_compose_project(project: dict, where: str, schemas: RustConfigSchemas,
                          errors: Errors) -> None:
    """References between the services of an interpolated (and merged) Compose project."""
    services = project.get("services") or {}
    volumes = set((project.get("volumes") or {}).keys())
    for name, service in services.items():
        if not isinstance(service, dict):
            continue
        at = f"{where}: services.{name}"
        depends = service.get("depends_on") or {}
        for dep in depends if isinstance(depends, (list, dict)) else []:
            if dep not in services:
                errors.add(at, f"depends_on `{dep}`: no such service")
        if isinstance(depends, dict):
            for dep, spec in depends.items():
                condition = (spec or {}).get("condition")
                target = services.get(dep) or {}
                if condition == "service_healthy" and "healthcheck" not in target:
                    errors.add(at, f"waits for `{dep}` to be healthy, which has no healthcheck")

        mounts: dict[str, str] = {}  # container path -> host source
        for volume in service.get("volumes") or []:
            if isinstance(volume, str):
                parts = volume.split(":")
                source, target = (parts[0], parts[1]) if len(parts) > 1 else (None, parts[0])
            elif isinstance(volume, dict):
                source, target = volume.get("source"), volume.get("target")
            else:
                continue
            if source is None:
                continue
            if source.startswith((".", "/", "~")):
                host = (ROOT / source).resolve() if source.startswith(".") else None
                # Docker creates a missing directory; a missing file is a mistake.
                if host is not None and host.suffix and not host.exists():
                    errors.add(at, f"bind mount source {source} does not exist")
                if host is not None:
                    mounts[str(target)] = str(host)
            elif source not in volumes:
                errors.add(at, f"named volume `{source}` is not declared under top-level volumes")

        command = service.get("command")
        svc = service_of_command(command)
        env = service.get("environment") or {}
        names = list(env.keys()) if isinstance(env, dict) else [
            str(e).split("=", 1)[0] for e in env
        ]
        for var in names:
            check_env_name(var, svc, at, schemas, errors)
        if svc is None:
            continue
        config = None
        config_path = config_argument(command)
        if config_path is None:
            errors.add(at, f"{SERVICES[svc][0]} runs without --config")
        elif config_path not in mounts:
            errors.add(at, f"--config {config_path} is not a mounted file")
        else:
            host = pathlib.Path(mounts[config_path])
            if host.is_file():
                config = check_config_text(host.read_text(), svc, rel(host), schemas, errors)
        port = listen_port(config)
        test = (service.get("healthcheck") or {}).get("test")
        if test is not None and port is not None:
            text = " ".join(map(str, test)) if isinstance(test, list) else str(test)
            m = re.search(r"--addr\s+\S+:(\d+)", text)
            if m and int(m.group(1)) != port:
                errors.add(at, f"healthcheck probes port {m.group(1)}, the service listens on {port}")


def check_compose(files: list[pathlib.Path], env: dict[str, str], schemas: RustConfigSchemas,
                  errors: Errors) -> None:
    """Interpolates and merges `files` in order, then checks the references between the
    services of the result."""
    merged: Any = None
    for path in files:
        docs = load_yaml_docs(path, errors)
        if len(docs) != 1 or not isinstance(docs[0], dict):
            if docs:
                errors.add(rel(path), "expected one YAML mapping")
            return
        doc = interpolate(docs[0], env, rel(path), [], errors)
        merged = doc if merged is None else compose_merge(merged, doc)
    check_compose_project(merged, " + ".join(rel(f) for f in files), schemas, errors)


# ------------------------------------------------------------------------------------------
# Kubernetes


POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}


def check_pod(doc: dict, where: str, objects: dict, schemas: RustConfigSchemas,
              errors: Errors) -> None:
    """Resources, security settings and references of one pod template."""
    kind, name = doc["kind"], doc.get("metadata", {}).get("name")
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    at = f"{where}: {kind}/{name}"
    security = pod.get("securityContext") or {}
    if security.get("runAsNonRoot") is not True:
        errors.add(at, "spec.template.spec.securityContext.runAsNonRoot must be true")
    if (security.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        errors.add(at, "spec.template.spec.securityContext.seccompProfile.type must be RuntimeDefault")

    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    claim_templates = {
        (t.get("metadata") or {}).get("name")
        for t in (doc.get("spec") or {}).get("volumeClaimTemplates") or []
    }
    for vname, volume in volumes.items():
        if "configMap" in volume and ("ConfigMap", volume["configMap"].get("name")) not in objects:
            errors.add(at, f"volume {vname}: no ConfigMap `{volume['configMap'].get('name')}`")
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if claim and ("PersistentVolumeClaim", claim) not in objects:
            errors.add(at, f"volume {vname}: no PersistentVolumeClaim `{claim}`")

    for container in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        cat = f"{at} container {container.get('name')}"
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in (resources.get(section) or {}):
                    errors.add(cat, f"resources.{section}.{resource} is not set")
        csc = container.get("securityContext") or {}
        if csc.get("allowPrivilegeEscalation") is not False:
            errors.add(cat, "securityContext.allowPrivilegeEscalation must be false")
        if "ALL" not in ((csc.get("capabilities") or {}).get("drop") or []):
            errors.add(cat, "securityContext.capabilities.drop must include ALL")

        mounted = {
            m.get("name"): m for m in container.get("volumeMounts") or []
        }
        for mname in mounted:
            if mname not in volumes and mname not in claim_templates:
                errors.add(cat, f"volumeMount {mname}: no such volume")

        ports = {p.get("containerPort") for p in container.get("ports") or []}
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = (container.get(probe) or {}).get("grpc")
            if grpc and grpc.get("port") not in ports:
                errors.add(cat, f"{probe}.grpc.port {grpc.get('port')} is not a containerPort")

        for env in container.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                secret = objects.get(("Secret", ref.get("name")))
                if secret is None:
                    errors.add(cat, f"env {env.get('name')}: no Secret `{ref.get('name')}`")
                elif ref.get("key") not in {**(secret.get("data") or {}),
                                            **(secret.get("stringData") or {})}:
                    errors.add(cat, f"env {env.get('name')}: Secret `{ref.get('name')}`"
                               f" has no key `{ref.get('key')}`")

        command = (container.get("command") or []) + (container.get("args") or [])
        svc = service_of_command(command)
        for env in container.get("env") or []:
            check_env_name(str(env.get("name")), svc, cat, schemas, errors)
        if svc is None:
            continue
        config_path = config_argument(command)
        if config_path is None:
            errors.add(cat, f"{SERVICES[svc][0]} runs without --config")
            continue
        config_dir, config_file = config_path.rsplit("/", 1)
        source = None
        for mname, mount in mounted.items():
            volume = volumes.get(mname) or {}
            if mount.get("mountPath") == config_dir and "configMap" in volume:
                source = objects.get(("ConfigMap", volume["configMap"].get("name")))
        if source is None or config_file not in (source.get("data") or {}):
            errors.add(cat, f"--config {config_path} is not a key of a ConfigMap mounted at {config_dir}")
        if f"{svc}.toml" != config_file:
            errors.add(cat, f"{SERVICES[svc][0]} reads {config_file}; expected {svc}.toml")


def check_generator_lists(objects: dict, where: str, errors: Errors,
                          configs: dict[str, dict]) -> None:
    """The relabeler and the trainer must find every generator replica: through the headless
    Service's name (`dns://<service>:<port>`, re-resolved as replicas come and go), or by
    listing each replica's stable name."""
    sts = objects.get(("StatefulSet", "generator"))
    if sts is None:
        errors.add(where, "no StatefulSet `generator`")
        return
    spec = sts.get("spec") or {}
    service_name = spec.get("serviceName")
    service = objects.get(("Service", service_name))
    if service is None or (service.get("spec") or {}).get("clusterIP") != "None":
        errors.add(where, f"StatefulSet/generator: serviceName `{service_name}` must be a"
                   " headless Service (clusterIP: None), for per-replica DNS names")
    port = listen_port(configs.get("generator")) or 50051
    expected = [
        f"http://generator-{i}.{service_name}:{port}" for i in range(int(spec.get("replicas", 1)))
    ]
    by_name = [f"dns://{service_name}:{port}"]
    for svc in ("relabeler", "trainer"):
        listed = (configs.get(svc) or {}).get("generators")
        if listed is not None and listed not in (expected, by_name):
            errors.add(where, f"ConfigMap {svc}-config: generators = {listed}, but the"
                       f" StatefulSet's {len(expected)} replicas are {by_name} by name"
                       f" or {expected}")


def load_manifests(paths: list[pathlib.Path], errors: Errors) -> list[tuple[str, dict]]:
    """Every object of the files in `paths`, each with where it was found."""
    located: list[tuple[str, dict]] = []
    for path in paths:
        for i, doc in enumerate(load_yaml_docs(path, errors)):
            where = f"{rel(path)}[{i}]"
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                errors.add(where, "not a Kubernetes object (apiVersion and kind are required)")
                continue
            located.append((where, doc))
    return located


def check_manifests(paths: list[pathlib.Path], schemas: RustConfigSchemas, errors: Errors) -> None:
    """The project's checks of the objects in `paths`, without the checks across a render."""
    check_objects(load_manifests(paths, errors), schemas, errors, rel(K8S_DIR),
                  cross_checks=False)


def check_objects(located: list[tuple[str, dict]], schemas: RustConfigSchemas, errors: Errors,
                  render: str, external: dict | None = None, cross_checks: bool = True) -> None:
    """Checks one set of objects, as `kubectl apply` would receive them (`render` names it);
    `external` holds the objects made outside it (the Secret created by hand)."""
    objects: dict[tuple[str, str], dict] = {}
    for where, doc in located:
        name = (doc.get("metadata") or {}).get("name")
        if (doc["kind"], name) in objects:
            errors.add(where, f"{doc['kind']}/{name} is defined twice")
        objects[(doc["kind"], name)] = doc
    reachable = {**(external or {}), **objects}

    configs: dict[str, dict] = {}
    for where, doc in located:
        if doc["kind"] == "ConfigMap":
            for key, text in (doc.get("data") or {}).items():
                svc = key.removesuffix(".toml")
                if key.endswith(".toml") and svc in SERVICES:
                    parsed = check_config_text(str(text), svc, f"{where} ConfigMap/"
                                               f"{doc['metadata'].get('name')} {key}", schemas, errors)
                    if parsed is not None:
                        configs[svc] = parsed
        if doc["kind"] in POD_TEMPLATE_KINDS:
            check_pod(doc, where, reachable, schemas, errors)
    if cross_checks:
        check_generator_lists(objects, render, errors, configs)


# Kustomize, as far as the kustomizations under deploy/k8s use it: kubectl kustomize renders
# them where kubectl is installed, and this render must then be the same. Keys kustomize
# knows but this renderer does not are refused rather than ignored, so that a render is
# never wrong in silence where kubectl is missing.
RENDERED_KEYS = {"apiVersion", "kind", "namespace", "resources", "images", "replicas",
                 "patches", "replacements"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
REPLICATED_KINDS = {"Deployment", "StatefulSet", "ReplicaSet"}


def inside(path: pathlib.Path, folder: pathlib.Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def pod_containers(doc: dict) -> list[dict]:
    pod = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
    return (pod.get("initContainers") or []) + (pod.get("containers") or [])


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """`registry/name:tag@digest` -> (registry/name, tag, digest)."""
    name, _, digest = image.partition("@")
    slash, colon = name.rfind("/"), name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def json_patch(doc: Any, ops: list) -> str | None:
    """Applies RFC 6902 operations (add, remove, replace, test) to `doc` in place; returns
    what went wrong, or None."""
    for n, op in enumerate(ops):
        if not isinstance(op, dict) or not isinstance(op.get("path"), str):
            return f"operation {n}: needs `op` and `path`"
        kind, path = op.get("op"), op["path"]
        if kind not in ("add", "remove", "replace", "test"):
            return f"operation {n}: `{kind}` is not rendered by scripts/validate_deploy.py"
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        if not path.startswith("/") or not parts:
            return f"operation {n}: path {path!r} must start with / and name a field"
        parent = doc
        for part in parts[:-1]:
            if isinstance(parent, list) and part.isdigit() and int(part) < len(parent):
                parent = parent[int(part)]
            elif isinstance(parent, dict) and part in parent:
                parent = parent[part]
            else:
                return f"operation {n} ({kind} {path}): {part!r} does not exist"
        last = parts[-1]
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(op.get("value"))
                continue
            if not last.isdigit() or int(last) > len(parent) - (kind != "add"):
                return f"operation {n} ({kind} {path}): no index {last!r}"
            index = int(last)
            if kind == "add":
                parent.insert(index, op.get("value"))
            elif kind == "remove":
                del parent[index]
            elif kind == "replace":
                parent[index] = op.get("value")
            elif parent[index] != op.get("value"):
                return f"operation {n} (test {path}): {parent[index]!r} != {op.get('value')!r}"
        elif isinstance(parent, dict):
            if kind != "add" and last not in parent:
                return f"operation {n} ({kind} {path}): {last!r} does not exist"
            if kind in ("add", "replace"):
                parent[last] = op.get("value")
            elif kind == "remove":
                del parent[last]
            elif parent[last] != op.get("value"):
                return f"operation {n} (test {path}): {parent[last]!r} != {op.get('value')!r}"
        else:
            return f"operation {n} ({kind} {path}): the parent is not an object or a list"
    return None


def field_path(doc: Any, path: str, create: Any = None) -> tuple[bool, Any]:
    """Kustomize's fieldPath (`spec.template.spec.containers.[name=x].image`): (found,
    value); with `create` not None, sets the (existing) field to it."""
    parts = re.findall(r"\[[^\]]*\]|[^.]+", path)
    node = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if part.startswith("[") and isinstance(node, list):
            key, _, value = part[1:-1].partition("=")
            matches = [e for e in node if isinstance(e, dict) and str(e.get(key)) == value]
            if len(matches) != 1:
                return False, None
            node = matches[0]
            if last and create is not None:
                return False, None  # replacing a whole list element: not needed here
        elif isinstance(node, dict) and part in node:
            if last and create is not None:
                node[part] = create
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            if last and create is not None:
                node[int(part)] = create
            node = node[int(part)]
        else:
            return False, None
    return True, node


def selects(doc: dict, selector: dict) -> bool:
    api = str(doc.get("apiVersion", ""))
    group, _, version = api.rpartition("/")
    meta = doc.get("metadata") or {}
    wanted = {"group": group, "version": version, "kind": doc.get("kind"),
              "name": meta.get("name"), "namespace": meta.get("namespace")}
    return all(wanted.get(k) == v for k, v in selector.items() if k in wanted)


def render_kustomization(folder: pathlib.Path, errors: Errors, files: set[pathlib.Path],
                         stack: tuple[pathlib.Path, ...] = ()) -> list[tuple[str, dict]]:
    """What `kubectl kustomize folder` makes, as (where each object was defined, object);
    `files` collects the files read. Also checks the kustomization: its keys, that its
    resources exist, and that every YAML file in its folder is a resource or a patch of it
    (a manifest left out would be deployed by nobody)."""
    path = folder / "kustomization.yaml"
    at = rel(path)
    docs = load_yaml_docs(path, errors)
    files.add(path)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        errors.add(at, "expected one YAML mapping")
        return []
    doc = docs[0]
    for key in doc:
        if key not in RENDERED_KEYS:
            errors.add(at, f"`{key}` is not rendered by scripts/validate_deploy.py (it renders"
                       f" {', '.join(sorted(RENDERED_KEYS - {'apiVersion', 'kind'}))})")
    if doc.get("kind") != "Kustomization":
        errors.add(at, "kind must be Kustomization")

    out: list[list] = []  # [where, object]
    used: set[pathlib.Path] = set()
    for entry in doc.get("resources") or []:
        target = (folder / str(entry)).resolve()
        if target.is_dir():
            if inside(folder, target) or target in stack:
                errors.add(at, f"resource {entry}: contains this kustomization (kustomize"
                           " refuses the cycle; keep shared manifests in a sibling folder)")
                continue
            out += [list(o) for o in render_kustomization(target, errors, files,
                                                          stack + (folder.resolve(),))]
        elif target.is_file():
            if not inside(target, folder):
                errors.add(at, f"resource {entry}: a file outside the kustomization's folder"
                           " (kustomize refuses it; name the folder that holds it)")
                continue
            used.add(target)
            files.add(target)
            out += [list(o) for o in load_manifests([target], errors)]
        else:
            errors.add(at, f"resource {entry} does not exist")

    for n, patch in enumerate(doc.get("patches") or []):
        pat = f"{at}: patches[{n}]"
        if not isinstance(patch, dict) or ("path" in patch) == ("patch" in patch):
            errors.add(pat, "needs either `path` or `patch`")
            continue
        if "path" in patch:
            source = (folder / str(patch["path"])).resolve()
            if not source.is_file() or not inside(source, folder):
                errors.add(pat, f"{patch['path']}: no such file in the kustomization's folder")
                continue
            used.add(source)
            files.add(source)
            pdocs = load_yaml_docs(source, errors)
            ops = pdocs[0] if len(pdocs) == 1 else None
        else:
            try:
                ops = yaml.safe_load(str(patch["patch"]))
            except yaml.YAMLError as e:
                errors.add(pat, f"cannot read the patch: {e}")
                continue
        if not isinstance(ops, list):
            errors.add(pat, "only JSON6902 patches (a list of operations) are rendered by"
                       " scripts/validate_deploy.py")
            continue
        selector = patch.get("target") or {}
        if not isinstance(selector, dict) or not {"kind", "name"} <= set(selector):
            errors.add(pat, "`target` must name at least the kind and the name")
            continue
        matched = [o for o in out if selects(o[1], selector)]
        if not matched:
            errors.add(pat, f"target {selector} matches no object")
        for o in matched:
            problem = json_patch(o[1], ops)
            if problem:
                errors.add(pat, f"{o[1]['kind']}/{o[1]['metadata'].get('name')}: {problem}")

    namespace = doc.get("namespace")
    if namespace:
        for _, obj in out:
            if obj.get("kind") not in CLUSTER_SCOPED_KINDS:
                obj.setdefault("metadata", {})["namespace"] = namespace

    for entry in doc.get("replicas") or []:
        if not isinstance(entry, dict) or set(entry) != {"name", "count"}:
            errors.add(at, f"replicas entry {entry}: needs exactly `name` and `count`")
            continue
        matched = [o for o in out if o[1].get("kind") in REPLICATED_KINDS
                   and (o[1].get("metadata") or {}).get("name") == entry["name"]]
        if not matched:
            errors.add(at, f"replicas entry {entry}: no Deployment or StatefulSet of that name")
        for _, obj in matched:
            obj.setdefault("spec", {})["replicas"] = entry["count"]

    for image in doc.get("images") or []:
        unknown = set(image) - {"name", "newName", "newTag", "digest"}
        if unknown or "name" not in image:
            errors.add(at, f"images entry {image}: needs `name`; unknown {sorted(unknown)}")
            continue
        for _, obj in out:
            for container in pod_containers(obj):
                name, tag, digest = split_image(str(container.get("image", "")))
                if name != image["name"]:
                    continue
                name = image.get("newName", name)
                if "digest" in image:
                    container["image"] = f"{name}@{image['digest']}"
                elif "newTag" in image:
                    container["image"] = f"{name}:{image['newTag']}"
                else:
                    container["image"] = name + (f":{tag}" if tag else "") + (
                        f"@{digest}" if digest else "")

    for n, replacement in enumerate(doc.get("replacements") or []):
        rat = f"{at}: replacements[{n}]"
        source = (replacement or {}).get("source") or {}
        if set(replacement or {}) != {"source", "targets"} or "fieldPath" not in source:
            errors.add(rat, "needs `source` (with `fieldPath`) and `targets`, nothing else")
            continue
        selector = {k: v for k, v in source.items() if k != "fieldPath"}
        matched = [o for o in out if selects(o[1], selector)]
        if len(matched) != 1:
            errors.add(rat, f"source {selector} matches {len(matched)} objects, not one")
            continue
        found, value = field_path(matched[0][1], source["fieldPath"])
        if not found:
            errors.add(rat, f"source has no {source['fieldPath']}")
            continue
        for target in replacement.get("targets") or []:
            if set(target) != {"select", "fieldPaths"}:
                errors.add(rat, f"target {target}: needs `select` and `fieldPaths`, nothing else")
                continue
            chosen = [o for o in out if selects(o[1], target["select"])]
            if not chosen:
                errors.add(rat, f"target {target['select']} matches no object")
            for _, obj in chosen:
                for fp in target["fieldPaths"]:
                    if not field_path(obj, fp, create=value)[0]:
                        errors.add(rat, f"{obj['kind']}/{obj['metadata'].get('name')} has no {fp}")

    present = {p.resolve() for p in folder.glob("*.y*ml") if p.name != "kustomization.yaml"}
    for orphan in sorted(present - used):
        errors.add(at, f"{rel(orphan)} is neither listed under resources nor a patch")
    return [(where, obj) for where, obj in out]


def kustomizations() -> list[pathlib.Path]:
    """The folders one applies: the default, deploy/k8s, and each of its overlays."""
    overlays = sorted(p.parent for p in (K8S_DIR / "overlays").glob("*/kustomization.yaml"))
    return [K8S_DIR] + overlays


def gpus_requested(located: list[tuple[str, dict]]) -> int:
    total = 0
    for _, doc in located:
        if doc.get("kind") in REPLICATED_KINDS:
            replicas = int((doc.get("spec") or {}).get("replicas", 1))
            for container in pod_containers(doc):
                requests = (container.get("resources") or {}).get("requests") or {}
                total += replicas * int(requests.get("nvidia.com/gpu", 0))
    return total


def object_key(doc: dict) -> tuple[str, str, str]:
    meta = doc.get("metadata") or {}
    return str(doc.get("kind")), str(meta.get("namespace") or ""), str(meta.get("name"))


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first field at which `a` and `b` differ, or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"{path}.{key}".lstrip(".")
            found = first_difference(a[key], b[key], f"{path}.{key}")
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found:
                return found
        return None
    return None if a == b else (path.lstrip(".") or "(top level)")


def compare_renders(ours: list[dict], theirs: list[dict], folder: pathlib.Path,
                    errors: Errors) -> None:
    """kubectl kustomize's render against this file's: the project checks read this one."""
    mine = {object_key(d): d for d in ours}
    kubectl = {object_key(d): d for d in theirs}
    at = f"{rel(folder)}: kubectl kustomize and scripts/validate_deploy.py render it differently"
    for kind, _, name in sorted(set(kubectl) - set(mine)):
        errors.add(at, f"{kind}/{name} only in kubectl's render")
    for kind, _, name in sorted(set(mine) - set(kubectl)):
        errors.add(at, f"{kind}/{name} only in this file's render")
    for key in sorted(set(mine) & set(kubectl)):
        field = first_difference(mine[key], kubectl[key])
        if field:
            errors.add(at, f"{key[0]}/{key[2]}: {field}")


def kubectl_render(run: Run, folder: pathlib.Path, errors: Errors) -> list[dict] | None:
    status, out, err = run.wait()
    if status != 0:
        errors.add(f"kubectl kustomize {rel(folder)}", err.strip() or f"exit status {status}")
        return None
    try:
        return [d for d in yaml.safe_load_all(out) if d is not None]
    except yaml.YAMLError as e:
        errors.add(f"kubectl kustomize {rel(folder)}", f"cannot read its output: {e}")
        return None


def check_kubernetes(schemas: RustConfigSchemas, errors: Errors, verbose: bool,
                     kubectl: str | None) -> tuple[int, dict[str, list[dict]]]:
    """Renders the default and every overlay, here and with kubectl kustomize where kubectl
    is installed, and checks each render; returns how many files were read, and each
    render's objects (kubectl's where there is one) for kubernetes-validate. The `hindsight`
    Secret is created by hand, outside the renders (only the example-secret overlay carries
    one): Secret references are checked against the keys of that example."""
    external = {
        (doc["kind"], (doc.get("metadata") or {}).get("name")): doc
        for _, doc in load_manifests([EXAMPLE_SECRET], errors)
    }
    files: set[pathlib.Path] = {EXAMPLE_SECRET.resolve()}
    folders = kustomizations()
    kubectl_runs = {f: Run([kubectl, "kustomize", rel(f)]) for f in folders} if kubectl else {}
    default: dict[tuple[str, str], tuple[str, str]] = {}
    renders: dict[str, list[dict]] = {}
    for folder in folders:
        located = render_kustomization(folder, errors, files)
        # An object as the default renders it keeps its file as the place of its errors;
        # one an overlay changes says so.
        shown = []
        for where, doc in located:
            key = (doc["kind"], (doc.get("metadata") or {}).get("name"))
            text = json.dumps(doc, sort_keys=True)
            if folder == K8S_DIR:
                default[key] = (where, text)
            elif default.get(key, ("", ""))[1] != text:
                where = f"{where} as {rel(folder)} renders it"
            shown.append((where, doc))
        check_objects(shown, schemas, errors, rel(folder), external)
        objects = [doc for _, doc in located]
        if folder in kubectl_runs:
            theirs = kubectl_render(kubectl_runs[folder], folder, errors)
            if theirs is not None:
                compare_renders(objects, theirs, folder, errors)
                objects = theirs
        renders[rel(folder)] = objects
        if verbose:
            kinds: dict[str, int] = {}
            for _, doc in located:
                kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
            print(f"kubernetes: {rel(folder)}: {len(located)} objects"
                  f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}),"
                  f" GPUs requested: {gpus_requested(located)}")
    return len(files), renders


def write_renders(renders: dict[str, list[dict]], folder: pathlib.Path) -> dict[str, str]:
    """Writes, for kubernetes-validate, each render's objects that no render before it has,
    one file per render; returns each file's path and the render it stands for."""
    seen: set[str] = set()
    names: dict[str, str] = {}
    for label, objects in renders.items():
        new = []
        for obj in objects:
            text = json.dumps(obj, sort_keys=True, default=str)
            if text not in seen:
                seen.add(text)
                new.append(obj)
        if new:
            path = folder / (label.replace("/", "_") + ".yaml")
            path.write_text(yaml.safe_dump_all(new, sort_keys=False))
            names[str(path)] = f"render of {label}"
    return names


# ------------------------------------------------------------------------------------------
# Images


def check_images(errors: Errors) -> None:
    """ARG RUST_VERSION against rust-toolchain.toml; the CUDA features and the shipped
    binaries against the crates."""
    channel = tomllib.loads((ROOT / "rust-toolchain.toml").read_text())["toolchain"]["channel"]
    features: dict[str, set[str]] = {}
    binaries: set[str] = set()
    for manifest in sorted((ROOT / "crates").glob("*/Cargo.toml")):
        data = tomllib.loads(manifest.read_text())
        package = data.get("package", {}).get("name", manifest.parent.name)
        features[package] = set(data.get("features", {}))
        binaries |= {b.get("name") for b in data.get("bin", [])}
    for dockerfile in (ROOT / "Dockerfile", ROOT / "deploy" / "Dockerfile.cuda"):
        where = rel(dockerfile)
        text = dockerfile.read_text()
        m = re.search(r"^ARG RUST_VERSION=(\S+)", text, re.M)
        if not m or m.group(1) != channel:
            errors.add(where, f"ARG RUST_VERSION={m.group(1) if m else '(missing)'} differs from"
                       f" rust-toolchain.toml's channel {channel}")
        for binary in re.findall(r"target/release/([\w-]+)", text):
            if binary not in binaries:
                errors.add(where, f"copies target/release/{binary}, which no crate builds")
        m = re.search(r"^ARG CUDA_FEATURES=(\S+)", text, re.M)
        for feature in (m.group(1).split(",") if m else []):
            package, _, name = feature.partition("/")
            if name not in features.get(package, set()):
                errors.add(where, f"CUDA_FEATURES names {feature}, which {package} does not have")


# ------------------------------------------------------------------------------------------
# Self-test

# The checks a known-bad example can expect to reject it, as `# expect CHECK: TEXT`.
EXPECT = re.compile(r"^# expect (?P<check>[^:\n]+): (?P<text>.+)$", re.M)
CHECKS = ("yamllint", "check-jsonschema", "docker compose", "kubernetes-validate",
          "validate_deploy.py")


def known_bad() -> list[tuple[pathlib.Path, dict[str, list[str]]]]:
    """Each file in deploy/schemas/testdata with the texts each check must report on it."""
    out = []
    for path in sorted(TESTDATA.iterdir()):
        expected: dict[str, list[str]] = {}
        for m in EXPECT.finditer(path.read_text()):
            expected.setdefault(m["check"], []).append(m["text"])
        out.append((path, expected))
    return out


def project_checks(path: pathlib.Path, env: dict[str, str],
                   schemas: RustConfigSchemas) -> list[str] | None:
    """This file's checks of one known-bad example, by the kind its name starts with;
    None for a kind it does not check."""
    errors = Errors()
    kind = path.name.split("-")[0]
    if kind == "compose":
        check_compose([path], env, schemas, errors)
    elif kind == "k8s":
        check_manifests([path], schemas, errors)
    elif kind in SERVICES and path.suffix == ".toml":
        check_config_text(path.read_text(), kind, rel(path), schemas, errors)
    else:
        return None
    return errors.items


def self_test(tests: list[tuple[pathlib.Path, dict[str, list[str]]]],
              results: dict[str, Problems], skipped: set[str]) -> list[str]:
    """Each known-bad example must be rejected by every check it names, with its texts."""
    failures = []
    if not tests:
        return [f"{rel(TESTDATA)}: no test files"]
    for path, expected in tests:
        name = rel(path)
        if not expected:
            failures.append(f"{name}: has no `# expect CHECK: TEXT` line")
        for check, texts in expected.items():
            if check not in CHECKS:
                failures.append(f"{name}: `{check}` is not one of {', '.join(CHECKS)}")
                continue
            if check in skipped:
                continue
            got = results[check].get(name)
            if got is None and check == "validate_deploy.py":
                failures.append(f"{name}: not a kind of file validate_deploy.py checks"
                                " (compose-*, k8s-*, <service>-*.toml)")
                continue
            if not got:
                failures.append(f"{name}: accepted by {check}, but it must be rejected")
                continue
            for text in texts:
                if not any(text in problem for problem in got):
                    failures.append(f"{name}: no {check} error mentions {text!r}; got: {got}")
    return failures


# ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true",
                        help="only check that the known-bad examples are rejected")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="say what each tool checked")
    args = parser.parse_args()
    started = time.monotonic()
    errors = Errors()
    schemas = RustConfigSchemas()
    env = read_env_file(ENV_EXAMPLE, errors)
    tests = known_bad()

    def named(check: str) -> list[str]:
        return [rel(path) for path, expected in tests if check in expected]

    compose = compose_command()
    kubectl = shutil.which("kubectl")
    notes = []
    if compose is None:
        notes.append("no Compose v2 here (scripts/fetch-docker-plugins installs it):"
                     " `docker compose config` did not run")
    if kubectl is None and not args.self_test:
        notes.append("no kubectl here: deploy/k8s was rendered by scripts/validate_deploy.py"
                     " alone")

    # The tools start at once and run while the checks of this file do.
    yaml_files = [] if args.self_test else deployment_yaml_files()
    compose_files = [] if args.self_test else [COMPOSE_FILE, COMPOSE_GPU, COMPOSE_SMOKE]
    lint = yamllint([rel(p) for p in yaml_files] + named("yamllint"))
    spec = check_jsonschema([rel(p) for p in compose_files] + named("check-jsonschema"))
    compose_runs: dict[str, Run] = {}
    if compose is not None:
        combinations = [] if args.self_test else COMPOSE_COMBINATIONS
        for files, extra in combinations + [([ROOT / n], {}) for n in named("docker compose")]:
            compose_runs[" + ".join(rel(f) for f in files)] = compose_config(compose[0], files,
                                                                             extra)

    renders: dict[str, list[dict]] = {}
    checked = len(yaml_files)
    if not args.self_test:
        # Compose: each combination, merged, as Compose is run with it.
        for files, extra in COMPOSE_COMBINATIONS:
            check_compose(files, {**env, **extra}, schemas, errors)
        # Service configuration files (also reached through the Compose mounts).
        for path in sorted(CONFIG_DIR.glob("*.toml")):
            if path.stem not in SERVICES:
                errors.add(rel(path), f"no service `{path.stem}`")
                continue
            check_config_text(path.read_text(), path.stem, rel(path), schemas, errors)
            checked += 1
        renders = check_kubernetes(schemas, errors, args.verbose, kubectl)[1]
        check_images(errors)
        checked += 2

    with tempfile.TemporaryDirectory(prefix="validate-deploy-") as tmp:
        render_files = write_renders(renders, pathlib.Path(tmp))
        validate = kubernetes_validate(list(render_files) + named("kubernetes-validate"))
        results = {
            "yamllint": yamllint_problems(lint),
            "check-jsonschema": check_jsonschema_problems(spec),
            "docker compose": compose_problems(compose_runs),
            "kubernetes-validate": kubernetes_validate_problems(validate),
        }
    test_names = {rel(path) for path, _ in tests}
    for check, problems in results.items():
        for name, messages in problems.items():
            if name in test_names:
                continue  # the self-test's
            where = render_files.get(name, name)
            for message in messages:
                errors.add(f"{check}: {where}" if where else check, message)
    results["validate_deploy.py"] = {}
    for path, expected in tests:
        found = project_checks(path, env, schemas) if "validate_deploy.py" in expected else None
        if found is not None:
            results["validate_deploy.py"][rel(path)] = found
    failures = self_test(tests, results, set() if compose else {"docker compose"})

    if args.verbose and not args.self_test:
        objects = sum(len(objs) for objs in renders.values())
        print(f"yamllint: {len(yaml_files)} files, rules of {rel(YAMLLINT_CONFIG)}")
        print(f"check-jsonschema: {', '.join(rel(f) for f in compose_files)} against"
              f" {rel(COMPOSE_SCHEMA)}")
        if compose is not None:
            runs = [name for name in compose_runs if name not in test_names]
            print(f"docker compose {compose[1]}: config of {'; '.join(runs)}")
        print(f"kubernetes-validate --strict, Kubernetes {' and '.join(KUBERNETES_VERSIONS)}:"
              f" the {objects} objects of {len(renders)} renders by"
              f" {'kubectl kustomize' if kubectl else 'scripts/validate_deploy.py'}, each"
              " distinct one once")
    for note in notes:
        print(f"note: {note}")
    for e in errors.items:
        print(f"error: {e}")
    for f in failures:
        print(f"self-test: {f}")
    elapsed = time.monotonic() - started
    if errors or failures:
        print(f"validate-deploy: FAILED, {len(errors)} errors, {len(failures)} self-test"
              f" failures ({elapsed:.1f} s)")
        return 1
    tools = ["yamllint", "check-jsonschema"]
    tools += [f"docker compose {compose[1]}"] if compose else []
    tools += ["kubectl kustomize"] if kubectl else []
    tools += [f"kubernetes-validate ({', '.join(KUBERNETES_VERSIONS)})", "project checks"]
    valid = "" if args.self_test else f"{checked} files valid ({', '.join(tools)}), "
    print(f"validate-deploy: ok, {valid}{len(tests)} known-bad examples rejected"
          f" ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

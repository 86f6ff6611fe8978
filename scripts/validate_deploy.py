"""Validates the deployment files against vendored schemas (run through scripts/validate-deploy).

Checks:
  * docker-compose.yml and deploy/compose.gpu.yml, alone and merged, against the Compose
    Specification schema, after interpolating ${VARS} from .env.example; then references
    between services (depends_on, named volumes, mounted config files, health probe ports).
  * deploy/k8s (the default) and each overlay in deploy/k8s/overlays, rendered as kustomize
    would (the subset of kustomize they use), every object against the Kubernetes schemas in
    strict mode (unknown fields are errors), for each vendored Kubernetes version; each
    kustomization's keys, resources and patches, and that it uses every YAML file in its
    folder; then resources and security settings of every pod, and references between
    objects (Secret keys, checked against the example Secret where a render has none;
    ConfigMaps, claims, the generators' addresses).
  * Service configuration files (deploy/config/*.toml and the TOML in the ConfigMaps)
    against the services' own configuration structs, read from crates/*/src (the services
    reject unknown keys at start-up), with no secrets in them; HIR_<SERVICE>__* variables
    must name real configuration keys.
  * The images' toolchain and features against rust-toolchain.toml and the crates.
  * Self-test: every known-bad example in deploy/schemas/testdata/ must be rejected with
    the message its `# expect:` lines name.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import time
from typing import Any, Iterable

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

import jsonschema
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "deploy" / "schemas"
K8S_DIR = ROOT / "deploy" / "k8s"
# The Secret every deployment needs, made by hand; only the example-secret overlay applies it.
EXAMPLE_SECRET = K8S_DIR / "overlays" / "example-secret" / "secret.example.yaml"
COMPOSE_FILE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "deploy" / "compose.gpu.yml"
ENV_EXAMPLE = ROOT / ".env.example"
CONFIG_DIR = ROOT / "deploy" / "config"

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
# YAML


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys (kubectl and Compose refuse them too; PyYAML
    would silently keep the last one). Keys merged in with `<<` may be overridden."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml_docs(path: pathlib.Path, errors: Errors) -> list[Any]:
    try:
        with path.open() as f:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        errors.add(rel(path), f"cannot read YAML: {e}")
        return []


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


def validate_compose(files: list[pathlib.Path], env: dict[str, str], schemas: RustConfigSchemas,
                     compose_validator, errors: Errors, references: bool = True) -> None:
    """Interpolates and merges `files` in order, validates the result against the Compose
    schema and, with `references`, checks the references between services."""
    where = " + ".join(rel(f) for f in files)
    merged: Any = None
    for path in files:
        docs = load_yaml_docs(path, errors)
        if len(docs) != 1 or not isinstance(docs[0], dict):
            if docs:
                errors.add(rel(path), "expected one YAML mapping")
            return
        doc = interpolate(docs[0], env, rel(path), [], errors)
        merged = doc if merged is None else compose_merge(merged, doc)
    for path, message in schema_errors(compose_validator, merged):
        errors.add(where, f"{path}: {message}")
    if references:
        check_compose_project(merged, where, schemas, errors)


# ------------------------------------------------------------------------------------------
# Kubernetes


class KubernetesSchemas:
    def __init__(self, folder: pathlib.Path) -> None:
        self.bundles = {}
        for path in sorted(folder.glob("v*-strict.json")):
            self.bundles[path.name.removesuffix("-strict.json")] = json.loads(path.read_text())
        if not self.bundles:
            raise SystemExit(f"no Kubernetes schemas in {rel(folder)}")
        self.validators: dict[tuple[str, str], Any] = {}
        self.seen: dict[str, list[str]] = {}  # an object met again, in another render

    def validate(self, doc: dict, where: str, errors: Errors) -> None:
        text = json.dumps(doc, sort_keys=True, default=str)
        if text not in self.seen:
            self.seen[text] = self.problems(doc)
        for problem in self.seen[text]:
            errors.add(where, problem)

    def problems(self, doc: dict) -> list[str]:
        key = f"{doc.get('apiVersion')} {doc.get('kind')}"
        out = []
        for version, bundle in self.bundles.items():
            name = bundle["x-kinds"].get(key)
            if name is None:
                return [f"no vendored schema for `{key}` (add it to"
                        " deploy/schemas/vendor.py and re-run it)"]
            validator = self.validators.get((version, name))
            if validator is None:
                schema = {"$ref": f"#/$defs/{name}", "$defs": bundle["$defs"]}
                validator = jsonschema.Draft202012Validator(schema)
                self.validators[(version, name)] = validator
            for path, message in schema_errors(validator, doc):
                out.append(f"{path}: {message} (Kubernetes {version})")
        return out


POD_TEMPLATE_KINDS = {"Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"}
KUSTOMIZATION_KEYS = {
    "apiVersion", "kind", "namespace", "resources", "images", "labels", "commonLabels",
    "commonAnnotations", "namePrefix", "nameSuffix", "patches", "configMapGenerator",
    "secretGenerator", "generatorOptions", "replicas", "components", "replacements",
}


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


def validate_kubernetes(paths: list[pathlib.Path], k8s: KubernetesSchemas,
                        schemas: RustConfigSchemas, errors: Errors,
                        cross_checks: bool = True) -> int:
    """Validates the manifests in `paths`; returns how many objects were checked."""
    located = load_manifests(paths, errors)
    validate_objects(located, k8s, schemas, errors, rel(K8S_DIR), cross_checks=cross_checks)
    return len(located)


def validate_objects(located: list[tuple[str, dict]], k8s: KubernetesSchemas,
                     schemas: RustConfigSchemas, errors: Errors, render: str,
                     external: dict | None = None, cross_checks: bool = True) -> None:
    """Validates one set of objects, as `kubectl apply` would receive them (`render` names
    it); `external` holds the objects made outside it (the Secret created by hand)."""
    objects: dict[tuple[str, str], dict] = {}
    for where, doc in located:
        k8s.validate(doc, f"{where} {doc['kind']}", errors)
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


# Kustomize, as far as the kustomizations under deploy/k8s use it. Keys kustomize knows but
# this renderer does not are refused rather than ignored, so a render is never wrong in
# silence; `kubectl kustomize DIR` shows what kustomize itself makes of a folder.
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
        if key not in KUSTOMIZATION_KEYS:
            errors.add(at, f"unknown key `{key}`")
        elif key not in RENDERED_KEYS:
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
                ops = yaml.load(str(patch["patch"]), Loader=StrictLoader)
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


def check_kubernetes(k8s: KubernetesSchemas, schemas: RustConfigSchemas, errors: Errors,
                     verbose: bool) -> int:
    """Renders the default and every overlay and validates each render; returns how many
    files were read. The `hindsight` Secret is created by hand, outside the renders (only
    the example-secret overlay carries one): Secret references are checked against the
    keys of that example."""
    external = {
        (doc["kind"], (doc.get("metadata") or {}).get("name")): doc
        for _, doc in load_manifests([EXAMPLE_SECRET], errors)
    }
    files: set[pathlib.Path] = {EXAMPLE_SECRET.resolve()}
    default: dict[tuple[str, str], tuple[str, str]] = {}
    for folder in kustomizations():
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
        validate_objects(shown, k8s, schemas, errors, rel(folder), external)
        if verbose:
            kinds: dict[str, int] = {}
            for _, doc in located:
                kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
            print(f"kubernetes: {rel(folder)}: {len(located)} objects"
                  f" ({', '.join(f'{n} {k}' for k, n in sorted(kinds.items()))}),"
                  f" GPUs requested: {gpus_requested(located)}")
    return len(files)


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


def self_test(compose_validator, k8s: KubernetesSchemas, schemas: RustConfigSchemas,
              env: dict[str, str]) -> list[str]:
    """Each known-bad file in deploy/schemas/testdata must fail with its `# expect:` texts."""
    failures = []
    files = sorted((SCHEMAS / "testdata").iterdir())
    if not files:
        return [f"{rel(SCHEMAS / 'testdata')}: no test files"]
    for path in files:
        expected = re.findall(r"^# expect: (.+)$", path.read_text(), re.M)
        errors = Errors()
        if path.name.startswith("compose-"):
            validate_compose([path], env, schemas, compose_validator, errors)
        elif path.name.startswith("k8s-"):
            validate_kubernetes([path], k8s, schemas, errors, cross_checks=False)
        elif path.suffix == ".toml" and path.name.split("-")[0] in SERVICES:
            check_config_text(path.read_text(), path.name.split("-")[0], rel(path), schemas, errors)
        else:
            failures.append(f"{rel(path)}: unknown kind of test file")
            continue
        if not errors:
            failures.append(f"{rel(path)}: accepted, but it must be rejected")
        if not expected:
            failures.append(f"{rel(path)}: has no `# expect:` line")
        for text in expected:
            if not any(text in e for e in errors.items):
                failures.append(f"{rel(path)}: no error mentions {text!r}; got: {errors.items}")
    return failures


# ------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--self-test", action="store_true",
                        help="only check that the known-bad examples are rejected")
    parser.add_argument("-v", "--verbose", action="store_true", help="list every file checked")
    args = parser.parse_args()
    started = time.monotonic()

    compose_schema = json.loads((SCHEMAS / "compose-spec.json").read_text())
    compose_validator = jsonschema.Draft7Validator(compose_schema)
    k8s = KubernetesSchemas(SCHEMAS / "kubernetes")
    schemas = RustConfigSchemas()
    errors = Errors()
    env = read_env_file(ENV_EXAMPLE, errors)
    checked = 0

    if not args.self_test:
        # Compose: each file alone (the override is partial, so schema only), then merged.
        validate_compose([COMPOSE_FILE], env, schemas, compose_validator, errors)
        validate_compose([COMPOSE_GPU], env, schemas, compose_validator, errors,
                         references=False)
        validate_compose([COMPOSE_FILE, COMPOSE_GPU], env, schemas, compose_validator, errors)
        checked += 2
        # Service configuration files (also reached through the Compose mounts).
        for path in sorted(CONFIG_DIR.glob("*.toml")):
            if path.stem not in SERVICES:
                errors.add(rel(path), f"no service `{path.stem}`")
                continue
            check_config_text(path.read_text(), path.stem, rel(path), schemas, errors)
            checked += 1
        # Kubernetes.
        checked += check_kubernetes(k8s, schemas, errors, args.verbose)
        check_images(errors)
        checked += 2
        if args.verbose:
            print(f"compose: {rel(COMPOSE_FILE)}, {rel(COMPOSE_GPU)} (alone and merged)")
            print(f"kubernetes: schemas of versions {', '.join(k8s.bundles)}")

    failures = self_test(compose_validator, k8s, schemas, env)
    for e in errors.items:
        print(f"error: {e}")
    for f in failures:
        print(f"self-test: {f}")
    elapsed = time.monotonic() - started
    if errors or failures:
        print(f"validate-deploy: FAILED, {len(errors)} errors, {len(failures)} self-test"
              f" failures ({elapsed:.1f} s)")
        return 1
    tests = len(list((SCHEMAS / "testdata").iterdir()))
    valid = "" if args.self_test else f"{checked} files valid, "
    print(f"validate-deploy: ok, {valid}{tests} known-bad examples rejected ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

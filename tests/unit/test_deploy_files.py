"""The deployment files of ``deploy/`` against the programs they start.

* ``deploy/systemd/``: each unit is read with systemd's syntax (sections, repeated
  keys, continuations), its ``ExecStart=`` expanded with the unit's defaults and
  ``lepton.env.example`` (its optional settings too), and parsed by
  ``lepton_ai.cli.build_parser()``, every ``--flag`` spelled exactly (argparse
  would accept an abbreviation of a renamed one).
* ``deploy/container/``: the Dockerfile's ENTRYPOINT + CMD make a valid ``lepton``
  command line; the image runs as a non-root user, keeps no token, exposes every
  port the manifests use; the ignore file lets in what the build copies; the
  HEALTHCHECK script answers against a real HTTP and HTTPS ``/healthz``.
* ``deploy/kubernetes/``: every resource validates against the Kubernetes 1.30
  schemas in strict mode (``kubernetes-validate``, offline), and every container's
  command line (the image's entrypoint + ``args``, ``$(VAR)`` substituted from its
  env; a ``sh -c`` wrapper's ``exec lepton ...`` line) is a valid ``lepton``
  invocation whose addresses, ports, volumes, probes and Secrets agree with the
  rest of the manifests.

The slow test at the end starts three coordinators and a worker on 127.0.0.1 with
exactly the systemd units' command lines (other ports) and runs a job on them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import importlib.util
import json
import os
import re
import shlex
import socket
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from helpers import wait_until
from lepton_ai.cli import build_parser
from lepton_ai.consensus.server import parse_peers
from lepton_ai.node.node_net import parse_address

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
CONTAINER = ROOT / "deploy" / "container"
KUBERNETES = ROOT / "deploy" / "kubernetes"
UNITS = {
    "coordinator": SYSTEMD / "lepton-coordinator@.service",
    "worker": SYSTEMD / "lepton-worker@.service",
}
ENV_EXAMPLE = SYSTEMD / "lepton.env.example"
DOCKERFILE = CONTAINER / "Dockerfile"
DOCKERIGNORE = CONTAINER / "Dockerfile.dockerignore"
HEALTHCHECK = CONTAINER / "healthcheck.py"
MANIFESTS = ("coordinator.yaml", "worker.yaml", "services.yaml")
K8S_VERSION = "1.30.0"
STATE_ROOT = "/var/lib"  # %S of a system unit
# Environment variables the programs read (the cluster token must come this way).
SECRET_ENV = ("LEPTON_TOKEN", "LEPTON_HTTP_TOKEN")


# ---------------------------------------------------------------- the lepton parser


@contextlib.contextmanager
def _environ_kept() -> Iterator[None]:
    """--tls-dir and --http-token-file set variables of this process when parsed."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _subparser(parser: argparse.ArgumentParser, words: list[str]) -> argparse.ArgumentParser:
    """The leaf parser of ``lepton WORDS...`` (``certs create`` has two levels)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and words and words[0] in action.choices:
            return _subparser(action.choices[words[0]], words[1:])
    return parser


def parse_lepton(args: list[str]) -> argparse.Namespace:
    """``lepton ARGS`` as the program parses it; every ``--flag`` must be one of the
    command's own option strings, exactly (no abbreviation, no prefix match)."""
    parser = build_parser()
    with _environ_kept():
        try:
            ns = parser.parse_args(args)
        except SystemExit as exc:
            pytest.fail(f"`lepton {shlex.join(args)}` refused by lepton's parser (exit {exc.code})")
    leaf = _subparser(parser, args)
    known = {s for a in leaf._actions for s in a.option_strings}
    for word in args:
        if word.startswith("--"):
            flag = word.split("=", 1)[0]
            assert flag in known, (
                f"`lepton {shlex.join(args)}`: {flag} is not a flag of its command"
            )
    return ns


# ---------------------------------------------------------------- systemd


@dataclass(frozen=True)
class Unit:
    path: Path
    entries: tuple[tuple[str, str, str], ...]  # (section, key, value) in file order

    def values(self, section: str, key: str) -> list[str]:
        return [v for s, k, v in self.entries if (s, k) == (section, key)]

    def value(self, section: str, key: str) -> str:
        (found,) = self.values(section, key)
        return found


def read_unit(path: Path) -> Unit:
    """systemd's syntax: what configparser gets wrong is repeated keys (Environment=)
    and comment lines inside a backslash continuation (skipped, as systemd does)."""
    entries: list[tuple[str, str, str]] = []
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep and section, f"{path.name}: not KEY=VALUE in a section: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    assert not pending, f"{path.name}: ends in a continuation"
    return Unit(path, tuple(entries))


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """``lepton.env.example``'s settings, and its optional ``#KEY=VALUE`` ones."""
    settings: dict[str, str] = {}
    optional: dict[str, str] = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if m := re.fullmatch(r"([A-Z][A-Z0-9_]*)=(.*)", line):
            settings[m[1]] = m[2]
        elif m := re.fullmatch(r"#([A-Z][A-Z0-9_]*)=(.*)", line):
            optional[m[1]] = m[2]
    return settings, optional


def specifiers(text: str, instance: str) -> str:
    table = {"i": instance, "S": STATE_ROOT, "%": "%"}
    return re.sub(r"%(.)", lambda m: table[m[1]], text)


def unit_environment(unit: Unit, instance: str, settings: dict[str, str]) -> dict[str, str]:
    """The unit's Environment= defaults, then the env file's settings over them."""
    env: dict[str, str] = {}
    for value in unit.values("Service", "Environment"):
        for item in shlex.split(specifiers(value, instance)):
            key, _, val = item.partition("=")
            env[key] = val
    env.update(settings)
    return env


def exec_start(unit: Unit, instance: str, env: dict[str, str]) -> list[str]:
    """ExecStart= as systemd runs it: ``${VAR}`` inside a word, ``$VAR`` alone a word
    split on white space (zero or more words)."""
    (line,) = unit.values("Service", "ExecStart")
    argv: list[str] = []
    for word in shlex.split(specifiers(line, instance)):
        if whole := re.fullmatch(r"\$([A-Za-z_]\w*)", word):
            assert whole[1] in env, f"{unit.path.name}: ${whole[1]} is set nowhere"
            argv += env[whole[1]].split()
            continue
        for name in re.findall(r"\$\{([A-Za-z_]\w*)\}", word):
            assert name in env, f"{unit.path.name}: ${{{name}}} is set nowhere"
        expanded = re.sub(r"\$\{([A-Za-z_]\w*)\}", lambda m: env[m[1]], word)
        assert expanded and "$" not in expanded, f"{unit.path.name}: {word!r}"
        argv.append(expanded)
    return argv


def unit_args(program: str, instance: str, optional: bool) -> tuple[list[str], dict[str, str]]:
    unit = read_unit(UNITS[program])
    settings, extra = env_example()
    env = unit_environment(unit, instance, {**settings, **(extra if optional else {})})
    argv = exec_start(unit, instance, env)
    assert PurePosixPath(argv[0]).name == "lepton" and argv[0].startswith("/"), argv[0]
    return argv[1:], env


@pytest.mark.parametrize("optional", [False, True], ids=["settings", "with-optional"])
def test_systemd_coordinator_flags(optional: bool) -> None:
    instance = "100" if optional else "0"  # the optional settings are the standby's
    args, env = unit_args("coordinator", instance, optional)
    ns = parse_lepton(args)
    assert ns.command == "coordinator"
    assert "--token" not in args, "the token stays in the EnvironmentFile"
    assert ns.id == int(instance) and ns.id in parse_peers(ns.peers)
    # The ports the README documents (and a standby on its own, next to voter 2).
    assert (ns.port, ns.http_port) == ((7401, 7481) if optional else (7400, 7480))
    if optional:
        assert ns.standby and ns.alert_webhook.startswith("https://")
    # TLS and the HTTP token come from the EnvironmentFile (the --tls-dir default).
    if optional:
        assert env["LEPTON_TLS_DIR"].startswith("/etc/lepton/")
        assert env["LEPTON_HTTP_TOKEN"] != env["LEPTON_TOKEN"]


@pytest.mark.parametrize("optional", [False, True], ids=["settings", "with-optional"])
def test_systemd_worker_flags(optional: bool) -> None:
    args, _ = unit_args("worker", "h1", optional)
    ns = parse_lepton(args)
    assert ns.command == "worker"
    assert "--token" not in args
    assert ns.name == "h1"
    assert (ns.metrics_port, ns.serve_port) == (7490, 7600)
    assert ns.join.split(",")


def test_systemd_token_only_in_a_private_file() -> None:
    """The token reaches the programs through EnvironmentFile= (installed 0600 by the
    README), never through Environment= (world-readable in `systemctl show`)."""
    readme = (SYSTEMD / "README.md").read_text()
    assert "install -D -m 0600 deploy/systemd/lepton.env.example /etc/lepton/lepton.env" in readme
    assert "0600" in ENV_EXAMPLE.read_text()
    for path in UNITS.values():
        unit = read_unit(path)
        assert "/etc/lepton/lepton.env" in unit.values("Service", "EnvironmentFile")
        for value in unit.values("Service", "Environment"):
            assert not any(value.startswith(f"{name}=") for name in SECRET_ENV), value
        assert "TOKEN" not in unit.value("Service", "ExecStart")


# ---------------------------------------------------------------- the container image


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) in order; continuations joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue  # a comment line inside a continuation
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, rest = line.partition(" ")
        out.append((instruction.upper(), rest.strip()))
    assert not pending
    return out


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    return steps[last_from:]


def exec_form(instruction: str) -> list[str]:
    (rest,) = [r for i, r in final_stage() if i == instruction]
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
    return value


def image_entrypoint() -> list[str]:
    return exec_form("ENTRYPOINT")


def lepton_of(argv: list[str]) -> list[str]:
    """The lepton arguments of an argv that runs lepton (possibly under tini)."""
    if argv and PurePosixPath(argv[0]).name == "tini":
        assert "--" in argv, "tini needs -- before the program's own flags"
        argv = argv[argv.index("--") + 1 :]
    assert argv and PurePosixPath(argv[0]).name == "lepton", argv
    return argv[1:]


def exposed_ports() -> set[int]:
    ports: set[int] = set()
    for instruction, rest in final_stage():
        if instruction == "EXPOSE":
            ports |= {int(p.split("/")[0]) for p in rest.split()}
    return ports


def test_dockerfile_entrypoint_and_cmd() -> None:
    steps = dockerfile()
    args_default = dict(
        r.split("=", 1) for i, r in steps if i == "ARG" and "=" in r
    )  # ARG NAME=default
    froms = [r.split()[0] for i, r in steps if i == "FROM"]
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args_default[m[1]], f) for f in froms]
    assert bases[-1] == "python:3.11-slim", bases
    ns = parse_lepton([*lepton_of(image_entrypoint()), *exec_form("CMD")])
    assert ns.command == "coordinator"
    assert ns.host == "0.0.0.0", "a container's program must be reachable from outside it"
    assert ns.data_dir.startswith("/var/lib/lepton/")
    assert {ns.port, ns.http_port} <= exposed_ports()


def test_dockerfile_user_volume_token_healthcheck() -> None:
    final = final_stage()
    (user,) = [r for i, r in final if i == "USER"]
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric and not root (runAsNonRoot checks it)"
    volumes = [v for i, r in final if i == "VOLUME" for v in json.loads(r)]
    assert "/var/lib/lepton" in volumes
    (workdir,) = [r for i, r in final if i == "WORKDIR"]
    assert workdir == "/var/lib/lepton", "the programs' default --data-dir is under the cwd"
    for instruction, rest in dockerfile():
        if instruction in ("ENV", "ARG", "LABEL"):
            assert "TOKEN" not in rest.upper(), f"{instruction} {rest}: no token in the image"
    (health,) = [r for i, r in final if i == "HEALTHCHECK"]
    assert health.split("CMD", 1)[1].strip() == '["lepton-healthcheck"]'
    assert any(
        i == "COPY" and "healthcheck.py /usr/local/bin/lepton-healthcheck" in r for i, r in final
    )
    # The package comes from the repository (a wheel built in the first stage).
    assert any(i == "RUN" and "pip wheel" in r and r.endswith(" .") for i, r in dockerfile())
    assert any(i == "RUN" and "--no-index" in r and "lepton-ai" in r for i, r in final)


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last matching pattern wins (``!`` re-includes).
    Enough of its glob syntax for this file: ``*``, ``**/``, and directories."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        regex = re.escape(body.rstrip("/")).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*")
        if re.fullmatch(regex + "(?:/.*)?", path):
            ignored = not negate
    return ignored


def test_dockerignore_lets_in_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for instruction, rest in dockerfile():
        if instruction == "COPY" and "--from" not in rest:
            words = [w for w in rest.split() if not w.startswith("--")]
            copied += words[:-1]
    assert copied
    for source in copied:
        assert (ROOT / source).exists(), source
        assert not _ignored(source, patterns), f"{source} is excluded from the build context"
    for inside in ("src/lepton_ai/cli.py", "pyproject.toml"):
        assert not _ignored(inside, patterns), inside
    for outside in (
        ".venv/bin/python",
        "tests/unit/test_wal.py",
        ".git/HEAD",
        "lepton-data/x",
        "src/lepton_ai/__pycache__/cli.cpython-311.pyc",
        "benchmarks/results/a.json",
    ):
        assert _ignored(outside, patterns), f"{outside} would be sent to the build"


@pytest.fixture
def healthcheck(monkeypatch: pytest.MonkeyPatch) -> Any:
    spec = importlib.util.spec_from_file_location("lepton_healthcheck", HEALTHCHECK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("LEPTON_TLS_DIR", raising=False)
    return module


class _Healthz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        ok = self.path == "/healthz"
        self.send_response(200 if ok else 404)
        self.end_headers()
        self.wfile.write(b"ok\n" if ok else b"")

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _server(context: ssl.SSLContext | None = None) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthz)
    if context is not None:
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_script(
    healthcheck: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from lepton_ai.wire.certs import create

    with _server() as port:
        monkeypatch.setenv("LEPTON_HEALTH_PORT", str(port))
        assert healthcheck.main() == 0
    assert healthcheck.main() == 1, "nothing listens any more"
    # With TLS: HTTPS with the node certificate, checked against the cluster CA.
    create(str(tmp_path / "tls"), ["lepton-coordinator-0.lepton-coordinator.lepton.svc"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "tls" / "node.pem", tmp_path / "tls" / "node.key")
    with _server(context) as port:
        monkeypatch.setenv("LEPTON_HEALTH_PORT", str(port))
        monkeypatch.setenv("LEPTON_TLS_DIR", str(tmp_path / "tls"))
        assert healthcheck.main() == 0
        create(str(tmp_path / "other"))  # another cluster's CA: refused
        monkeypatch.setenv("LEPTON_TLS_DIR", str(tmp_path / "other"))
        assert healthcheck.main() == 1


# ---------------------------------------------------------------- Kubernetes

yaml = pytest.importorskip("yaml")


@functools.cache
def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    """Read once: the tests below compare workloads by identity."""
    docs = []
    for name in MANIFESTS:
        for doc in yaml.safe_load_all((KUBERNETES / name).read_text()):
            if doc is not None:
                docs.append((name, doc))
    return docs


def by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in k8s_documents() if d["kind"] == kind]


def one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [d for d in by_kind(kind) if d["metadata"]["name"] == name]
    return found


def test_manifests_validate_strict() -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    assert {d["kind"] for _, d in docs} >= {
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    for name, doc in docs:
        try:
            kv.validate(doc, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(MANIFESTS)
    images = {i["name"] for i in kustomization["images"]}
    for workload in [*by_kind("StatefulSet"), *by_kind("Deployment")]:
        spec = workload["spec"]["template"]["spec"]
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert c["image"].split(":")[0] in images, c["image"]


# Sample values of the downward API, for $(VAR) substitution.
FIELD_SAMPLES = {
    "metadata.name": None,  # the pod's name: per workload (below)
    "metadata.namespace": "lepton",
    "status.podIP": "10.1.2.3",
    "metadata.labels['apps.kubernetes.io/pod-index']": "1",
}


def pod_name(workload: dict[str, Any]) -> str:
    name = workload["metadata"]["name"]
    return f"{name}-1" if workload["kind"] == "StatefulSet" else f"{name}-5d8f7c9b4-x2k7q"


def container_env(workload: dict[str, Any], container: dict[str, Any]) -> dict[str, str]:
    """A value for every variable the container defines (``$(VAR)`` may refer to it)."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = str(item["value"])
            continue
        source = item["valueFrom"]
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            assert path in FIELD_SAMPLES, f"teach this test a value of {path}"
            env[item["name"]] = FIELD_SAMPLES[path] or pod_name(workload)
        else:
            env[item["name"]] = f"<{item['name']} from a Secret>"
    return env


def k8s_expand(word: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) in command/args; an undefined one would stay as it is."""

    def one_var(m: re.Match[str]) -> str:
        assert m[1] in env, f"$({m[1]}) in {word!r} is not defined in the container's env"
        return env[m[1]]

    return re.sub(r"\$\(([A-Za-z_]\w*)\)", one_var, word)


def shell_exec_lepton(script: str, env: dict[str, str]) -> list[str]:
    """The ``exec lepton ...`` line of a ``sh -c`` wrapper, as the shell expands it
    (its variables from the container's env)."""
    joined = script.replace("\\\n", " ")
    lines = [ln.strip() for ln in joined.splitlines() if ln.strip().startswith("exec ")]
    assert len(lines) == 1, f"one `exec lepton ...` line expected in {script!r}"
    assert "`" not in lines[0] and "$(" not in lines[0], "no command substitution"

    def var(m: re.Match[str]) -> str:
        name = m[1] or m[2]
        assert name in env, f"${name} is not in the container's env"
        return env[name]

    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", var, lines[0])
    words = shlex.split(expanded)
    return lepton_of(words[1:])


@dataclass
class Invocation:
    workload: dict[str, Any]
    container: dict[str, Any]
    env: dict[str, str]
    args: list[str]  # lepton's arguments
    ns: argparse.Namespace


@functools.cache
def invocations() -> list[Invocation]:
    """Every container that runs lepton, with its parsed command line."""
    found = []
    entrypoint, cmd = image_entrypoint(), exec_form("CMD")
    for workload in [*by_kind("StatefulSet"), *by_kind("Deployment")]:
        spec = workload["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            env = container_env(workload, container)
            command = [k8s_expand(w, env) for w in container.get("command", entrypoint)]
            args = [
                k8s_expand(w, env)
                for w in container.get("args", [] if "command" in container else cmd)
            ]
            argv = command + args
            if PurePosixPath(argv[0]).name == "python":
                continue  # the DNS wait (checked in test_wait_dns_names)
            if PurePosixPath(argv[0]).name == "sh":
                assert argv[1] == "-c" and len(argv) == 3, argv
                largs = shell_exec_lepton(argv[2], env)
            else:
                largs = lepton_of(argv)
            found.append(Invocation(workload, container, env, largs, parse_lepton(largs)))
    return found


def the(command: str) -> Invocation:
    (found,) = [i for i in invocations() if i.ns.command == command]
    return found


def test_every_container_command_is_a_lepton_command_line() -> None:
    seen = sorted((i.workload["kind"], i.container["name"], i.ns.command) for i in invocations())
    assert seen == [
        ("Deployment", "tls", "certs"),
        ("Deployment", "worker", "worker"),
        ("StatefulSet", "coordinator", "coordinator"),
        ("StatefulSet", "tls", "certs"),
    ]
    for inv in invocations():
        assert "--token" not in inv.args and "--http-token-file" not in inv.args
        joined = " ".join(inv.args)
        assert "Secret" not in joined, f"{inv.container['name']}: a Secret's value in args"


def test_secrets_only_from_secret_objects() -> None:
    for workload in [*by_kind("StatefulSet"), *by_kind("Deployment")]:
        spec = workload["spec"]["template"]["spec"]
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for item in container.get("env", []):
                if item["name"] in SECRET_ENV:
                    assert "value" not in item, f"{item['name']} written in the manifest"
                    ref = item["valueFrom"]["secretKeyRef"]
                    assert ref["name"].startswith("lepton-"), ref
        for program in ("coordinator", "worker"):
            for container in spec["containers"]:
                if container["name"] == program:
                    names = {e["name"] for e in container["env"]}
                    assert "LEPTON_TOKEN" in names
                    token = next(e for e in container["env"] if e["name"] == "LEPTON_TOKEN")
                    assert "optional" not in token["valueFrom"]["secretKeyRef"]


def _mounts(inv: Invocation) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in inv.container.get("volumeMounts", [])}


def _volume(inv: Invocation, path: str) -> str:
    """The volume a path lives on (the longest mount path above it)."""
    mounts = _mounts(inv)
    above = [m for m in mounts if PurePosixPath(path).is_relative_to(m)]
    assert above, f"{path} is on no volume of {inv.container['name']}"
    return mounts[max(above, key=len)]


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", [])}


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "": 1}
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|)", text)
    assert m, text
    return int(m[1]) * units[m[2]]


def test_coordinators() -> None:
    inv = the("coordinator")
    sts, ns = inv.workload, inv.ns
    service = one("Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None", "a headless Service: one DNS name per pod"
    assert service["spec"]["publishNotReadyAddresses"] is True, "peers meet before ready"
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    peers = parse_peers(ns.peers)
    replicas = sts["spec"]["replicas"]
    assert sorted(peers) == list(range(replicas)), "ids 0..replicas-1: the pod ordinals"
    assert ns.id == int(FIELD_SAMPLES["metadata.labels['apps.kubernetes.io/pod-index']"])
    assert "$(POD_INDEX)" in inv.container["args"]
    svc = sts["spec"]["serviceName"]
    for node, address in peers.items():
        host, port = parse_address(address)
        assert host == f"{sts['metadata']['name']}-{node}.{svc}.lepton.svc", host
        assert port == _ports(inv.container)["paxos"]
    assert ns.host == "0.0.0.0"
    own_host = parse_address(peers[ns.id])[0]
    assert ns.advertise == own_host, "workers and clients are sent to the stable name"
    assert ns.port == _ports(inv.container)["client"]
    assert ns.http_port == _ports(inv.container)["http"]
    # The Paxos log on the PersistentVolumeClaim, one per pod.
    claims = {c["metadata"]["name"] for c in sts["spec"]["volumeClaimTemplates"]}
    assert _volume(inv, ns.data_dir) in claims
    # TLS: its directory is the init container's output, for this pod's name.
    assert ns.tls_dir is not None and _volume(inv, ns.tls_dir) == "tls"
    certs = [i for i in invocations() if i.workload is sts and i.ns.command == "certs"]
    (cert,) = certs
    assert cert.ns.dir == ns.tls_dir and _volume(cert, cert.ns.ca) == "ca"
    assert own_host in cert.ns.hosts.split(",")
    # At most one coordinator down by a drain: two of three stay, a quorum.
    (pdb,) = by_kind("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == sts["spec"]["selector"]


def test_workers() -> None:
    inv, coord = the("worker"), the("coordinator")
    ns = inv.ns
    assert inv.workload["kind"] == "Deployment"
    peers = parse_peers(coord.ns.peers)
    expected = [f"{parse_address(a)[0]}:{coord.ns.port}" for _, a in sorted(peers.items())]
    assert ns.join.split(",") == expected, "every coordinator's client address"
    assert ns.name == pod_name(inv.workload)
    assert ns.metrics_port == _ports(inv.container)["metrics"]
    assert ns.serve_port == _ports(inv.container)["serve"]
    assert ns.slots >= 1
    data = _volume(inv, ns.data_dir)
    volumes = {v["name"]: v for v in inv.workload["spec"]["template"]["spec"]["volumes"]}
    limit = _quantity_bytes(volumes[data]["emptyDir"]["sizeLimit"])
    assert 0 < ns.storage_bytes_max < limit, "passing an emptyDir's sizeLimit evicts the pod"
    (cert,) = [i for i in invocations() if i.workload is inv.workload and i.ns.command == "certs"]
    assert cert.ns.dir == ns.tls_dir
    assert FIELD_SAMPLES["status.podIP"] in cert.ns.hosts.split(","), "others dial its IP"


def test_wait_dns_names() -> None:
    """The init containers wait for the name the program needs to resolve: a
    coordinator its own --peers entry, a worker its first --join entry."""
    coord, worker = the("coordinator"), the("worker")
    wanted = {
        id(coord.workload): parse_address(parse_peers(coord.ns.peers)[coord.ns.id])[0],
        id(worker.workload): parse_address(worker.ns.join.split(",")[0])[0],
    }
    for inv in (coord, worker):
        spec = inv.workload["spec"]["template"]["spec"]
        (wait,) = [c for c in spec["initContainers"] if c["name"] == "wait-dns"]
        env = container_env(inv.workload, wait)
        argv = [k8s_expand(w, env) for w in wait["command"]]
        assert argv[:2] == ["python", "-c"]
        compile(argv[2], "wait-dns", "exec")
        assert argv[3] == wanted[id(inv.workload)]


def test_probes_resources_and_security() -> None:
    for inv in (the("coordinator"), the("worker")):
        c = inv.container
        port = "http" if inv.ns.command == "coordinator" else "metrics"
        scheme = "HTTPS" if inv.ns.tls_dir else "HTTP"
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            get = c[probe]["httpGet"]
            assert (get["path"], get["port"], get["scheme"]) == ("/healthz", port, scheme), probe
    for workload in [*by_kind("StatefulSet"), *by_kind("Deployment")]:
        spec = workload["spec"]["template"]["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        uid = spec["securityContext"]["runAsUser"]
        assert f"USER {uid}:{uid}" in DOCKERFILE.read_text(), "the image's user"
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            assert set(c["resources"]) == {"requests", "limits"}, c["name"]
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
            assert "memory" in c["resources"]["limits"], c["name"]
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
        # The CA key reaches only the init container that signs this pod's certificate;
        # the program's root file system is read-only, its /tmp an emptyDir.
        for c in spec["containers"]:
            assert "/tmp" in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]
            assert "ca" not in {m["name"] for m in c.get("volumeMounts", [])}, c["name"]


def test_services_select_pods_and_ports() -> None:
    workloads = [*by_kind("StatefulSet"), *by_kind("Deployment")]
    for service in by_kind("Service"):
        selector = service["spec"]["selector"]
        (target,) = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = {
            name: number
            for c in target["spec"]["template"]["spec"]["containers"]
            for name, number in _ports(c).items()
        }
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: {port}"
            assert port["port"] == ports[port["targetPort"]]
    assert one("Service", "lepton-serve")["spec"]["ports"][0]["port"] == the("worker").ns.serve_port
    dashboard = one("Service", "lepton-dashboard")["spec"]["ports"][0]["port"]
    assert dashboard == the("coordinator").ns.http_port
    # Every port a manifest uses is EXPOSEd by the image.
    used = {
        p["containerPort"]
        for w in workloads
        for c in w["spec"]["template"]["spec"]["containers"]
        for p in c.get("ports", [])
    }
    assert used <= exposed_ports(), f"EXPOSE misses {used - exposed_ports()}"


def test_prometheus_scrape_config() -> None:
    config = yaml.safe_load((KUBERNETES / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    coord = the("coordinator")
    hosts = {parse_address(a)[0] for a in parse_peers(coord.ns.peers).values()}
    urls = [sd["url"] for sd in job["http_sd_configs"]]
    scheme = "https" if coord.ns.tls_dir else "http"
    assert sorted(urls) == sorted(f"{scheme}://{h}:{coord.ns.http_port}/sd" for h in hosts)
    assert job["scheme"] == scheme
    for sd in job["http_sd_configs"]:
        assert sd["tls_config"]["ca_file"].endswith("ca.pem")


# ---------------------------------------------------------------- a real cluster


def _free_ports(n: int) -> list[int]:
    socks = [socket.create_server(("127.0.0.1", 0)) for _ in range(n)]
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _systemd_command(program: str, instance: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart with ``env`` as its environment, run by this interpreter."""
    unit = read_unit(UNITS[program])
    argv = exec_start(unit, instance, unit_environment(unit, instance, env))
    parse_lepton(argv[1:])
    return [sys.executable, "-m", "lepton_ai.cli", *argv[1:]]


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as reply:
        return bytes(reply.read())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_systemd_command_lines_run_a_cluster(tmp_path: Path) -> None:
    """Three coordinators and a worker started with exactly the units' ExecStart
    (lepton.env.example's settings, with 127.0.0.1 and free ports) run a job."""
    import operator

    import lepton_ai as lep

    ports = _free_ports(11)
    client, paxos, http_ports = ports[0:3], ports[3:6], ports[6:9]
    settings, _ = env_example()
    token = "deploy-files-test-token"
    common = {
        **settings,
        "LEPTON_TOKEN": token,
        "LEPTON_HOST": "127.0.0.1",
        "LEPTON_DATA_DIR": str(tmp_path),
        "LEPTON_COORDINATOR_PEERS": ",".join(f"{i}=127.0.0.1:{paxos[i]}" for i in range(3)),
        "LEPTON_JOIN": ",".join(f"127.0.0.1:{p}" for p in client),
        "LEPTON_SLOTS": "1",
        "LEPTON_METRICS_PORT": str(ports[9]),
        "LEPTON_SERVE_PORT": str(ports[10]),
    }
    procs: list[subprocess.Popen[bytes]] = []
    child_env = {**os.environ, "LEPTON_TOKEN": token}
    child_env.pop("LEPTON_TLS_DIR", None)
    try:
        for i in range(3):
            env = {
                **common,
                "LEPTON_COORDINATOR_PORT": str(client[i]),
                "LEPTON_COORDINATOR_HTTP_PORT": str(http_ports[i]),
            }
            log = open(tmp_path / f"coordinator-{i}.log", "wb")  # noqa: SIM115
            procs.append(
                subprocess.Popen(
                    _systemd_command("coordinator", str(i), env),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=child_env,
                )
            )
        log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                _systemd_command("worker", "h1", common),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
            )
        )

        def joined() -> Any:
            for p in procs:  # a unit that exited will not come up: fail now, with its log
                assert p.poll() is None, (tmp_path / "worker.log").read_text()
            try:
                cluster = lep.connect(common["LEPTON_JOIN"], token=token)
            except Exception:  # not up yet
                return None
            try:
                workers = [m for m in cluster.status()["members"] if m["role"] == "worker"]
                if workers and cluster.status()["leader"]:
                    return cluster
            except Exception:  # no leader yet
                pass
            cluster.close()
            return None

        cluster = wait_until(joined, 60.0, "a leader with a worker", interval_s=0.5)
        with cluster:
            task = lep.DistributedTask(cluster, progress=False)
            result = (
                task.parallelize(range(100), 4)
                .map(lambda x: (x % 3, x))
                .reduce_by_key(operator.add, 2)
                .collect()
            )
            assert dict(result) == {
                0: sum(range(0, 100, 3)),
                1: sum(range(1, 100, 3)),
                2: sum(range(2, 100, 3)),
            }
        # The fixed HTTP ports of the units: /healthz, and /sd lists the worker's.
        for port in http_ports:
            assert _get(f"http://127.0.0.1:{port}/healthz") == b"ok\n"
        assert _get(f"http://127.0.0.1:{ports[9]}/healthz") == b"ok\n"
        # (The leader learns a follower's HTTP address from its messages: poll.)
        wanted = {f"127.0.0.1:{p}" for p in [*http_ports, ports[9]]}

        def targets() -> set[str]:
            sd = json.loads(_get(f"http://127.0.0.1:{http_ports[0]}/sd"))
            return {t for group in sd for t in group["targets"]}

        wait_until(
            lambda: wanted <= targets(), 20.0, f"/sd listing {sorted(wanted)}", interval_s=0.2
        )
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

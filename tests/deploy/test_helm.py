"""The Helm chart, rendered offline with the Helm SDK (helm-python-sdk, no helm binary):
strict lint, Kubernetes 1.30 schema validation of every object, and the promises of
values.yaml checked on the rendered objects."""

from __future__ import annotations

import base64
import copy
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from passthrough.config import ConfigError, Settings, load_settings
from tests.deploy import ENV_VARS, REPO, S3_SECRET_VARS, SECRET_VARS, env_vars_read_by_app
from tests.support.dashboards import DASHBOARD, RULES, check_rule_groups

CHART = REPO / "helm" / "passthrough"
RELEASE = "demo"
NAMESPACE = "tools"
KUBERNETES = "1.30"
SENTINEL = "s3cr3t-Sentinel-value"

Obj = dict[str, Any]

# REGISTRY_AUTH_FILE content with the sentinel as its credential.
AUTH_FILE = (
    '{"auths": {"ghcr.io": {"auth": "'
    + base64.b64encode(f"puller:{SENTINEL}".encode()).decode()
    + '"}}}'
)

# HTPASSWD_FILE content: two bcrypt users (`htpasswd -nbB -C 4`; throwaway passwords).
HTPASSWD = (
    "alice:$2y$04$AO48Zy6uktwkwoe5.Q0AwOPcXMZyTOvs73x5NF6eTolhDgE/4jQRi\n"
    "# the CI robot\n"
    "ci-bot:$2y$04$AO48Zy6uktwkwoe5.Q0AwOPcXMZyTOvs73x5NF6eTolhDgE/4jQRi\n"
)
ACCESS: Obj = {
    "groups": {"team-a": ["alice", "ci-bot"]},
    "rules": [
        {"repositories": ["team/*"], "pull": ["*", "anonymous"], "push": ["@team-a"],
         "delete": ["alice"]},
    ],
}  # fmt: skip

# Every option on: each optional object, each setting, each extra hook. Several replicas
# and an autoscaler need the shared store, so this is the s3 store; ALL_ON_FILESYSTEM
# below is the same with the per-pod store and its persistence volume.
ALL_ON: Obj = {
    "replicaCount": 2,
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"annotations": {"example.com/role": "puller"}},
    "podAnnotations": {"example.com/team": "netops"},
    "podLabels": {"team": "netops"},
    "service": {
        "type": "LoadBalancer",
        "nodePort": 30080,
        "annotations": {"example.com/lb": "internal"},
        "loadBalancerSourceRanges": ["10.20.0.0/16"],
        "externalTrafficPolicy": "Local",
    },
    "ingress": {
        "enabled": True,
        "className": "nginx",
        "annotations": {"nginx.ingress.kubernetes.io/proxy-buffering": "off"},
        "hosts": [
            {"host": "passthrough.example.com", "paths": [{"path": "/", "pathType": "Prefix"}]}
        ],
        "tls": [{"secretName": "passthrough-tls", "hosts": ["passthrough.example.com"]}],
    },
    "terminationGracePeriodSeconds": 300,
    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
    "registry": {
        "url": "https://registry.example.com:5000",
        "authUrl": "https://auth.example.com/token",
        "service": "registry.example.com",
        "name": "registry.example.com:5000",
        "clientAuth": "required",
        "defaultNamespace": "team",
        "allowlist": ["registry.example.com:5000", "ghcr.io", "*.docker.io"],
        "allowLinkLocal": False,
        "credentials": {"username": "puller", "password": SENTINEL, "bearerToken": SENTINEL + "t"},
    },
    "config": {
        "logLevel": "DEBUG",
        "logFormat": "text",
        "upstreamConnectTimeout": 5,
        "upstreamReadTimeout": 120.5,
        "layerConcurrency": 4,
        "upstreamRetries": 2,
        "upstreamRetryAfterMax": 10,
        "downloadDeadline": 1800,
        "maxLayers": 300,
        "maxImageBytes": 8589934592,
        "maxConcurrentDownloads": 24,
        "clientIdleTimeout": 300,
        "defaultPlatform": "linux/arm64",
        "serveStale": True,
        "cacheMaxBytes": 10737418240,
    },
    "gunicorn": {"workers": 3, "threads": 32, "gracefulTimeout": 240},
    "otel": {
        "endpoint": "http://otel-collector.observability:4317",
        "protocol": "grpc",
        "serviceName": "passthrough-lab",
    },
    "extraEnv": [{"name": "TZ", "value": "Europe/Berlin"}],
    "extraEnvFrom": [{"configMapRef": {"name": "site-settings"}}],
    "storage": {"temp": {"sizeLimit": "8Gi", "medium": "Memory"}},
    "store": {
        "type": "s3",
        "s3": {
            "bucket": "layers",
            "prefix": "passthrough/lab/",
            "endpoint": "http://minio.storage:9000",
            "region": "eu-central-1",
            # No lifecycleDays: the rule would expire pushed content (hosted is on).
            "existingSecret": "s3-keys",
        },
    },
    "redis": {"existingSecret": "redis-url", "lockLease": 90},
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 75},
    "podDisruptionBudget": {"enabled": True},
    "grafana": {"dashboard": {"enabled": True, "annotations": {"grafana_folder": "Registries"}}},
    "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "serviceMonitor": {
        "enabled": True,
        "labels": {"release": "kube-prometheus-stack"},
        "relabelings": [{"action": "replace", "targetLabel": "site", "replacement": "lab"}],
    },
    "networkPolicy": {
        "enabled": True,
        "ingressFrom": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "egress": {
            "extra": [
                {
                    "to": [
                        {
                            "namespaceSelector": {
                                "matchLabels": {"kubernetes.io/metadata.name": "observability"}
                            }
                        }
                    ],
                    "ports": [{"port": 4317, "protocol": "TCP"}],
                }
            ]
        },
    },
    "nodeSelector": {"kubernetes.io/os": "linux"},
    "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "tools", "effect": "NoSchedule"}
    ],
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "passthrough"}},
                    },
                }
            ]
        }
    },
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "passthrough"}},
        }
    ],
    "priorityClassName": "tools-high",
    "extraVolumes": [{"name": "ca", "configMap": {"name": "site-ca"}}],
    "extraVolumeMounts": [{"name": "ca", "mountPath": "/etc/ssl/site", "readOnly": True}],
    "v2": {
        "upstreams": {"hub": "https://registry-1.docker.io", "ghcr": "https://ghcr.io"},
        "proxyMode": "authenticated",
        "publicUrl": "https://passthrough.example.com",
        "tokenTtl": 600,
        "tagTtl": 60,
        "serveStale": False,
        "s3Redirect": True,
        # No tokenSecret: the chart generates one.
        "authFile": {"dockerConfigJson": AUTH_FILE},
    },
    # Two replicas: one certificate for all, from a Secret.
    "tls": {"existingSecret": "passthrough-cert"},
    "hosted": {
        "repositories": ["team/*", "apps/**"],
        "anonymousPull": True,
        "manifestMaxBytes": "8M",
        "htpasswd": {"content": HTPASSWD},
        "access": ACCESS,
        "gc": {
            "enabled": True,
            "schedule": "*/30 * * * *",
            "timeZone": "Europe/Berlin",
            "grace": "2h",
            "activeDeadlineSeconds": 1800,
            "historyLimit": 5,
        },
    },
}

ALL_ON_FILESYSTEM: Obj = {
    **{k: v for k, v in ALL_ON.items() if k not in {"replicaCount", "autoscaling", "store"}},
    # One replica: the certificate made at start-up, with the names clients use.
    "tls": {"selfSigned": True, "names": ["passthrough.example.com", "10.20.0.5"]},
    # The token key from an existing Secret; no blob redirects without S3.
    "v2": {
        **ALL_ON["v2"],
        "s3Redirect": False,
        "tokenSecret": {"existingSecret": "pt-token", "key": "secret"},
        "authFile": {"existingSecret": "pull-secret"},
    },
    # Users from an existing Secret; gc mounts the cache PVC beside a server pod.
    "hosted": {
        **ALL_ON["hosted"],
        "htpasswd": {"existingSecret": "team-users", "key": "users"},
    },
    "persistence": {
        "enabled": True,
        "accessModes": ["ReadWriteMany"],
        "storageClass": "nfs",
        "size": "50Gi",
        "annotations": {"helm.sh/resource-policy": "keep"},
    },
}
ALL_ON_IDS = ["defaults", "all-on", "all-on-filesystem"]

# The smallest values of a valid s3 store.
S3: Obj = {"store": {"type": "s3", "s3": {"bucket": "layers"}}}

# The smallest values of a hosted area with its users.
HOSTED: Obj = {
    "v2": {"publicUrl": "https://pt.lab"},
    "hosted": {"repositories": ["team/*"], "htpasswd": {"content": HTPASSWD}},
}

OPTIONAL_KINDS = {
    "Secret": "v1",
    "PersistentVolumeClaim": "v1",
    "Ingress": "networking.k8s.io/v1",
    "HorizontalPodAutoscaler": "autoscaling/v2",
    "PodDisruptionBudget": "policy/v1",
    "ServiceMonitor": "monitoring.coreos.com/v1",
    "PrometheusRule": "monitoring.coreos.com/v1",
    "NetworkPolicy": "networking.k8s.io/v1",
    "CronJob": "batch/v1",
}

# How each environment variable is set from values: (values path, value, expected env).
SETTINGS: dict[str, tuple[str, Any, str]] = {
    "REGISTRY_URL": ("registry.url", "http://registry.lab:5000", "http://registry.lab:5000"),
    "REGISTRY_AUTH_URL": ("registry.authUrl", "https://auth.lab/token", "https://auth.lab/token"),
    "REGISTRY_SERVICE": ("registry.service", "registry.lab", "registry.lab"),
    "REGISTRY_NAME": ("registry.name", "registry.lab:5000", "registry.lab:5000"),
    "REGISTRY_USERNAME": ("registry.credentials.username", "puller", "secret"),
    "REGISTRY_PASSWORD": ("registry.credentials.password", SENTINEL, "secret"),
    "REGISTRY_BEARER_TOKEN": ("registry.credentials.bearerToken", SENTINEL, "secret"),
    "REGISTRY_CLIENT_AUTH": ("registry.clientAuth", "off", "off"),
    "REGISTRY_DEFAULT_NAMESPACE": ("registry.defaultNamespace", "org/team", "org/team"),
    "REGISTRY_ALLOWLIST": ("registry.allowlist", ["a.lab", "b.lab:5000"], "a.lab,b.lab:5000"),
    "REGISTRY_ALLOW_LINK_LOCAL": ("registry.allowLinkLocal", True, "true"),
    "LOG_LEVEL": ("config.logLevel", "WARNING", "WARNING"),
    "LOG_FORMAT": ("config.logFormat", "text", "text"),
    "UPSTREAM_CONNECT_TIMEOUT": ("config.upstreamConnectTimeout", 2.5, "2.5"),
    "UPSTREAM_READ_TIMEOUT": ("config.upstreamReadTimeout", 90, "90"),
    "LAYER_CONCURRENCY": ("config.layerConcurrency", 6, "6"),
    "UPSTREAM_RETRIES": ("config.upstreamRetries", 0, "0"),
    "UPSTREAM_RETRY_AFTER_MAX": ("config.upstreamRetryAfterMax", 12.5, "12.5"),
    "DOWNLOAD_DEADLINE": ("config.downloadDeadline", 7200, "7200"),
    "TEMP_DIR": ("config.tempDir", "/scratch", "/scratch"),
    "CACHE_DIR": ("config.cacheDir", "/layers", "/layers"),
    "CACHE_MAX_BYTES": ("config.cacheMaxBytes", 21474836480, "21474836480"),
    "MAX_IMAGE_BYTES": ("config.maxImageBytes", "4G", "4G"),
    "MAX_LAYERS": ("config.maxLayers", 200, "200"),
    "MAX_TRANSFERS": ("config.maxTransfers", 300, "300"),
    "UPSTREAM_MAX_RATE": ("config.upstreamMaxRate", "10M,lab=2M", "10M,lab=2M"),
    "CLIENT_IDLE_TIMEOUT": ("config.clientIdleTimeout", 600, "600"),
    "DEFAULT_PLATFORM": ("config.defaultPlatform", "linux/arm64", "linux/arm64"),
    "SERVE_STALE": ("config.serveStale", False, "false"),
    "SERVE_STALE_TIMEOUT": ("config.serveStaleTimeout", 0.8, "0.8"),
    "OFFLINE": ("config.offline", True, "true"),
    "OFFLINE_UPSTREAMS": ("config.offlineUpstreams", "lab,docker.io", "lab,docker.io"),
    "OTEL_EXPORTER_OTLP_ENDPOINT": ("otel.endpoint", "http://otel:4317", "http://otel:4317"),
    "OTEL_EXPORTER_OTLP_PROTOCOL": ("otel.protocol", "http/protobuf", "http/protobuf"),
    "OTEL_SERVICE_NAME": ("otel.serviceName", "pt-lab", "pt-lab"),
    "WEB_CONCURRENCY": ("gunicorn.workers", 4, "4"),
    "GUNICORN_THREADS": ("gunicorn.threads", 8, "8"),
    "GRACEFUL_TIMEOUT": ("gunicorn.gracefulTimeout", 300, "300"),
    "HEADER_TIMEOUT": ("gunicorn.headerTimeout", 5, "5"),
    "BODY_TIMEOUT": ("gunicorn.bodyTimeout", 20, "20"),
    "BODY_MIN_RATE": ("gunicorn.bodyMinRate", "8K", "8K"),
    "SEND_TIMEOUT": ("gunicorn.sendTimeout", 90, "90"),
    "HEALTH_BIND": ("healthPort", 9001, "0.0.0.0:9001"),
    "BIND": ("containerPort", 9000, "0.0.0.0:9000"),
    "PORT": ("containerPort", 9000, "9000"),
    "STORE": ("store.type", "s3", "s3"),
    "S3_BUCKET": ("store.s3.bucket", "pt-cache", "pt-cache"),
    "S3_PREFIX": ("store.s3.prefix", "site-a/", "site-a/"),
    "S3_ENDPOINT_URL": ("store.s3.endpoint", "http://seaweedfs:8333", "http://seaweedfs:8333"),
    "S3_LIFECYCLE_DAYS": ("store.s3.lifecycleDays", 14, "14"),
    "AWS_REGION": ("store.s3.region", "us-east-2", "us-east-2"),
    "AWS_ACCESS_KEY_ID": ("store.s3.existingSecret", "s3-keys", "existing-secret"),
    "AWS_SECRET_ACCESS_KEY": ("store.s3.existingSecret", "s3-keys", "existing-secret"),
    "REDIS_URL": ("redis.url", "redis://redis.tools:6379/0", "redis://redis.tools:6379/0"),
    "REDIS_LOCK_LEASE": ("redis.lockLease", 45, "45"),
    "UPSTREAMS": (
        "v2.upstreams",
        {"lab": "http://10.1.2.3:5000", "hub": "https://registry-1.docker.io"},
        "hub=https://registry-1.docker.io,lab=http://10.1.2.3:5000",
    ),
    "REGISTRY_AUTH_FILE": (
        "v2.authFile.existingSecret",
        "pull-secret",
        "/etc/passthrough/registry-auth/auth.json",
    ),
    "PROXY_MODE": ("v2.proxyMode", "transparent", "transparent"),
    "PUBLIC_URL": ("v2.publicUrl", "https://pt.lab:8443", "https://pt.lab:8443"),
    "TOKEN_SECRET": ("v2.tokenSecret.value", SENTINEL, "secret"),
    "TOKEN_TTL": ("v2.tokenTtl", 900, "900"),
    "TAG_TTL": ("v2.tagTtl", 30, "30"),
    "PROXY_SERVE_STALE": ("v2.serveStale", False, "false"),
    "UPSTREAM_RULES": (
        "v2.upstreamRules",
        {"docker.io": {"allow": ["library/*", "our-org/*"]}},
        '{"docker.io":{"allow":["library/*","our-org/*"]}}',
    ),
    "PULL_COUNT_INTERVAL": ("config.pullCountInterval", 5, "5"),
    "S3_REDIRECT": ("v2.s3Redirect", True, "true"),
    "TLS_SELF_SIGNED": ("tls.selfSigned", True, "true"),
    "TLS_NAMES": (
        "tls.names",
        ["pt.lab", "10.0.0.5"],
        "demo-passthrough,demo-passthrough.tools,demo-passthrough.tools.svc,"
        "demo-passthrough.tools.svc.cluster.local,localhost,127.0.0.1,pt.lab,10.0.0.5",
    ),
    "TLS_CERT_FILE": ("tls.existingSecret", "pt-tls", "/etc/passthrough/tls/tls.crt"),
    "TLS_KEY_FILE": ("tls.existingSecret", "pt-tls", "/etc/passthrough/tls/tls.key"),
    "HOSTED_REPOSITORIES": ("hosted.repositories", ["team/*", "apps/**"], "team/*,apps/**"),
    "HTPASSWD_FILE": (
        "hosted.htpasswd.existingSecret",
        "team-users",
        "/etc/passthrough/htpasswd/htpasswd",
    ),
    "ACCESS_FILE": ("hosted.access", ACCESS, "/etc/passthrough/access/access.yaml"),
    "SYNC_FILE": (
        "sync.file",
        {"images": [{"repository": "team/app", "tags": ["1.*"]}]},
        "/etc/passthrough/sync/sync.yaml",
    ),
    "HOSTED_ANONYMOUS_PULL": ("hosted.anonymousPull", True, "true"),
    "HOSTED_MANIFEST_MAX_BYTES": ("hosted.manifestMaxBytes", 1048576, "1048576"),
    "TRUSTED_PROXIES": ("config.trustedProxies", ["10.0.0.0/8", "fd00::/8"], "10.0.0.0/8,fd00::/8"),
    "UPSTREAM_CA_FILE": (
        "upstream.caBundle.existingConfigMap",
        "corp-ca",
        "/etc/passthrough/upstream-ca/ca.crt",
    ),
}

# Settings that only apply with the s3 store: rendered on top of S3.
S3_ONLY = {
    "STORE", "S3_BUCKET", "S3_PREFIX", "S3_ENDPOINT_URL", "S3_LIFECYCLE_DAYS", "AWS_REGION",
    "S3_REDIRECT", *S3_SECRET_VARS,
}  # fmt: skip

# Settings that only apply with hosted users (v2.publicUrl and an htpasswd): on HOSTED.
HOSTED_ONLY = {"HOSTED_REPOSITORIES", "HTPASSWD_FILE", "ACCESS_FILE"}


def merged(base: Obj, extra: Obj) -> Obj:
    """base with extra deep-merged into it (as Helm merges values files)."""
    result = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def nested(path: str, value: Any) -> Obj:
    """{"a": {"b": value}} for "a.b"."""
    result: Any = value
    for key in reversed(path.split(".")):
        result = {key: result}
    assert isinstance(result, dict)
    return result


def render_text(values: Obj | None = None) -> dict[str, str]:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=NAMESPACE)


def render(values: Obj | None = None) -> list[Obj]:
    """The rendered Kubernetes objects (NOTES.txt left out)."""
    objects: list[Obj] = []
    for path, text in sorted(render_text(values).items()):
        if path.endswith(".txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def notes(values: Obj | None = None) -> str:
    return next(t for p, t in render_text(values).items() if p.endswith("NOTES.txt"))


def one(objects: list[Obj], kind: str) -> Obj:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def named(objects: list[Obj], kind: str, name: str = f"{RELEASE}-passthrough") -> Obj:
    """The one object of a kind with a name (the chart's full name by default)."""
    [found] = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def deployment_pod(objects: list[Obj]) -> Obj:
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def gc_pod(cronjob: Obj) -> Obj:
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert isinstance(spec, dict)
    return spec


def container(objects: list[Obj]) -> Obj:
    containers = deployment_pod(objects)["containers"]
    assert len(containers) == 1
    result = containers[0]
    assert isinstance(result, dict)
    return result


def effective_env(objects: list[Obj]) -> dict[str, Any]:
    """What the container sees: ConfigMap envFrom, then `env` (which wins). A value is a
    string, or ("secret", name, key) for a secretKeyRef."""
    ctr = container(objects)
    configmaps = {
        o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"
    }
    env: dict[str, Any] = {}
    for source in ctr.get("envFrom", []):
        if "configMapRef" in source and source["configMapRef"]["name"] in configmaps:
            env.update(configmaps[source["configMapRef"]["name"]])
    for item in ctr.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = ("secret", ref["name"], ref["key"])
    return env


def annotation(objects: list[Obj], name: str) -> str | None:
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    value = annotations.get(name)
    return None if value is None else str(value)


RELABEL_ACTIONS = {
    "replace", "keep", "drop", "hashmod", "labelmap", "labeldrop", "labelkeep",
    "lowercase", "uppercase", "keepequal", "dropequal",
}  # fmt: skip


def check_service_monitor(monitor: Obj, objects: list[Obj]) -> None:
    """Structural validation of a ServiceMonitor (a CRD: kubernetes-validate has no schema)."""
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    meta = monitor["metadata"]
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", meta["name"]) and len(meta["name"]) <= 63
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta["labels"].items())
    spec = monitor["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel", "targetLabels"}
    service = one(objects, "Service")
    labels = service["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items(), "selects the Service"
    assert spec["namespaceSelector"]["matchNames"] == [NAMESPACE]
    port_names = {p["name"] for p in service["spec"]["ports"]}
    duration = re.compile(r"(\d+(ms|s|m|h))+")
    endpoint_keys = {
        "port",
        "path",
        "scheme",
        "tlsConfig",
        "interval",
        "scrapeTimeout",
        "relabelings",
        "metricRelabelings",
    }
    relabel_keys = {
        "action",
        "sourceLabels",
        "separator",
        "targetLabel",
        "regex",
        "modulus",
        "replacement",
    }
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_keys
        assert endpoint["port"] in port_names
        assert endpoint["path"] == "/metrics"
        assert endpoint.get("scheme", "http") in ("http", "https")
        for key in ("interval", "scrapeTimeout"):
            assert duration.fullmatch(endpoint[key]), f"{key} {endpoint[key]!r}"
        for relabel in endpoint.get("relabelings", []) + endpoint.get("metricRelabelings", []):
            assert set(relabel) <= relabel_keys
            assert relabel.get("action", "replace").lower() in RELABEL_ACTIONS


@pytest.fixture(scope="module")
def defaults() -> list[Obj]:
    return render()


@pytest.fixture(scope="module")
def all_on() -> list[Obj]:
    return render(ALL_ON)


@pytest.fixture(scope="module")
def all_on_filesystem() -> list[Obj]:
    return render(ALL_ON_FILESYSTEM)


# --- the chart as a whole ------------------------------------------------------------


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text(encoding="utf-8"))
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "passthrough"
    assert chart["type"] == "application"
    assert isinstance(chart["appVersion"], str) and chart["appVersion"]
    for name in ("values.yaml", "templates/_helpers.tpl", "templates/NOTES.txt"):
        assert (CHART / name).is_file()


@pytest.mark.parametrize("values", [None, ALL_ON, ALL_ON_FILESYSTEM], ids=ALL_ON_IDS)
def test_strict_lint_reports_nothing(values: Obj | None) -> None:
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["total_charts_linted"] == 1
    assert report["messages"] == [] and report["errors"] == []


@pytest.mark.parametrize("values", [None, ALL_ON, ALL_ON_FILESYSTEM], ids=ALL_ON_IDS)
def test_every_object_validates_against_kubernetes_1_30(values: Obj | None) -> None:
    validate_all(render(values))


def test_validation_can_fail() -> None:
    bad = copy.deepcopy(one(render(), "Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "10001"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBERNETES, strict=True)


def test_defaults_render_only_the_core_objects(defaults: list[Obj]) -> None:
    kinds = sorted(o["kind"] for o in defaults)
    assert kinds == ["ConfigMap", "Deployment", "Pod", "Service", "ServiceAccount"]
    test_pod = one(defaults, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"


def test_every_option_renders_its_object(all_on: list[Obj], all_on_filesystem: list[Obj]) -> None:
    for kind, api_version in OPTIONAL_KINDS.items():
        objects = all_on_filesystem if kind == "PersistentVolumeClaim" else all_on
        found = [o for o in objects if o["kind"] == kind]
        assert found and all(o["apiVersion"] == api_version for o in found), kind
    # The registry credentials, the users, the generated token key and the auth file.
    assert sorted(o["metadata"]["name"] for o in all_on if o["kind"] == "Secret") == [
        "demo-passthrough-htpasswd", "demo-passthrough-registry",
        "demo-passthrough-registry-auth", "demo-passthrough-token",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "option",
    [
        {"ingress": {"enabled": True}},
        {"autoscaling": {"enabled": True}},
        {"podDisruptionBudget": {"enabled": True}},
        {"serviceMonitor": {"enabled": True}},
        {"prometheusRule": {"enabled": True}},
        {"grafana": {"dashboard": {"enabled": True}}},
        {"networkPolicy": {"enabled": True}},
        {"persistence": {"enabled": True}},
    ],
    ids=lambda o: next(iter(o)),
)
def test_each_option_alone_renders_valid_objects(option: Obj) -> None:
    objects = render(merged(S3, option) if "autoscaling" in option else option)
    assert len(objects) == 6
    validate_all(objects)


# --- the Deployment ------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, ALL_ON, ALL_ON_FILESYSTEM], ids=ALL_ON_IDS)
def test_probes_hit_health_and_ready_on_the_probe_port(values: Obj | None) -> None:
    objects = render(values)
    ctr = container(objects)
    env = effective_env(objects)
    tls = "TLS_SELF_SIGNED" in env or "TLS_CERT_FILE" in env
    port_names = {p["name"]: p["containerPort"] for p in ctr["ports"]}
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready")):
        get = ctr[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in port_names
        # HEALTH_BIND's port: the probes never wait behind transfers.
        assert f"0.0.0.0:{port_names[get['port']]}" == env["HEALTH_BIND"]
        assert get.get("scheme", "HTTP") == ("HTTPS" if tls else "HTTP")
    # /ready gives each check 2 s (and waits 3.5 s in all): the probe waits longer.
    assert ctr["readinessProbe"]["timeoutSeconds"] >= 4
    assert one(objects, "Service")["spec"]["ports"][0]["targetPort"] in port_names


@pytest.mark.parametrize("values", [None, ALL_ON, ALL_ON_FILESYSTEM], ids=ALL_ON_IDS)
def test_pod_and_container_are_hardened(values: Obj | None) -> None:
    objects = render(values)
    pods = [deployment_pod(objects), one(objects, "Pod")["spec"]]
    pods += [gc_pod(o) for o in objects if o["kind"] == "CronJob"]
    for pod in pods:
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True
        for key in ("runAsUser", "runAsGroup", "fsGroup"):
            assert isinstance(sc[key], int) and sc[key] > 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for ctr in pod["containers"]:
            csc = ctr["securityContext"]
            assert csc["runAsNonRoot"] is True
            assert isinstance(csc["runAsUser"], int) and csc["runAsUser"] > 0
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["capabilities"] == {"drop": ["ALL"]}
            assert csc["seccompProfile"] == {"type": "RuntimeDefault"}


@pytest.mark.parametrize("values", [None, ALL_ON, ALL_ON_FILESYSTEM], ids=ALL_ON_IDS)
def test_writable_paths_are_size_limited_volumes(values: Obj | None) -> None:
    objects = render(values)
    pod = deployment_pod(objects)
    env = effective_env(objects)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounted = {m["mountPath"]: volumes[m["name"]] for m in container(objects)["volumeMounts"]}
    for path in ("/tmp", env["TEMP_DIR"]):
        assert mounted[path]["emptyDir"]["sizeLimit"], f"{path}: emptyDir with a sizeLimit"
    if env["STORE"] == "filesystem":
        cache = mounted[env["CACHE_DIR"]]
        assert cache.get("persistentVolumeClaim") or cache["emptyDir"]["sizeLimit"]
    else:
        assert "CACHE_DIR" not in env and "cache" not in volumes, "s3: no cache volume"
    assert not any("hostPath" in v for v in volumes.values())


_QUANTITY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "k": 10**3, "M": 10**6}
_QUANTITY |= {"G": 10**9, "T": 10**12, "": 1}


def quantity_bytes(value: str) -> int:
    """A Kubernetes quantity such as 10Gi or 500M, in bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(value))
    assert match, f"not a quantity: {value!r}"
    return int(float(match[1]) * _QUANTITY[match[2] or ""])


def app_size_bytes(value: str) -> int:
    """A size as passthrough reads it (CACHE_MAX_BYTES): bytes, or K/M/G/T binary units."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(?:([KMGT])i?B?|B)?", value, re.I)
    assert match, f"not a size: {value!r}"
    return int(float(match[1]) * (1 << (10 * " KMGT".index((match[2] or " ").upper()))))


@pytest.mark.parametrize(
    "values",
    [None, {"persistence": {"enabled": True}}, ALL_ON_FILESYSTEM],
    ids=["emptyDir", "persistence", "all-on-filesystem"],
)
def test_cache_bound_fits_its_volume(values: Obj | None) -> None:
    objects = render(values)
    env = effective_env(objects)
    volumes = {v["name"]: v for v in deployment_pod(objects)["volumes"]}
    mount = next(
        m for m in container(objects)["volumeMounts"] if m["mountPath"] == env["CACHE_DIR"]
    )
    volume = volumes[mount["name"]]
    if "emptyDir" in volume:
        size = quantity_bytes(volume["emptyDir"]["sizeLimit"])
    else:
        claim = volume["persistentVolumeClaim"]["claimName"]
        pvc = next(o for o in objects if o["metadata"]["name"] == claim)
        size = quantity_bytes(pvc["spec"]["resources"]["requests"]["storage"])
    assert app_size_bytes(env["CACHE_MAX_BYTES"]) < size, "a full cache must fit its volume"


def test_size_parsers() -> None:
    assert quantity_bytes("10Gi") == 10 << 30 and quantity_bytes("500M") == 500 * 10**6
    assert app_size_bytes("8G") == app_size_bytes("8GiB") == 8 << 30
    assert app_size_bytes("1073741824") == 1 << 30


def test_temp_volume_follows_temp_dir() -> None:
    objects = render({"config": {"tempDir": "/scratch", "cacheDir": ""}})
    mounts = {m["mountPath"] for m in container(objects)["volumeMounts"]}
    assert mounts == {"/tmp", "/scratch"}
    assert "CACHE_DIR" not in effective_env(objects)
    # No directory is no store: never the service's default under its working directory.
    assert effective_env(objects)["STORE"] == "off"


@pytest.mark.parametrize("graceful", [30, 120, 600])
@pytest.mark.parametrize("pre_stop", [0, 5])
def test_grace_period_outlasts_graceful_timeout(graceful: int, pre_stop: int) -> None:
    objects = render({"gunicorn": {"gracefulTimeout": graceful}, "preStopSleepSeconds": pre_stop})
    rendered = int(effective_env(objects)["GRACEFUL_TIMEOUT"])
    assert rendered == graceful
    grace = deployment_pod(objects)["terminationGracePeriodSeconds"]
    assert grace > rendered + pre_stop
    hook = container(objects).get("lifecycle", {}).get("preStop")
    assert (hook["exec"]["command"] == ["sleep", str(pre_stop)]) if pre_stop else hook is None


def test_default_graceful_timeout_matches_gunicorn_conf(defaults: list[Obj]) -> None:
    from tests.deploy import graceful_timeout_default

    assert int(effective_env(defaults)["GRACEFUL_TIMEOUT"]) == graceful_timeout_default()


def test_grace_period_below_graceful_timeout_fails() -> None:
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 60})
    with pytest.raises(helm.HelmError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 125})  # 5 s preStop + 120 s
    assert (
        deployment_pod(render({"terminationGracePeriodSeconds": 126}))[
            "terminationGracePeriodSeconds"
        ]
        == 126
    )


def test_checksum_rolls_pods_when_settings_change(defaults: list[Obj]) -> None:
    base = annotation(defaults, "checksum/config")
    assert base and re.fullmatch(r"[0-9a-f]{64}", base)
    assert annotation(render(), "checksum/config") == base, "stable for the same values"
    assert annotation(render({"config": {"logLevel": "DEBUG"}}), "checksum/config") != base
    assert annotation(render({"registry": {"url": "ghcr.io"}}), "checksum/config") != base
    creds = {"registry": {"credentials": {"username": "u", "password": "p1"}}}
    first = annotation(render(creds), "checksum/secret")
    creds["registry"]["credentials"]["password"] = "p2"
    second = annotation(render(creds), "checksum/secret")
    assert first and second and first != second


def test_image_tag_defaults_to_app_version(defaults: list[Obj]) -> None:
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert container(defaults)["image"] == f"passthrough:{app_version}"
    custom = render({"image": {"repository": "registry.lab/passthrough", "tag": "1.2.3"}})
    assert container(custom)["image"] == "registry.lab/passthrough:1.2.3"


def test_extra_env_is_added(all_on: list[Obj]) -> None:
    assert effective_env(all_on)["TZ"] == "Europe/Berlin"
    assert {"configMapRef": {"name": "site-settings"}} in container(all_on)["envFrom"]


# --- settings and secrets ------------------------------------------------------------


def test_settings_table_covers_every_variable() -> None:
    assert set(SETTINGS) == set(ENV_VARS)
    registry_vars = {v for v in env_vars_read_by_app() if v.startswith("REGISTRY_")}
    assert registry_vars - {"REGISTRY_TOKEN"} <= set(SETTINGS)  # REGISTRY_TOKEN: an alias


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_every_setting_is_reachable_from_values(name: str) -> None:
    path, value, expected = SETTINGS[name]
    values = nested(path, value)
    if name in S3_ONLY:
        values = merged(S3, values)
    if name in HOSTED_ONLY:
        values = merged(HOSTED, values)
    if name == "REGISTRY_USERNAME":
        values = nested("registry.credentials", {"username": value, "password": "p"})
    elif name == "REGISTRY_PASSWORD":
        values = nested("registry.credentials", {"username": "u", "password": value})
    elif name == "TLS_NAMES":
        values = {"tls": {"selfSigned": True, "names": value}}
    elif name == "HTPASSWD_FILE":
        values["hosted"]["htpasswd"]["content"] = ""
    objects = render(values)
    env = effective_env(objects)
    assert name in env, f"{path} does not set {name}"
    if expected == "secret":
        kind, secret_name, key = env[name]
        secret = one(objects, "Secret")
        assert kind == "secret" and secret_name == secret["metadata"]["name"]
        assert base64.b64decode(secret["data"][key]).decode() == value
    elif expected == "existing-secret":
        assert env[name] == ("secret", value, name), "the key defaults to the variable's name"
        assert not [o for o in objects if o["kind"] == "Secret"]
    else:
        assert env[name] == expected


def registry_secret(objects: list[Obj]) -> Obj:
    """The Secret the chart makes for registry.credentials."""
    [secret] = [o for o in objects if o["metadata"]["name"] == f"{RELEASE}-passthrough-registry"]
    return secret


def test_credentials_only_through_secret_key_refs(all_on: list[Obj]) -> None:
    secret = registry_secret(all_on)
    env = effective_env(all_on)
    for name in SECRET_VARS:
        kind, secret_name, key = env[name]
        assert (kind, secret_name) == ("secret", secret["metadata"]["name"])
        assert key in secret["data"]
    assert not set(SECRET_VARS) & set(named(all_on, "ConfigMap")["data"])
    # The literal credential appears nowhere but (encoded) in the Secret.
    texts = render_text(ALL_ON)
    leaks = [path for path, text in texts.items() if SENTINEL in text]
    assert leaks == []
    for obj in all_on:
        if obj["kind"] != "Secret":
            assert SENTINEL not in yaml.safe_dump(obj)
    for item in container(all_on).get("env", []):
        if item["name"] in SECRET_VARS:
            assert "value" not in item and "secretKeyRef" in item["valueFrom"]


def test_existing_secret_is_referenced_not_created() -> None:
    objects = render(
        {"registry": {"credentials": {"existingSecret": "pull-creds", "bearerTokenKey": "token"}}}
    )
    assert not [o for o in objects if o["kind"] == "Secret"]
    env = effective_env(objects)
    assert env["REGISTRY_USERNAME"] == ("secret", "pull-creds", "username")
    assert env["REGISTRY_PASSWORD"] == ("secret", "pull-creds", "password")
    assert env["REGISTRY_BEARER_TOKEN"] == ("secret", "pull-creds", "token")
    assert annotation(objects, "checksum/secret") is None
    only_token = render(
        {
            "registry": {
                "credentials": {
                    "existingSecret": "tok",
                    "usernameKey": "",
                    "passwordKey": "",
                    "bearerTokenKey": "t",
                }
            }
        }
    )
    assert {k for k, v in effective_env(only_token).items() if isinstance(v, tuple)} == {
        "REGISTRY_BEARER_TOKEN"
    }


def test_s3_and_redis_credentials_only_through_secret_key_refs(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    assert env["AWS_ACCESS_KEY_ID"] == ("secret", "s3-keys", "AWS_ACCESS_KEY_ID")
    assert env["AWS_SECRET_ACCESS_KEY"] == ("secret", "s3-keys", "AWS_SECRET_ACCESS_KEY")
    assert env["REDIS_URL"] == ("secret", "redis-url", "REDIS_URL")
    for configmap in (o for o in all_on if o["kind"] == "ConfigMap"):
        assert not {*S3_SECRET_VARS, "REDIS_URL"} & set(configmap.get("data", {}))
    for item in container(all_on)["env"]:
        if item["name"] in {*S3_SECRET_VARS, "REDIS_URL"}:
            assert "value" not in item and "secretKeyRef" in item["valueFrom"]
    # The chart never creates a Secret for them: its Secrets are the registry's
    # credentials, the token key and the auth file.
    assert set(registry_secret(all_on)["data"]) == {"username", "password", "token"}
    for secret in (o for o in all_on if o["kind"] == "Secret"):
        assert not {*S3_SECRET_VARS, "REDIS_URL"} & set(secret["data"])


def test_s3_secret_key_names_can_be_overridden() -> None:
    keys = {"existingSecret": "minio-creds", "accessKeyIdKey": "accesskey",
            "secretAccessKeyKey": "secretkey"}  # fmt: skip
    env = effective_env(render(merged(S3, {"store": {"s3": keys}})))
    assert env["AWS_ACCESS_KEY_ID"] == ("secret", "minio-creds", "accesskey")
    assert env["AWS_SECRET_ACCESS_KEY"] == ("secret", "minio-creds", "secretkey")


def test_s3_without_a_secret_leaves_the_keys_to_the_aws_chain() -> None:
    objects = render(S3)
    env = effective_env(objects)
    assert not set(S3_SECRET_VARS) & set(env), "instance role or IRSA: no keys at all"
    assert not [o for o in objects if o["kind"] == "Secret"]
    assert "env" not in container(objects)


def test_redis_url_from_a_secret() -> None:
    values = merged(S3, {"redis": {"existingSecret": "redis-auth", "urlKey": "url"}})
    objects = render(values)
    assert effective_env(objects)["REDIS_URL"] == ("secret", "redis-auth", "url")
    assert "REDIS_URL" not in one(objects, "ConfigMap")["data"]
    # A URL without a password may be a plain value (it then lives in the ConfigMap).
    for url in ("redis://redis.tools:6379/0", "redis://puller@redis.tools:6379"):
        plain = render(merged(S3, {"redis": {"url": url}}))
        assert one(plain, "ConfigMap")["data"]["REDIS_URL"] == url


def test_no_credentials_no_secret(defaults: list[Obj]) -> None:
    assert not [o for o in defaults if o["kind"] == "Secret"]
    assert not set(SECRET_VARS) & set(effective_env(defaults))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"registry": {"credentials": {"existingSecret": "x", "password": "p"}}}, "not both"),
        ({"registry": {"credentials": {"username": "u"}}}, "together"),
        ({"registry": {"clientAuth": "sometimes"}}, "clientAuth"),
        ({"config": {"logFormat": "xml"}}, "logFormat"),
        ({"config": {"tempDir": "/tmp"}}, "tempDir"),
        ({"persistence": {"enabled": True}, "config": {"cacheDir": ""}}, "cacheDir"),
    ],
)
def test_bad_values_fail_the_render(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


# --- the store -----------------------------------------------------------------------


def test_default_store_is_the_filesystem(defaults: list[Obj]) -> None:
    env = effective_env(defaults)
    assert env["STORE"] == "filesystem" and env["CACHE_DIR"]
    assert not {k for k in env if k.startswith(("S3_", "AWS_", "REDIS_"))}
    assert one(defaults, "Deployment")["spec"]["replicas"] == 1


def test_s3_store_renders_its_settings(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    assert env["STORE"] == "s3"
    assert env["S3_BUCKET"] == "layers"
    assert env["S3_PREFIX"] == "passthrough/lab/"
    assert env["S3_ENDPOINT_URL"] == "http://minio.storage:9000"
    assert "S3_LIFECYCLE_DAYS" not in env or env["S3_LIFECYCLE_DAYS"] == "0"
    expiring = merged(S3, {"store": {"s3": {"lifecycleDays": 30}}})
    assert effective_env(render(expiring))["S3_LIFECYCLE_DAYS"] == "30"
    assert env["AWS_REGION"] == "eu-central-1"
    assert env["REDIS_LOCK_LEASE"] == "90"
    assert env["TEMP_DIR"] == "/var/tmp", "temp files stay per pod"
    assert "CACHE_DIR" not in env, "CACHE_DIR means nothing to the s3 store"


@pytest.mark.parametrize("extra", [{}, {"replicaCount": 3}, {"autoscaling": {"enabled": True}}])
def test_s3_store_mounts_no_cache_volume(extra: Obj) -> None:
    objects = render(merged(S3, extra))
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    pod = deployment_pod(objects)
    assert {v["name"] for v in pod["volumes"]} == {"tmp", "temp"}
    assert {m["mountPath"] for m in container(objects)["volumeMounts"]} == {"/tmp", "/var/tmp"}
    assert not any("persistentVolumeClaim" in v for v in pod["volumes"])


def test_s3_store_scales_out() -> None:
    objects = render(merged(S3, {"replicaCount": 3}))
    assert one(objects, "Deployment")["spec"]["replicas"] == 3
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    report = helm.lint(
        CHART, merged(S3, {"replicaCount": 3}), strict=True, namespace=NAMESPACE,
        kube_version="v1.30.0",
    )  # fmt: skip
    assert report["messages"] == [] and report["errors"] == []
    scaled = render(merged(S3, {"autoscaling": {"enabled": True}}))
    assert "replicas" not in one(scaled, "Deployment")["spec"]
    assert one(scaled, "HorizontalPodAutoscaler")


def test_notes_name_the_shared_store() -> None:
    assert "s3://" not in notes()
    text = notes(merged(S3, {"store": {"s3": {"prefix": "lab/"}}}))
    assert "s3://layers/lab/" in text and "once per replica" in text
    assert "once per replica" not in notes(merged(S3, {"redis": {"url": "redis://r:6379"}}))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"replicaCount": 2},
            "replicaCount 2 needs store.type=s3: with store.type=filesystem every pod has its "
            "own cache (use 1)",
        ),
        (
            {"autoscaling": {"enabled": True}},
            "autoscaling.enabled needs store.type=s3: with store.type=filesystem every pod has "
            "its own cache",
        ),
        ({"store": {"type": "s3"}}, "store.type=s3 needs store.s3.bucket"),
        ({"store": {"type": "s3"}, "replicaCount": 3}, "store.type=s3 needs store.s3.bucket"),
        ({"store": {"type": "gcs"}}, 'store.type must be filesystem or s3, not "gcs"'),
        (
            merged(S3, {"persistence": {"enabled": True}}),
            "persistence.enabled is for store.type=filesystem: with s3 the bucket is the cache "
            "(turn persistence off)",
        ),
        (
            merged(S3, {"store": {"s3": {"existingSecret": "k", "secretAccessKeyKey": ""}}}),
            "store.s3.existingSecret needs both accessKeyIdKey and secretAccessKeyKey",
        ),
        (
            merged(S3, {"store": {"s3": {"lifecycleDays": -1}}}),
            'store.s3.lifecycleDays must be a whole number of days (0: off), not "-1"',
        ),
        (
            merged(S3, {"redis": {"url": "redis://r:6379", "existingSecret": "r"}}),
            "redis: set either url or existingSecret, not both",
        ),
        (
            merged(S3, {"redis": {"url": "redis://:" + SENTINEL + "@redis:6379/0"}}),
            "redis.url holds a password: put the URL in a Secret and set redis.existingSecret",
        ),
        (
            merged(S3, {"redis": {"url": "rediss://default:" + SENTINEL + "@redis:6380"}}),
            "redis.url holds a password: put the URL in a Secret and set redis.existingSecret",
        ),
    ],
    ids=[
        "replicas-filesystem",
        "hpa-filesystem",
        "s3-no-bucket",
        "s3-no-bucket-replicas",
        "unknown-store",
        "s3-persistence",
        "s3-secret-key",
        "lifecycle-days",
        "redis-both",
        "redis-password",
        "rediss-password",
    ],
)
def test_store_values_that_cannot_work_fail_with_one_line(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    reason = str(failure.value).split("): ", 1)[-1].strip()
    assert reason == message
    assert "\n" not in reason and SENTINEL not in reason


# --- optional objects ----------------------------------------------------------------


def test_persistence_mounts_a_claim_at_cache_dir() -> None:
    objects = render({"persistence": {"enabled": True, "size": "30Gi"}})
    pvc = one(objects, "PersistentVolumeClaim")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "30Gi"
    assert pvc["spec"]["accessModes"] == ["ReadWriteOnce"]
    volumes = {v["name"]: v for v in deployment_pod(objects)["volumes"]}
    cache_dir = effective_env(objects)["CACHE_DIR"]
    mount = next(m for m in container(objects)["volumeMounts"] if m["mountPath"] == cache_dir)
    claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == pvc["metadata"]["name"]
    existing = render({"persistence": {"enabled": True, "existingClaim": "layers"}})
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    claims = [
        v["persistentVolumeClaim"]["claimName"]
        for v in deployment_pod(existing)["volumes"]
        if "persistentVolumeClaim" in v
    ]
    assert claims == ["layers"]


def test_values_warn_that_read_write_once_cannot_be_shared() -> None:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    block = text[text.index("persistence:") :]
    comments = " ".join(line for line in block.splitlines()[:25] if line.strip().startswith("#"))
    assert "ReadWriteOnce" in comments and "ReadWriteMany" in comments
    assert "one node" in comments.lower() or "across nodes" in comments.lower()
    assert "store.type=s3" in comments, "scaling out is the s3 store's job"
    # A second replica on a filesystem store, on any volume, is refused outright.
    for modes in (["ReadWriteOnce"], ["ReadWriteMany"]):
        with pytest.raises(helm.HelmError, match=r"store\.type=s3"):
            render({"persistence": {"enabled": True, "accessModes": modes}, "replicaCount": 2})


def test_autoscaling_owns_the_replica_count(all_on: list[Obj]) -> None:
    assert "replicas" not in one(all_on, "Deployment")["spec"]
    hpa = one(all_on, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == (
        "Deployment",
        one(all_on, "Deployment")["metadata"]["name"],
    )
    resources = {m["resource"]["name"] for m in hpa["spec"]["metrics"]}
    assert resources == {"cpu", "memory"}


def test_disruption_budget_selects_the_pods(all_on: list[Obj]) -> None:
    pdb = one(all_on, "PodDisruptionBudget")
    pod_labels = one(all_on, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["minAvailable"] == 1


def test_service_monitor_scrapes_metrics(all_on: list[Obj]) -> None:
    monitor = one(all_on, "ServiceMonitor")
    check_service_monitor(monitor, all_on)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    broken = copy.deepcopy(monitor)
    broken["spec"]["endpoints"][0]["port"] = "metrics"
    with pytest.raises(AssertionError):
        check_service_monitor(broken, all_on)


def test_network_policy_defaults() -> None:
    objects = render({"networkPolicy": {"enabled": True}})
    policy = one(objects, "NetworkPolicy")["spec"]
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    # Ingress: the container port only, from any source by default (devices are outside).
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert "from" not in ingress
    # Egress: DNS, then registries on 443/80 anywhere but link-local (cloud metadata).
    rules = {(p["protocol"], p["port"]): rule for rule in policy["egress"] for p in rule["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 80)} <= set(rules)
    blocks = [peer["ipBlock"] for peer in rules[("TCP", 443)]["to"]]
    assert {"cidr": "0.0.0.0/0", "except": ["169.254.0.0/16"]} in blocks
    assert {"cidr": "::/0"} in blocks


def test_network_policy_restricts_sources_when_asked(all_on: list[Obj]) -> None:
    policy = named(all_on, "NetworkPolicy")["spec"]
    assert policy["ingress"][0]["from"] == [{"ipBlock": {"cidr": "10.20.0.0/16"}}]
    assert any(p["port"] == 4317 for rule in policy["egress"] for p in rule["ports"])


def test_ingress_routes_to_the_service(all_on: list[Obj]) -> None:
    ingress = one(all_on, "Ingress")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = one(all_on, "Service")
    assert backend["name"] == service["metadata"]["name"]
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert ingress["spec"]["tls"][0]["secretName"] == "passthrough-tls"


# --- NOTES.txt and values.yaml -------------------------------------------------------


def test_notes_show_download_url_and_cisco_commands() -> None:
    text = notes()
    assert "port-forward svc/demo-passthrough 8080:8080" in text
    assert "http://127.0.0.1:8080/docker/nginx_latest.tar" in text
    assert "copy http://<host>:8080/docker/nginx_latest.tar flash:" in text
    assert "app-hosting install appid nginx package flash:nginx_latest.tar" in text
    with_ingress = notes({"ingress": ALL_ON["ingress"]})
    assert "copy https://passthrough.example.com/docker/nginx_latest.tar flash:" in with_ingress
    load_balancer = notes({"service": {"type": "LoadBalancer"}})
    assert "copy http://$SERVICE_IP:8080/docker/nginx_latest.tar flash:" in load_balancer


# Keys whose value is a Kubernetes object passed through as a whole: the comment above
# the key documents it, its inner keys are Kubernetes' own.
VERBATIM = {
    "podSecurityContext",
    "securityContext",
    "resources",
    "livenessProbe",
    "readinessProbe",
    "ingress.hosts",
    "networkPolicy.egress.registries",
    "persistence.accessModes",
    "hosted.gc.resources",
    "sync.resources",
}


def test_values_are_documented_key_by_key() -> None:
    lines = (CHART / "values.yaml").read_text(encoding="utf-8").splitlines()
    content = [
        (n, raw) for n, raw in enumerate(lines) if raw.strip() and not raw.strip().startswith("#")
    ]
    undocumented: list[str] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the open mappings
    list_indent: int | None = None
    for position, (number, raw) in enumerate(content):
        line, indent = raw.strip(), len(raw) - len(raw.lstrip())
        if list_indent is not None and indent > list_indent:
            continue  # inside a list item: example data, not settings
        list_indent = indent if line.startswith("- ") else None
        match = re.match(r"([A-Za-z][\w-]*):(.*)$", line)
        if not match:
            continue
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([key for _, key in stack] + [match[1]])
        stack.append((indent, match[1]))
        following = content[position + 1][1] if position + 1 < len(content) else ""
        is_group = not match[2].strip() and (
            len(following) - len(following.lstrip()) > indent
            and not following.strip().startswith("- ")
        )
        parents = {".".join(path.split(".")[:n]) for n in range(1, path.count(".") + 1)}
        if parents & VERBATIM or (is_group and path not in VERBATIM):
            continue
        if not lines[number - 1].strip().startswith("#"):
            undocumented.append(path)
    assert undocumented == []


@pytest.mark.parametrize(
    "prefix", ["REGISTRY_", "STORE", "S3_", "AWS_", "REDIS_", "HOSTED_", "HTPASSWD_", "ACCESS_"]
)
def test_values_document_every_registry_and_store_variable(prefix: str) -> None:
    text = (CHART / "values.yaml").read_text(encoding="utf-8")
    names = [name for name in ENV_VARS if name.startswith(prefix)]
    assert names
    for name in names:
        assert name in text, f"values.yaml does not name {name}"


# --- the /v2 API and TLS -------------------------------------------------------------


def secret_named(objects: list[Obj], name: str) -> Obj:
    [secret] = [o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == name]
    return secret


def test_v2_settings_render(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    assert env["UPSTREAMS"] == "ghcr=https://ghcr.io,hub=https://registry-1.docker.io"
    assert env["PROXY_MODE"] == "authenticated"
    assert env["PUBLIC_URL"] == "https://passthrough.example.com"
    assert (env["TOKEN_TTL"], env["TAG_TTL"]) == ("600", "60")
    assert (env["PROXY_SERVE_STALE"], env["S3_REDIRECT"]) == ("false", "true")
    defaults = effective_env(render())
    assert defaults["PROXY_MODE"] == "transparent" and "UPSTREAMS" not in defaults
    assert "TOKEN_SECRET" not in defaults and "REGISTRY_AUTH_FILE" not in defaults
    assert not {k for k in defaults if k.startswith("TLS_")}, "TLS is off by default"


def test_authenticated_mode_generates_a_token_secret(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    assert env["TOKEN_SECRET"] == ("secret", f"{RELEASE}-passthrough-token", "TOKEN_SECRET")
    secret = secret_named(all_on, f"{RELEASE}-passthrough-token")
    generated = base64.b64decode(secret["data"]["TOKEN_SECRET"]).decode()
    assert len(generated) >= 32 and generated.isalnum()
    for configmap in (o for o in all_on if o["kind"] == "ConfigMap"):
        assert "TOKEN_SECRET" not in configmap["data"]
        assert generated not in yaml.safe_dump(configmap)
    item = next(i for i in container(all_on)["env"] if i["name"] == "TOKEN_SECRET")
    assert "value" not in item


def test_token_secret_from_an_existing_secret(all_on_filesystem: list[Obj]) -> None:
    env = effective_env(all_on_filesystem)
    assert env["TOKEN_SECRET"] == ("secret", "pt-token", "secret")
    names = {o["metadata"]["name"] for o in all_on_filesystem if o["kind"] == "Secret"}
    assert f"{RELEASE}-passthrough-token" not in names


def test_auth_file_is_a_read_only_secret_mount(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    path = env["REGISTRY_AUTH_FILE"]
    volumes = {v["name"]: v for v in deployment_pod(all_on)["volumes"]}
    [mount] = [m for m in container(all_on)["volumeMounts"] if path.startswith(m["mountPath"])]
    assert mount["readOnly"] is True
    source = volumes[mount["name"]]["secret"]
    secret = secret_named(all_on, source["secretName"])
    assert secret["type"] == "kubernetes.io/dockerconfigjson"
    [item] = source["items"]
    assert f"{mount['mountPath']}/{item['path']}" == path
    assert base64.b64decode(secret["data"][item["key"]]).decode() == AUTH_FILE
    assert source["defaultMode"] == 0o440
    assert annotation(all_on, "checksum/registry-auth")
    assert "REGISTRY_AUTH_FILE" not in {i["name"] for i in container(all_on)["env"]}


def test_auth_file_from_an_existing_pull_secret(all_on_filesystem: list[Obj]) -> None:
    volumes = {v["name"]: v for v in deployment_pod(all_on_filesystem)["volumes"]}
    source = volumes["registry-auth"]["secret"]
    assert source["secretName"] == "pull-secret"
    assert source["items"] == [{"key": ".dockerconfigjson", "path": "auth.json"}]
    assert annotation(all_on_filesystem, "checksum/registry-auth") is None


def test_tls_from_an_existing_secret(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    volumes = {v["name"]: v for v in deployment_pod(all_on)["volumes"]}
    mounts = {m["mountPath"]: m for m in container(all_on)["volumeMounts"]}
    for name, key in (("TLS_CERT_FILE", "tls.crt"), ("TLS_KEY_FILE", "tls.key")):
        directory, _, filename = env[name].rpartition("/")
        mount = mounts[directory]
        assert mount["readOnly"] is True
        source = volumes[mount["name"]]["secret"]
        assert source["secretName"] == "passthrough-cert"
        assert {"key": key, "path": filename} in source["items"]
        assert source["defaultMode"] == 0o440, "the key: owner and fsGroup only"
    assert "TLS_SELF_SIGNED" not in env
    monitor = one(all_on, "ServiceMonitor")["spec"]["endpoints"][0]
    assert monitor["scheme"] == "https" and monitor["tlsConfig"] == {"insecureSkipVerify": True}


def test_tls_self_signed_covers_the_service_names(all_on_filesystem: list[Obj]) -> None:
    env = effective_env(all_on_filesystem)
    assert env["TLS_SELF_SIGNED"] == "true"
    names = env["TLS_NAMES"].split(",")
    service = one(all_on_filesystem, "Service")["metadata"]["name"]
    assert {service, f"{service}.{NAMESPACE}.svc", "localhost", "127.0.0.1"} <= set(names)
    assert names[-2:] == ["passthrough.example.com", "10.20.0.5"]
    assert len(names) == len(set(names))
    assert "TLS_CERT_FILE" not in env
    test_pod = one(all_on_filesystem, "Pod")["spec"]["containers"][0]
    assert test_pod["command"][-1].startswith(f"https://{service}:")
    text = notes({"tls": {"selfSigned": True}})
    assert "https://127.0.0.1:8080/docker/nginx_latest.tar" in text
    assert "/ca.crt" in text and "certs.d" in text and "hosts.toml" in text
    assert "TLS is off" in notes() and "TLS is off" not in text


def test_notes_show_the_v2_pull() -> None:
    text = notes({"v2": {"upstreams": {"hub": "https://registry-1.docker.io"}}})
    assert "docker pull <host>:8080/<alias>/<repository>:<tag>" in text
    assert "aliases: hub" in text
    assert "needs a content store" in notes({"config": {"cacheDir": ""}})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"v2": {"proxyMode": "authenticated"}},
            "v2.proxyMode=authenticated needs v2.publicUrl: the token realm clients are sent "
            "to (never taken from the Host header)",
        ),
        (
            {"v2": {"proxyMode": "open"}},
            'v2.proxyMode must be transparent or authenticated, not "open"',
        ),
        ({"v2": {"publicUrl": "pt.lab"}}, "v2.publicUrl must be http(s)://host[:port][/path]"),
        (
            {"v2": {"tokenSecret": {"existingSecret": "t", "value": SENTINEL}}},
            "v2.tokenSecret: set either existingSecret or value, not both",
        ),
        (
            {"v2": {"tokenSecret": {"value": "short"}}},
            "v2.tokenSecret.value must be at least 16 characters",
        ),
        (
            {"v2": {"authFile": {"existingSecret": "p", "dockerConfigJson": AUTH_FILE}}},
            "v2.authFile: set either existingSecret or dockerConfigJson, not both",
        ),
        (
            {"v2": {"s3Redirect": True}},
            "v2.s3Redirect needs store.type=s3: it redirects blob reads to the bucket",
        ),
        (
            {"v2": {"upstreams": {"Hub": "https://registry-1.docker.io"}}},
            'v2.upstreams: alias "Hub" must be a lowercase name such as hub or ghcr',
        ),
        (
            {"v2": {"upstreams": {"lab": f"https://puller:{SENTINEL}@lab.example"}}},
            "v2.upstreams.lab must be a registry URL without credentials (use v2.authFile)",
        ),
        (
            {"tls": {"selfSigned": True, "existingSecret": "c"}},
            "tls: set either selfSigned or existingSecret, not both",
        ),
        (
            merged(S3, {"tls": {"selfSigned": True}, "replicaCount": 2}),
            "tls.selfSigned makes a CA per pod: with more than one replica use "
            "tls.existingSecret (one certificate for all, e.g. from cert-manager)",
        ),
        (
            merged(S3, {"tls": {"selfSigned": True}, "autoscaling": {"enabled": True}}),
            "tls.selfSigned makes a CA per pod: with more than one replica use "
            "tls.existingSecret (one certificate for all, e.g. from cert-manager)",
        ),
    ],
    ids=[
        "authenticated-no-public-url",
        "bad-mode",
        "bad-public-url",
        "token-both",
        "token-short",
        "auth-file-both",
        "s3-redirect-filesystem",
        "bad-alias",
        "upstream-credentials",
        "tls-both",
        "self-signed-replicas",
        "self-signed-hpa",
    ],
)
def test_v2_and_tls_values_that_cannot_work_fail_with_one_line(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    reason = str(failure.value).split("): ", 1)[-1].strip()
    assert reason == message
    assert "\n" not in reason and SENTINEL not in reason


@pytest.mark.parametrize(
    "values",
    [
        {"tls": {"selfSigned": True}},
        {"tls": {"existingSecret": "c"}, "serviceMonitor": {"enabled": True}},
        {"v2": {"proxyMode": "authenticated", "publicUrl": "https://pt.lab"}},
        {"v2": {"authFile": {"existingSecret": "pull"}, "tokenSecret": {"value": SENTINEL}}},
    ],
    ids=["self-signed", "tls-secret", "authenticated", "auth-file-and-token"],
)
def test_each_v2_and_tls_option_alone_is_valid(values: Obj) -> None:
    objects = render(values)
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(obj, objects)
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["messages"] == [] and report["errors"] == []


# --- upstream registries behind a private CA -------------------------------------------


@pytest.mark.parametrize(
    ("source", "name"),
    [("existingConfigMap", "configMap"), ("existingSecret", "secret")],
)
def test_upstream_ca_is_a_read_only_mount_naming_the_file(source: str, name: str) -> None:
    values = merged(
        HOSTED,
        {
            "upstream": {"caBundle": {source: "corp-ca", "key": "root.pem"}},
            "hosted": {"gc": {"enabled": True}},
            "persistence": {"enabled": True},
        },
    )
    objects = render(values)
    path = effective_env(objects)["UPSTREAM_CA_FILE"]
    assert path == "/etc/passthrough/upstream-ca/ca.crt"
    volumes = {v["name"]: v for v in deployment_pod(objects)["volumes"]}
    [mount] = [m for m in container(objects)["volumeMounts"] if path.startswith(m["mountPath"])]
    assert mount["readOnly"] is True and "subPath" not in mount
    volume = volumes[mount["name"]]
    assert set(volume) == {"name", name}
    reference = volume[name]
    assert reference.get("name", reference.get("secretName")) == "corp-ca"
    assert reference["items"] == [{"key": "root.pem", "path": "ca.crt"}]
    assert f"{mount['mountPath']}/ca.crt" == path
    # gc reads the same ConfigMap (envFrom), so it mounts the file too.
    pod = gc_pod(one(objects, "CronJob"))
    assert mount["name"] in {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    assert mount["name"] in {v["name"] for v in pod["volumes"]}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def test_no_upstream_ca_by_default() -> None:
    objects = render()
    assert "UPSTREAM_CA_FILE" not in effective_env(objects)
    assert "upstream-ca" not in {v["name"] for v in deployment_pod(objects)["volumes"]}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"upstream": {"caBundle": {"existingConfigMap": "a", "existingSecret": "b"}}},
            "upstream.caBundle: set either existingConfigMap or existingSecret, not both",
        ),
        (
            {"upstream": {"caBundle": {"existingSecret": "b", "key": ""}}},
            "upstream.caBundle needs upstream.caBundle.key: the PEM file's key",
        ),
    ],
    ids=["both", "no-key"],
)
def test_upstream_ca_values_that_cannot_work_fail_with_one_line(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    reason = str(failure.value).split("): ", 1)[-1].strip()
    assert reason == message


# --- the hosted area and its gc CronJob ----------------------------------------------

EXAMPLE = CHART / "examples" / "combined-door.yaml"


def mounted_file(objects: list[Obj], path: str) -> tuple[Obj, Obj, str]:
    """(mount, volume, key in the volume's source) of the file at path in the server."""
    volumes = {v["name"]: v for v in deployment_pod(objects)["volumes"]}
    [mount] = [m for m in container(objects)["volumeMounts"] if path.startswith(m["mountPath"])]
    volume = volumes[mount["name"]]
    source = volume.get("secret") or volume["configMap"]
    [item] = source["items"]
    assert f"{mount['mountPath']}/{item['path']}" == path
    return mount, volume, item["key"]


def test_hosted_settings_render(all_on: list[Obj]) -> None:
    env = effective_env(all_on)
    assert env["HOSTED_REPOSITORIES"] == "team/*,apps/**"
    assert (env["HOSTED_ANONYMOUS_PULL"], env["HOSTED_MANIFEST_MAX_BYTES"]) == ("true", "8M")
    defaults = effective_env(render())
    assert not {"HOSTED_REPOSITORIES", "HTPASSWD_FILE", "ACCESS_FILE"} & set(defaults)
    assert not [o for o in render() if o["kind"] == "CronJob"], "gc is off by default"


def test_users_are_a_read_only_secret_directory_mount(all_on: list[Obj]) -> None:
    mount, volume, key = mounted_file(all_on, effective_env(all_on)["HTPASSWD_FILE"])
    assert mount["readOnly"] is True
    # A directory, not subPath: an edit of the Secret reaches the running pod.
    assert "subPath" not in mount
    assert volume["secret"]["defaultMode"] == 0o440
    secret = secret_named(all_on, volume["secret"]["secretName"])
    assert base64.b64decode(secret["data"][key]).decode() == HTPASSWD
    for configmap in (o for o in all_on if o["kind"] == "ConfigMap"):
        assert "$2y$" not in yaml.safe_dump(configmap), "hashes only in the Secret"


def test_users_from_an_existing_secret(all_on_filesystem: list[Obj]) -> None:
    path = effective_env(all_on_filesystem)["HTPASSWD_FILE"]
    _, volume, key = mounted_file(all_on_filesystem, path)
    assert (volume["secret"]["secretName"], key) == ("team-users", "users")
    names = {o["metadata"]["name"] for o in all_on_filesystem if o["kind"] == "Secret"}
    assert f"{RELEASE}-passthrough-htpasswd" not in names


def test_access_file_is_a_configmap_mount(all_on: list[Obj]) -> None:
    mount, volume, key = mounted_file(all_on, effective_env(all_on)["ACCESS_FILE"])
    assert mount["readOnly"] is True and "subPath" not in mount
    configmap = named(all_on, "ConfigMap", volume["configMap"]["name"])
    assert yaml.safe_load(configmap["data"][key]) == ACCESS
    # Its own object: an edit of the rules does not change checksum/config (no roll).
    edited = merged(ALL_ON, {"hosted": {"access": {"rules": []}}})
    assert annotation(render(edited), "checksum/config") == annotation(all_on, "checksum/config")


def test_hosted_users_get_a_token_secret_in_transparent_mode() -> None:
    objects = render(HOSTED)
    env = effective_env(objects)
    assert env["PROXY_MODE"] == "transparent"
    assert env["TOKEN_SECRET"] == ("secret", f"{RELEASE}-passthrough-token", "TOKEN_SECRET")
    assert env["PUBLIC_URL"] == "https://pt.lab"
    assert "ACCESS_FILE" not in env, "no rules: every user may do everything"


def test_gc_cronjob_runs_gc_with_the_servers_settings(all_on: list[Obj]) -> None:
    cronjob = one(all_on, "CronJob")
    spec = cronjob["spec"]
    assert (spec["schedule"], spec["timeZone"]) == ("*/30 * * * *", "Europe/Berlin")
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] == spec["failedJobsHistoryLimit"] == 5
    assert spec["jobTemplate"]["spec"]["activeDeadlineSeconds"] == 1800
    pod = gc_pod(cronjob)
    assert pod["restartPolicy"] == "Never"
    [gc] = pod["containers"]
    assert gc["command"] == ["passthrough", "gc", "--delete", "--grace", "2h"]
    assert gc["image"] == container(all_on)["image"]
    # The same settings, Secrets and files: load_settings checks them all.
    assert gc["envFrom"] == container(all_on)["envFrom"]
    assert gc["env"] == container(all_on)["env"]
    assert gc["volumeMounts"] == container(all_on)["volumeMounts"]
    server_volumes = {v["name"]: v for v in deployment_pod(all_on)["volumes"]}
    gc_volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(gc_volumes) == set(server_volumes)
    for name, volume in gc_volumes.items():
        if name == "temp":
            assert volume == {"name": "temp", "emptyDir": {"sizeLimit": "64Mi"}}, "no archives"
        else:
            assert volume == server_volumes[name], name
    assert "affinity" not in pod, "s3: any node"
    assert not any("livenessProbe" in c or "ports" in c for c in pod["containers"])


SYNC_FILE = {"images": [{"upstream": "ghcr", "repository": "org/*", "semver": ">=1 <2"}]}


def test_sync_cronjob_runs_sync_with_the_servers_settings_and_file() -> None:
    values = merged(S3, {"sync": {"enabled": True, "schedule": "5 * * * *", "file": SYNC_FILE}})
    objects = render(values)
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)
    cronjob = named(objects, "CronJob", f"{RELEASE}-passthrough-sync")
    assert cronjob["spec"]["schedule"] == "5 * * * *"
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = gc_pod(cronjob)
    [sync] = pod["containers"]
    assert sync["command"] == ["passthrough", "sync"]
    server = container(objects)
    assert sync["image"] == server["image"]
    assert (sync["envFrom"], sync["volumeMounts"]) == (server["envFrom"], server["volumeMounts"])
    assert {"name": "sync", "mountPath": "/etc/passthrough/sync", "readOnly": True} in sync[
        "volumeMounts"
    ]
    # The file, from its ConfigMap, in the pods (POST /api/v1/sync) and the job alike.
    config = named(objects, "ConfigMap", f"{RELEASE}-passthrough-sync")
    assert yaml.safe_load(config["data"]["sync.yaml"]) == SYNC_FILE
    assert effective_env(objects)["SYNC_FILE"] == "/etc/passthrough/sync/sync.yaml"
    labels = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert not selector.items() <= labels.items(), "the sync pods are no servers"
    assert labels["app.kubernetes.io/component"] == "sync"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sync": {"enabled": True}}, "sync.enabled needs sync.file"),
        ({"sync": {"file": ["a"]}}, "sync.file must be a mapping"),
    ],
)
def test_bad_sync_values_fail_the_render(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render(values)


def test_sync_pods_get_the_servers_egress_and_no_ingress() -> None:
    values = {"sync": {"enabled": True, "file": SYNC_FILE}, "networkPolicy": {"enabled": True}}
    objects = render(values)
    server = named(objects, "NetworkPolicy")["spec"]
    policy = named(objects, "NetworkPolicy", f"{RELEASE}-passthrough-sync")["spec"]
    cronjob = named(objects, "CronJob", f"{RELEASE}-passthrough-sync")
    labels = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ingress"] == [] and policy["egress"] == server["egress"]
    assert labels["app.kubernetes.io/component"] == "sync"


def test_no_sync_file_no_sync_objects(defaults: list[Obj]) -> None:
    assert not [o for o in defaults if "sync" in o["metadata"]["name"]]


def test_gc_pods_are_not_servers(all_on: list[Obj]) -> None:
    labels = one(all_on, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["metadata"]
    labels = labels["labels"]
    selectors = [
        one(all_on, "Service")["spec"]["selector"],
        one(all_on, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        one(all_on, "Deployment")["spec"]["selector"]["matchLabels"],
        named(all_on, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"],
    ]
    for selector in selectors:
        assert not selector.items() <= labels.items(), f"{selector} selects the gc pods"
    policy = named(all_on, "NetworkPolicy", f"{RELEASE}-passthrough-gc")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert policy["ingress"] == [] and policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["egress"] == named(all_on, "NetworkPolicy")["spec"]["egress"]


def test_gc_on_the_filesystem_store_shares_the_pods_volume(
    all_on_filesystem: list[Obj],
) -> None:
    pod = gc_pod(one(all_on_filesystem, "CronJob"))
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for p in (pod, deployment_pod(all_on_filesystem))
        for v in p["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {f"{RELEASE}-passthrough-cache"}
    # A ReadWriteOnce volume is attached to one node: the job runs where a server runs.
    [term] = pod["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    server_labels = one(all_on_filesystem, "Deployment")["spec"]["template"]["metadata"]
    assert term["labelSelector"]["matchLabels"].items() <= server_labels["labels"].items()
    assert pod["nodeSelector"] == ALL_ON["nodeSelector"]
    assert pod["tolerations"] == ALL_ON["tolerations"]


def test_notes_show_the_push() -> None:
    text = notes(HOSTED)
    assert "Hosted repositories (team/*)" in text
    # The host clients use: PUBLIC_URL's.
    assert "docker login pt.lab\n" in text and "docker push pt.lab/team/app" not in text
    assert "docker push pt.lab/<hosted repository>:<tag>" in text
    assert '{"registry-mirrors": ["https://pt.lab"]}' in text
    assert "hosted.gc.enabled=true" in text
    with_gc = notes(merged(S3, merged(HOSTED, {"hosted": {"gc": {"enabled": True}}})))
    assert "passthrough gc --delete --grace 1h" in with_gc
    assert "docker login" not in notes()


# A line with a plaintext password instead of a bcrypt hash.
PLAIN_HTPASSWD = HTPASSWD.splitlines()[0] + f"\nbob:{SENTINEL}\n"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"hosted": {"repositories": ["team/*"]}},
            "hosted.repositories needs hosted.htpasswd (existingSecret or content): a push "
            "needs one of passthrough's users",
        ),
        (
            {"hosted": {"htpasswd": {"content": HTPASSWD}}},
            "hosted.htpasswd needs v2.publicUrl: the token realm users log in at (never "
            "taken from the Host header)",
        ),
        (
            merged(HOSTED, {"hosted": {"htpasswd": {"existingSecret": "users"}}}),
            "hosted.htpasswd: set either existingSecret or content, not both",
        ),
        (
            merged(HOSTED, {"hosted": {"repositories": ["Team/*"]}}),
            'hosted.repositories: "Team/*" is not a pattern such as team/* or apps/**',
        ),
        (
            merged(HOSTED, {"hosted": {"htpasswd": {"content": PLAIN_HTPASSWD}}}),
            "hosted.htpasswd.content: line 2 is not user:<bcrypt hash> (make it with "
            "htpasswd -nB <user>)",
        ),
        (
            merged(HOSTED, {"hosted": {"access": ["team/*"]}}),
            "hosted.access must be a mapping: {groups: {...}, rules: [...]}",
        ),
        (
            merged(S3, merged(HOSTED, {"store": {"s3": {"lifecycleDays": 30}}})),
            "store.s3.lifecycleDays would expire pushed content too (the rule knows no pins): "
            "keep it 0 with hosted.repositories",
        ),
        (
            merged(S3, {"hosted": {"gc": {"enabled": True}}}),
            "hosted.gc needs hosted.repositories: it collects hosted content only",
        ),
        (
            merged(S3, merged(HOSTED, {"hosted": {"gc": {"enabled": True, "grace": "1 hour"}}})),
            'hosted.gc.grace must be a duration such as 90s, 15m, 1h or 2d, not "1 hour"',
        ),
        (
            merged(HOSTED, {"hosted": {"gc": {"enabled": True}}}),
            "hosted.gc with store.type=filesystem needs persistence.enabled: the CronJob must "
            "mount the pods' cache volume (or use store.type=s3)",
        ),
        (
            merged(
                HOSTED,
                {
                    "hosted": {"gc": {"enabled": True}},
                    "persistence": {"enabled": True, "accessModes": ["ReadWriteOncePod"]},
                },
            ),
            "hosted.gc cannot mount a ReadWriteOncePod cache volume beside the pods: use "
            "ReadWriteOnce (same node) or store.type=s3",
        ),
    ],
    ids=[
        "repositories-without-users",
        "users-without-public-url",
        "users-both",
        "bad-pattern",
        "plaintext-password",
        "access-not-a-mapping",
        "s3-lifecycle",
        "gc-without-repositories",
        "gc-bad-grace",
        "gc-filesystem-without-persistence",
        "gc-read-write-once-pod",
    ],
)
def test_hosted_values_that_cannot_work_fail_with_one_line(values: Obj, message: str) -> None:
    with pytest.raises(helm.HelmError) as failure:
        render(values)
    reason = str(failure.value).split("): ", 1)[-1].strip()
    assert reason == message
    assert "\n" not in reason and SENTINEL not in reason


def validate_all(objects: list[Obj]) -> None:
    for obj in objects:
        validate_object(obj, objects)


def validate_object(obj: Obj, objects: list[Obj]) -> None:
    """Kubernetes 1.30's schema; the Prometheus Operator's CRDs structurally."""
    if obj["kind"] == "ServiceMonitor":
        check_service_monitor(obj, objects)
    elif obj["kind"] == "PrometheusRule":
        check_prometheus_rule(obj)
    else:
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def check_prometheus_rule(rule: Obj) -> None:
    """Structural validation of a PrometheusRule (a CRD): the chart's rule file as spec."""
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    check_rule_groups(rule["spec"])


@pytest.mark.parametrize(
    "values",
    [
        HOSTED,
        merged(HOSTED, {"hosted": {"access": ACCESS, "anonymousPull": True}}),
        merged(S3, merged(HOSTED, {"hosted": {"gc": {"enabled": True}}})),
        merged(HOSTED, {"hosted": {"gc": {"enabled": True}}, "persistence": {"enabled": True}}),
        merged(
            HOSTED,
            {
                "hosted": {
                    "gc": {"enabled": True},
                    "htpasswd": {"content": "", "existingSecret": "u"},
                },
                "persistence": {"enabled": True, "existingClaim": "cache"},
            },
        ),
    ],
    ids=["users", "access", "gc-s3", "gc-filesystem", "gc-existing-claim"],
)
def test_each_hosted_option_alone_is_valid(values: Obj) -> None:
    validate_all(render(values))
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["messages"] == [] and report["errors"] == []


@pytest.fixture(scope="module")
def example_values() -> Obj:
    values = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert isinstance(values, dict)
    return values


def test_the_combined_door_example_renders(example_values: Obj) -> None:
    objects = render(example_values)
    validate_all(objects)
    report = helm.lint(
        CHART, example_values, strict=True, namespace=NAMESPACE, kube_version="v1.30.0"
    )
    assert report["messages"] == [] and report["errors"] == []
    env = effective_env(objects)
    # The Docker Hub mirror (names without an alias), ghcr by alias, team/* hosted.
    assert env["REGISTRY_URL"] == "docker.io"
    assert env["UPSTREAMS"] == "ghcr=https://ghcr.io"
    assert env["HOSTED_REPOSITORIES"] == "team/*"
    assert env["HTPASSWD_FILE"] and env["ACCESS_FILE"]
    assert env["PUBLIC_URL"] == "https://registry.example.com"
    assert isinstance(env["TOKEN_SECRET"], tuple)
    # TLS from one certificate, S3 + Redis, two replicas, gc on the shared store.
    assert env["TLS_CERT_FILE"] and "TLS_SELF_SIGNED" not in env
    assert (env["STORE"], env["S3_BUCKET"]) == ("s3", "passthrough-door")
    assert env["REDIS_URL"].startswith("redis://")
    assert one(objects, "Deployment")["spec"]["replicas"] == 2
    assert "affinity" not in gc_pod(one(objects, "CronJob"))
    # Every credential from a Secret made beforehand: the example holds none.
    made = {o["metadata"]["name"] for o in objects if o["kind"] == "Secret"}
    assert made == {f"{RELEASE}-passthrough-token"}, "only the generated token key"
    assert one(objects, "Service")["spec"]["ports"][0]["port"] == 443


# Stand-ins for the files of Secrets the chart only names (existingSecret).
EXTERNAL_FILES = {
    "htpasswd": HTPASSWD,
    "auth.json": AUTH_FILE,
    "tls.crt": "certificate",
    "tls.key": "key",
}


def settings_of(objects: list[Obj], root: Path) -> Settings:
    """The Settings passthrough builds from a render: the container's environment (the
    ConfigMap, then Secrets: the chart's own decoded, others a stand-in) and every file
    it mounts, written under root at its mount path (paths in the environment follow)."""
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
    env: dict[str, str] = {}
    for name, value in effective_env(objects).items():
        if isinstance(value, tuple):
            _, secret, key = value
            data = secrets.get(secret, {}).get("data", {})
            stand_in = "redis://redis.tools:6379/0" if name == "REDIS_URL" else "s" * 32
            value = base64.b64decode(data[key]).decode() if key in data else stand_in
        env[name] = value
    volumes = {v["name"]: v for v in deployment_pod(objects)["volumes"]}
    for mount in container(objects)["volumeMounts"]:
        where = root / mount["mountPath"].lstrip("/")
        where.mkdir(parents=True, exist_ok=True)
        volume = volumes[mount["name"]]
        if "secret" in volume and volume["secret"]["secretName"] in secrets:
            data = {
                k: base64.b64decode(v).decode()
                for k, v in secrets[volume["secret"]["secretName"]]["data"].items()
            }
        elif "configMap" in volume and volume["configMap"]["name"] in configmaps:
            data = configmaps[volume["configMap"]["name"]]["data"]
        elif "secret" in volume:
            data = {i["key"]: EXTERNAL_FILES[i["path"]] for i in volume["secret"]["items"]}
        else:
            continue
        for item in (volume.get("secret") or volume["configMap"]).get("items", []):
            (where / item["path"]).write_text(data[item["key"]], encoding="utf-8")
        for name, value in env.items():
            if value.startswith(mount["mountPath"] + "/") or value == mount["mountPath"]:
                env[name] = str(root) + value
    return load_settings(env, env_file=str(root / "no.env"))


@pytest.mark.parametrize(
    "values",
    [ALL_ON, ALL_ON_FILESYSTEM, HOSTED, "example"],
    ids=["all-on", "all-on-filesystem", "hosted", "combined-door"],
)
def test_the_service_accepts_what_the_chart_renders(
    values: Obj | str, example_values: Obj, tmp_path: Path
) -> None:
    objects = render(example_values if isinstance(values, str) else values)
    settings = settings_of(objects, tmp_path)
    assert settings.hosted_repositories
    assert settings.htpasswd_file and Path(settings.htpasswd_file).read_text() == HTPASSWD
    assert settings.auth_enabled and settings.public_url and settings.token_secret
    if settings.access_file:
        assert yaml.safe_load(Path(settings.access_file).read_text()) in (
            ACCESS,
            example_values["hosted"]["access"],
        )


def test_the_service_check_can_fail(tmp_path: Path) -> None:
    objects = copy.deepcopy(render(HOSTED))
    ctr = container(objects)
    ctr["env"] = [item for item in ctr["env"] if item["name"] != "TOKEN_SECRET"]
    with pytest.raises(ConfigError, match="TOKEN_SECRET is required with HTPASSWD_FILE"):
        settings_of(objects, tmp_path / "no-token")
    objects = copy.deepcopy(render(HOSTED))
    container(objects)["volumeMounts"] = [
        m for m in container(objects)["volumeMounts"] if m["name"] != "htpasswd"
    ]
    with pytest.raises(ConfigError, match=r"HTPASSWD_FILE .* is not a file"):
        settings_of(objects, tmp_path / "no-users")


# --- the dashboard and the alert rules ---------------------------------------------------


def test_the_dashboard_configmap_is_the_repositorys_file(all_on: list[Obj]) -> None:
    name = f"{RELEASE}-passthrough-dashboard"
    [config_map] = [o for o in all_on if o["metadata"]["name"] == name]
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1", "the sidecar's label"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Registries"}
    assert json.loads(config_map["data"]["passthrough.json"]) == json.loads(DASHBOARD.read_text())


def test_the_prometheus_rule_is_the_repositorys_rule_file(all_on: list[Obj]) -> None:
    rule = one(all_on, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())


def test_dashboard_and_rules_are_off_by_default(defaults: list[Obj]) -> None:
    assert not [o for o in defaults if o["kind"] == "PrometheusRule"]
    assert not [o for o in defaults if o["metadata"]["name"].endswith("-dashboard")]

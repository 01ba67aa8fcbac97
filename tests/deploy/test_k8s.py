"""The invariants of deploy/k8s, asserted on what kustomize renders for every overlay."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.__main__ import GRACE_SECONDS as GATEWAY_GRACE_SECONDS
from gateway.config import GatewaySettings
from gateway.grpc_backends import CHANNEL_OPTIONS as gateway_channel_options
from imgpipe.cli import SERVICES
from services.common.config import CommonSettings, EnvReader
from services.ingest.config import IngestSettings
from services.status.config import StatusSettings
from services.worker.config import WorkerSettings
from tests.deploy.manifests import (
    APP_COMPONENTS,
    BACKENDS,
    GRPC_COMPONENTS,
    OVERLAYS,
    ROOT,
    Manifest,
    Rendered,
    Workload,
    matches,
    networks,
    policy_rules,
    quantity,
    run_check,
)

pytestmark = pytest.mark.deploy

SECRET_NAME = "imgpipe-secrets"
# What the autoscalers follow (services/status/stream_metrics.py, docs/scheduling.md).
BACKLOG_METRIC = "imgpipe_backlog_images"
SECRET_TEMPLATE = ROOT / "deploy" / "k8s" / "overlays" / "prod" / "secret.example.yaml"
# What the internet-egress rules must never open: where pods, services, nodes and cloud
# metadata live.
PRIVATE_V4 = networks(
    [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "127.0.0.0/8",
    ]
)
PRIVATE_V6 = networks(["fc00::/7", "fe80::/10", "::1/128"])
DATABASE_PORTS = {5432, 6379, 6380}


def default_of(cls: Any, name: str) -> Any:
    """A settings dataclass field's default (slots dataclasses keep none on the class)."""
    (found,) = [f.default for f in dataclasses.fields(cls) if f.name == name]
    return found


def template_secret() -> Manifest:
    loaded: Manifest = yaml.safe_load(SECRET_TEMPLATE.read_text())
    return loaded


def secrets_of(overlay: Rendered) -> dict[str, str]:
    """The Secret's keys and values: rendered in dev, the template's placeholders in prod."""
    data = overlay.secret_data(SECRET_NAME)
    if data is not None:
        return data
    placeholders: dict[str, str] = template_secret()["stringData"]
    return placeholders


def test_every_overlay_renders_and_is_schema_valid(tmp_path: Path) -> None:
    result = run_check(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "problem" not in result.stdout
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{o}.yaml" for o in OVERLAYS]


def test_the_four_services_run_from_one_image_by_command(overlay: Rendered) -> None:
    apps = overlay.apps()
    assert sorted(apps) == sorted(APP_COMPONENTS)
    images = set()
    for component, workload in apps.items():
        (container,) = workload.containers()
        assert container["args"] == [component]
        assert component in SERVICES  # what `imgpipe serve` accepts (the image's ENTRYPOINT)
        images.add(container["image"])
    assert len(images) == 1


def test_images_are_pinned(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        for container in workload.containers():
            image = container["image"]
            name, _, tag = image.rpartition(":")
            assert name and tag and "/" not in tag, f"{workload.name}: {image} has no tag"
            assert tag != "latest", f"{workload.name}: {image}"


def test_every_container_has_liveness_and_readiness_probes(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        for container in workload.containers(init=False):
            for probe in ("livenessProbe", "readinessProbe"):
                assert probe in container, f"{workload.name}/{container['name']} has no {probe}"


def test_grpc_services_use_native_grpc_probes_on_their_listen_port(dev: Rendered) -> None:
    secrets = secrets_of(dev)
    for component in GRPC_COMPONENTS:
        workload = dev.apps()[component]
        (container,) = workload.containers()
        listen = dev.effective_env(container, secrets=secrets)["IMGPIPE_GRPC_LISTEN"]
        port = int(listen.rpartition(":")[2])
        assert listen.startswith("0.0.0.0:"), "probes and the gateway reach the pod IP"
        assert port in workload.port_numbers()
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{component} {probe}"


def test_gateway_uses_http_probes(overlay: Rendered) -> None:
    (container,) = overlay.apps()["gateway"].containers()
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["port"] == "http"


def test_liveness_is_more_patient_than_readiness(overlay: Rendered) -> None:
    # Health goes NOT_SERVING while Postgres or Redis is down: that must take pods out of
    # rotation quickly, and restart them only if it lasts.
    for component in GRPC_COMPONENTS:
        (container,) = overlay.apps()[component].containers()

        def patience(probe: Manifest) -> int:
            period: int = probe.get("periodSeconds", 10)
            failures: int = probe.get("failureThreshold", 3)
            return period * failures

        assert patience(container["livenessProbe"]) >= 120
        assert patience(container["readinessProbe"]) <= 15


def test_every_container_has_requests_and_limits(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        for container in workload.containers():
            resources = container.get("resources", {})
            where = f"{workload.name}/{container['name']}"
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None and limit is not None, f"{where}: {resource}"
                assert quantity(request) <= quantity(limit), f"{where}: {resource}"


def test_every_pod_runs_non_root_read_only_without_capabilities(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        pod = workload.pod
        pod_security = pod.get("securityContext", {})
        assert pod_security.get("runAsNonRoot") is True, workload.name
        assert pod_security.get("runAsUser", 1) != 0, workload.name
        assert pod_security.get("seccompProfile", {}).get("type") == "RuntimeDefault"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), f"{workload.name}: {flag}"
        assert not any("hostPath" in volume for volume in pod.get("volumes", []))
        for container in workload.containers():
            where = f"{workload.name}/{container['name']}"
            security = container.get("securityContext", {})
            assert security.get("runAsNonRoot") is True, where
            assert security.get("runAsUser", 1) != 0, where
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("privileged", False) is False, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not security.get("capabilities", {}).get("add"), where


def test_app_pods_run_as_the_image_user(overlay: Rendered) -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile
    for workload in overlay.apps().values():
        assert workload.pod["securityContext"]["runAsUser"] == 10001


def test_namespaces_enforce_the_restricted_pod_security_standard(overlay: Rendered) -> None:
    (namespace,) = overlay.of_kind("Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    name = namespace["metadata"]["name"]
    for obj in overlay.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == name, f"{obj['kind']}/{obj['metadata']}"


def test_service_accounts_exist_and_mount_no_token(overlay: Rendered) -> None:
    accounts = {sa["metadata"]["name"]: sa for sa in overlay.of_kind("ServiceAccount")}
    for workload in overlay.workloads():
        name = workload.pod.get("serviceAccountName")
        assert name and name != "default", workload.name
        assert name in accounts, f"{workload.name}: ServiceAccount {name} is not rendered"
        assert accounts[name].get("automountServiceAccountToken") is False, name
        assert workload.pod.get("automountServiceAccountToken") is False, workload.name


def test_every_service_selects_one_workload_and_its_ports(overlay: Rendered) -> None:
    for service in overlay.of_kind("Service"):
        name = service["metadata"]["name"]
        selector = service["spec"].get("selector")
        assert selector, f"Service {name} has no selector"
        selected = overlay.selected({"matchLabels": selector})
        assert len(selected) == 1, f"Service {name} selects {[w.name for w in selected]}"
        (workload,) = selected
        for port in service["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if isinstance(target, str):
                assert target in workload.port_names(), f"{name}: no port named {target}"
            else:
                assert target in workload.port_numbers(), f"{name}: no port {target}"


def test_service_addresses_in_the_config_reach_the_services(overlay: Rendered) -> None:
    config = overlay.config_data(config_map_name(overlay))
    for variable, component in (
        ("IMGPIPE_INGEST_ADDR", "ingest"),
        ("IMGPIPE_STATUS_ADDR", "status"),
    ):
        host, _, port = config[variable].rpartition(":")
        service = overlay.named("Service", host)
        assert service is not None, f"{variable}: no Service {host}"
        (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
        workload = overlay.apps()[component]
        assert matches({"matchLabels": service["spec"]["selector"]}, workload.labels)
        assert workload.port_names()[service_port["targetPort"]] == int(port)


def test_the_gateway_balances_its_calls_over_every_ingest_and_status_pod(
    overlay: Rendered,
) -> None:
    # A virtual IP would pin a gateway's single HTTP/2 connection (all its calls) to one pod.
    config = overlay.config_data(config_map_name(overlay))
    for variable in ("IMGPIPE_INGEST_ADDR", "IMGPIPE_STATUS_ADDR"):
        service = overlay.named("Service", config[variable].rpartition(":")[0])
        assert service is not None and service["spec"].get("clusterIP") == "None", variable
    assert ("grpc.lb_policy_name", "round_robin") in gateway_channel_options


def test_every_deployment_has_a_disruption_budget(overlay: Rendered) -> None:
    budgets = overlay.of_kind("PodDisruptionBudget")
    for workload in overlay.workloads():
        if workload.kind != "Deployment":
            continue
        covering = [pdb for pdb in budgets if matches(pdb["spec"]["selector"], workload.labels)]
        assert len(covering) == 1, f"{workload.name}: {len(covering)} budgets"
        spec = covering[0]["spec"]
        assert "maxUnavailable" in spec or "minAvailable" in spec
    for pdb in budgets:
        assert overlay.selected(pdb["spec"]["selector"]), pdb["metadata"]["name"]


def test_termination_grace_outlasts_the_drain(overlay: Rendered) -> None:
    secrets = secrets_of(overlay)
    for component, workload in overlay.apps().items():
        (container,) = workload.containers()
        env = overlay.effective_env(container, secrets=secrets)
        pre_stop = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {})
        pause = pre_stop.get("seconds", 0)
        if component == "gateway":
            # The gateway's drain is a constant in gateway/__main__.py.
            drain = GATEWAY_GRACE_SECONDS
        else:
            grace = float(
                env.get("IMGPIPE_GRACE_SECONDS", default_of(CommonSettings, "grace_seconds"))
            )
            assert grace > 0
            # run_service() waits `grace` for its loops, then up to `grace` for the server.
            drain = 2 * grace
        period = workload.pod["terminationGracePeriodSeconds"]
        assert period > pause + drain, f"{component}: {period} s <= {pause} + {drain} s"


def test_workers_drain_longer_than_the_default(overlay: Rendered) -> None:
    (container,) = overlay.apps()["worker"].containers()
    env = overlay.effective_env(container, secrets=secrets_of(overlay))
    assert float(env["IMGPIPE_GRACE_SECONDS"]) >= default_of(WorkerSettings, "process_budget")
    assert env["IMGPIPE_CONSUMER_NAME"] == "metadata.name"  # the pod name
    threads = int(env["IMGPIPE_WORKER_THREADS"])
    assert threads == quantity(container["resources"]["limits"]["cpu"])


def config_map_name(overlay: Rendered) -> str:
    names = [cm["metadata"]["name"] for cm in overlay.of_kind("ConfigMap")]
    (found,) = [str(name) for name in names if name.startswith("imgpipe-config")]
    return found


def test_config_and_secret_references_resolve(overlay: Rendered) -> None:
    config_maps = {cm["metadata"]["name"] for cm in overlay.of_kind("ConfigMap")}
    secret_keys = set(secrets_of(overlay))
    rendered_secrets = {s["metadata"]["name"] for s in overlay.of_kind("Secret")}
    for workload in overlay.workloads():
        for container in workload.containers():
            for source in container.get("envFrom", []):
                assert source.get("configMapRef", {}).get("name", "imgpipe-config") in config_maps
                assert "secretRef" not in source, "name each secret key a container gets"
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == SECRET_NAME
                    assert ref["key"] in secret_keys, f"{workload.name}: {ref['key']}"
        for volume in workload.pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps
            if "secret" in volume:
                assert volume["secret"]["secretName"] in rendered_secrets
    for auth in overlay.of_kind("TriggerAuthentication"):
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["name"] == SECRET_NAME and ref["key"] in secret_keys


def test_prod_applies_no_secret_and_the_template_lists_every_key(
    prod: Rendered, dev: Rendered
) -> None:
    assert prod.of_kind("Secret") == [], "kubectl apply -k would overwrite the real Secret"
    template = template_secret()
    assert template["metadata"]["name"] == SECRET_NAME
    assert template["metadata"]["namespace"] == prod.of_kind("Namespace")[0]["metadata"]["name"]
    for value in template["stringData"].values():
        assert "REPLACE_ME" in value, "the template holds placeholders, never real secrets"
    wanted = {
        "IMGPIPE_DATABASE_URL",
        "IMGPIPE_REDIS_URL",
        "IMGPIPE_WEBHOOK_SECRET",
        "IMGPIPE_API_KEYS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "REDIS_PASSWORD",
    }
    assert wanted <= set(template["stringData"])
    dev_keys = set(secrets_of(dev))
    assert set(template["stringData"]) <= dev_keys


def test_dev_configuration_is_accepted_by_every_service(dev: Rendered) -> None:
    # The real settings parsers, fed what each container would start with.
    parsers = {
        "gateway": GatewaySettings.from_env,
        "ingest": IngestSettings.from_env,
        "status": StatusSettings.from_env,
        "worker": WorkerSettings.from_env,
    }
    secrets = secrets_of(dev)
    for component, workload in dev.apps().items():
        (container,) = workload.containers()
        parsers[component](dev.effective_env(container, secrets=secrets))


def test_no_overlay_opens_the_fetch_guard_or_arms_failpoints(overlay: Rendered) -> None:
    secrets = secrets_of(overlay)
    for workload in overlay.apps().values():
        (container,) = workload.containers()
        env = overlay.effective_env(container, secrets=secrets)
        assert not env.get("IMGPIPE_FETCH_ALLOW"), "tests and local demos only"
        assert not env.get("IMGPIPE_FAILPOINTS"), "fault tests only"


def test_metrics_are_served_and_announced(overlay: Rendered) -> None:
    config = overlay.config_data(config_map_name(overlay))
    assert config["IMGPIPE_METRICS_LISTEN"] == "0.0.0.0:9464"
    for workload in overlay.apps().values():
        assert workload.port_names()["metrics"] == 9464
        assert workload.annotations["prometheus.io/scrape"] == "true"
        assert workload.annotations["prometheus.io/port"] == "9464"


def test_migrations_are_safe_with_several_replicas() -> None:
    # No one-shot migration Job: every service migrates at start under an advisory lock, so
    # replicas that start together take turns. If a `migrate` command appears, revisit.
    from services.common.db import pool

    assert "pg_advisory_lock" in Path(pool.__file__).read_text()
    assert "migrate" not in SERVICES


# --- network policies --------------------------------------------------------------------------


def test_everything_is_denied_by_default(overlay: Rendered) -> None:
    deny = [
        p
        for p in overlay.of_kind("NetworkPolicy")
        if p["spec"]["podSelector"] == {}
        and set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
    ]
    assert len(deny) == 1


def test_only_the_gateway_accepts_traffic_from_outside(overlay: Rendered) -> None:
    for workload in overlay.workloads():
        for policy, rule in policy_rules(overlay, workload, "ingress"):
            where = f"{policy['metadata']['name']} -> {workload.name}"
            ports = [p["port"] for p in rule.get("ports", [])]
            peers: list[Manifest] = rule.get("from", [])
            assert ports, f"{where}: a rule must name its ports"
            for port in ports:
                if isinstance(port, str):
                    assert port in workload.port_names(), f"{where}: no port named {port}"
            if not peers:  # from anywhere
                assert workload.component == "gateway", where
                assert ports == ["http"], where
                continue
            for peer in peers:
                assert "ipBlock" not in peer, where
                namespace = peer.get("namespaceSelector")
                if namespace is not None:
                    name = namespace["matchLabels"]["kubernetes.io/metadata.name"]
                    # Prometheus scraping metrics (KEDA asks Prometheus, not the pods).
                    assert (name, ports) == ("monitoring", ["metrics"]), where
                else:
                    sources = overlay.selected(peer["podSelector"])
                    assert sources, f"{where}: selects no pod"


def test_ingest_and_status_are_reached_only_by_the_gateway(overlay: Rendered) -> None:
    for component in ("ingest", "status", "worker"):
        workload = overlay.apps()[component]
        for policy, rule in policy_rules(overlay, workload, "ingress"):
            for peer in rule.get("from", []):
                if "podSelector" in peer and "namespaceSelector" not in peer:
                    components = {w.component for w in overlay.selected(peer["podSelector"])}
                    assert components == {"gateway"}, policy["metadata"]["name"]


def allowed_egress(overlay: Rendered, workload: Workload) -> list[tuple[Manifest, list[int | str]]]:
    """(peer, ports) for every egress destination the policies allow `workload`."""
    found: list[tuple[Manifest, list[int | str]]] = []
    for policy, rule in policy_rules(overlay, workload, "egress"):
        ports = [p["port"] for p in rule.get("ports", [])]
        assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule to anywhere"
        found += [(peer, ports) for peer in rule["to"]]
    return found


def within(
    inner: ipaddress.IPv4Network | ipaddress.IPv6Network,
    outer: ipaddress.IPv4Network | ipaddress.IPv6Network,
) -> bool:
    return (
        inner.version == outer.version
        and int(outer.network_address) <= int(inner.network_address)
        and int(inner.broadcast_address) <= int(outer.broadcast_address)
    )


def check_internet_block(peer: Manifest, ports: list[int | str]) -> None:
    block = ipaddress.ip_network(peer["ipBlock"]["cidr"])
    excepted = networks(peer["ipBlock"].get("except", []))
    if block.prefixlen == 0:
        private = PRIVATE_V4 if block.version == 4 else PRIVATE_V6
        for net in private:
            assert any(within(net, ex) for ex in excepted), f"{block} does not except {net}"
    else:
        # A managed database's address (prod): only its ports.
        assert set(ports) <= DATABASE_PORTS, f"{block}: {ports}"


def test_app_pods_reach_nothing_inside_the_cluster_but_their_backends(overlay: Rendered) -> None:
    for component, workload in overlay.apps().items():
        for peer, ports in allowed_egress(overlay, workload):
            if "ipBlock" in peer:
                check_internet_block(peer, ports)
            elif "namespaceSelector" in peer:
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "kube-system"
                }
                assert peer["podSelector"]["matchLabels"] == {"k8s-app": "kube-dns"}
                assert set(ports) == {53}
            else:
                for target in overlay.selected(peer["podSelector"]):
                    if target.is_app:
                        # Only the gateway calls other services.
                        assert component == "gateway", f"{component} -> {target.name}"
                        assert target.component in ("ingest", "status"), target.name
                    else:
                        assert target.name in BACKENDS, f"{component} -> {target.name}"


def test_workers_reach_the_internet_redis_postgres_storage_and_dns(dev: Rendered) -> None:
    worker = dev.apps()["worker"]
    reached: dict[str, set[int | str]] = {}
    internet: list[list[int | str]] = []
    for peer, ports in allowed_egress(dev, worker):
        if "ipBlock" in peer:
            internet.append(ports)
        elif "namespaceSelector" in peer:
            reached.setdefault("dns", set()).update(ports)
        else:
            for target in dev.selected(peer["podSelector"]):
                reached.setdefault(target.name, set()).update(ports)
    assert reached == {"dns": {53}, "redis": {6379}, "postgres": {5432}, "seaweedfs": {8333}}
    assert internet and all({80, 443} <= set(ports) for ports in internet)
    ingress_sources = [rule for _, rule in policy_rules(dev, worker, "ingress")]
    assert all([p["port"] for p in rule["ports"]] == ["metrics"] for rule in ingress_sources), (
        "nothing but Prometheus calls a worker"
    )


def test_prod_reaches_managed_backends_through_explicit_blocks(prod: Rendered) -> None:
    worker = prod.apps()["worker"]
    narrow = [
        (peer, ports)
        for peer, ports in allowed_egress(prod, worker)
        if "ipBlock" in peer and ipaddress.ip_network(peer["ipBlock"]["cidr"]).prefixlen > 0
    ]
    assert {5432} in [set(ports) for _, ports in narrow]
    assert any(set(ports) & {6379, 6380} for _, ports in narrow)


# --- backends and autoscaling ------------------------------------------------------------------


def test_dev_runs_redis_with_aof_postgres_and_seaweedfs(dev: Rendered) -> None:
    backends = {w.name: w for w in dev.workloads() if not w.is_app}
    assert sorted(backends) == sorted(BACKENDS)
    assert all(w.kind == "StatefulSet" for w in backends.values())
    assert all(w.obj["spec"].get("volumeClaimTemplates") for w in backends.values())
    (redis,) = backends["redis"].containers()
    args = redis["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    config = dev.config_data(config_map_name(dev))
    assert config["IMGPIPE_STORAGE_URL"].startswith("s3://")
    host, _, port = config["AWS_ENDPOINT_URL"].removeprefix("http://").partition(":")
    service = dev.named("Service", host)
    assert service is not None and service["spec"]["ports"][0]["port"] == int(port)
    secrets = secrets_of(dev)
    assert "@redis:6379/" in secrets["IMGPIPE_REDIS_URL"]
    assert "@postgres:5432/" in secrets["IMGPIPE_DATABASE_URL"]


def test_prod_runs_no_stateful_backend(prod: Rendered) -> None:
    assert prod.of_kind("StatefulSet") == []
    assert prod.of_kind("PersistentVolumeClaim") == []
    assert {w.component for w in prod.workloads()} == set(APP_COMPONENTS)
    services = {s["metadata"]["name"] for s in prod.of_kind("Service")}
    assert not services & set(BACKENDS)
    config = prod.config_data(config_map_name(prod))
    assert "AWS_ALLOW_HTTP" not in config and "AWS_ENDPOINT_URL" not in config


def test_prod_exposes_only_the_gateway(prod: Rendered) -> None:
    (ingress,) = prod.of_kind("Ingress")
    backends = [
        path["backend"]["service"]
        for rule in ingress["spec"]["rules"]
        for path in rule["http"]["paths"]
    ]
    assert {b["name"] for b in backends} == {"imgpipe-gateway"}
    service = prod.named("Service", "imgpipe-gateway")
    assert service is not None
    assert {b["port"]["name"] for b in backends} <= {p["name"] for p in service["spec"]["ports"]}
    for overlay_service in prod.of_kind("Service"):
        assert overlay_service["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_one_autoscaler_per_worker_deployment(overlay: Rendered) -> None:
    worker = overlay.apps()["worker"]
    assert "replicas" not in worker.obj["spec"], "the autoscaler owns the replica count"
    targets = [
        obj["spec"]["scaleTargetRef"]["name"]
        for obj in overlay.of_kind("HorizontalPodAutoscaler") + overlay.of_kind("ScaledObject")
    ]
    assert targets == [worker.name], "KEDA makes its own HPA: never both on one Deployment"


def test_dev_scales_workers_on_the_backlog_then_cpu(dev: Rendered) -> None:
    (hpa,) = dev.of_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] >= 1
    backlog, cpu = hpa["spec"]["metrics"]
    # The stream carries only the scheduler's window: the backlog is a Postgres count.
    assert backlog["type"] == "External"
    assert backlog["external"]["metric"]["name"] == BACKLOG_METRIC
    assert int(backlog["external"]["target"]["averageValue"]) > 0
    assert cpu["resource"]["name"] == "cpu"


def test_prod_scales_workers_on_the_backlog(prod: Rendered) -> None:
    (scaled,) = prod.of_kind("ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imgpipe-worker",
    }
    # Never zero: the reconciler that republishes lost tasks runs in the workers.
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    metadata = trigger["metadata"]
    # Every status replica reports the same backlog: summing would multiply it.
    assert metadata["query"].startswith(f"max({BACKLOG_METRIC}")
    assert int(metadata["threshold"]) > 0
    assert int(metadata["activationThreshold"]) >= 0
    assert metadata["serverAddress"].startswith(("http://", "https://"))
    assert "REPLACE" not in metadata["query"]


def test_the_window_covers_the_most_workers_the_autoscaler_starts(overlay: Rendered) -> None:
    """Fewer tasks released than the workers can hold in flight, or fewer waiting on the stream
    than they take between two passes of the feeder, would leave workers idle."""
    config = overlay.config_data(config_map_name(overlay))
    scalers = overlay.of_kind("ScaledObject") + overlay.of_kind("HorizontalPodAutoscaler")
    most = max(s["spec"].get("maxReplicaCount") or s["spec"]["maxReplicas"] for s in scalers)
    in_flight = most * int(config["IMGPIPE_WORKER_CONCURRENCY"])
    assert int(config["IMGPIPE_SCHEDULER_WINDOW"]) >= in_flight
    # And the lookahead what they take from the stream in two 0.1 s polls (~80 images/s each).
    assert int(config["IMGPIPE_SCHEDULER_LOOKAHEAD"]) >= most * 16


def postgres_connections_at_most(overlay: Rendered) -> int:
    """The Postgres connections the overlay's services can open at once: at the most replicas
    (the worker autoscaler's maximum), each pod its pool (IMGPIPE_DB_POOL_SIZE, read by the
    real settings reader from what the container starts with) and the health probe's own."""
    scalers = overlay.of_kind("ScaledObject") + overlay.of_kind("HorizontalPodAutoscaler")
    most_workers = max(
        s["spec"].get("maxReplicaCount") or s["spec"]["maxReplicas"] for s in scalers
    )
    secrets = secrets_of(overlay)
    total = 0
    for component in ("ingest", "status", "worker"):  # the gateway opens none
        workload = overlay.apps()[component]
        (container,) = workload.containers()
        env = EnvReader(overlay.effective_env(container, secrets=secrets))
        pool = CommonSettings.read(env, "127.0.0.1:50051").db_pool_size
        assert not env.problems, env.problems
        replicas = most_workers if component == "worker" else workload.obj["spec"]["replicas"]
        total += replicas * (pool + 1)
    return total


def test_dev_postgres_takes_every_connection_at_the_most_replicas(dev: Rendered) -> None:
    (postgres,) = [w for w in dev.workloads() if w.name == "postgres"]
    (container,) = postgres.containers()
    settings = dict(
        arg.split("=", 1) for arg in container.get("args", []) if arg.startswith("max_conn")
    )
    allowed = int(settings.get("max_connections", 100)) - 3  # superuser_reserved_connections
    assert postgres_connections_at_most(dev) <= allowed


def test_the_operations_guide_states_prod_s_connection_budget(prod: Rendered) -> None:
    """Prod's Postgres is managed: the guide tells its operator how many connections to allow."""
    budget = postgres_connections_at_most(prod)
    guide = (ROOT / "docs" / "operations.md").read_text()
    assert f"**{budget}** connections" in guide, budget


def test_the_backlog_metric_is_reported_by_the_status_service() -> None:
    table = (ROOT / "services" / "common" / "metrics.py").read_text()
    assert f"| {BACKLOG_METRIC} | gauge |" in table and "status |" in table
    source = (ROOT / "services" / "status" / "stream_metrics.py").read_text()
    assert f'"{BACKLOG_METRIC}"' in source


def test_pod_monitor_scrapes_every_service(prod: Rendered) -> None:
    (monitor,) = prod.of_kind("PodMonitor")
    scraped = prod.selected(monitor["spec"]["selector"])
    assert sorted(str(w.component) for w in scraped) == sorted(APP_COMPONENTS)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert all(endpoint["port"] in w.port_names() for w in scraped)


def test_prod_carries_the_alerts_and_the_dashboard(prod: Rendered) -> None:
    (rules,) = prod.of_kind("PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy" / "monitoring" / "prometheus-rules.yaml").read_text())
    assert rules["spec"] == source["spec"]
    dashboard = prod.named("ConfigMap", "imgpipe-grafana-dashboard")
    assert dashboard is not None
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    on_disk = (ROOT / "deploy" / "monitoring" / "grafana-dashboard.json").read_text()
    assert dashboard["data"]["imgpipe.json"] == on_disk

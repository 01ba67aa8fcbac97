"""Run inside the imgpipe image by `make image` (scripts/podman.py check_image), on stdin:

    python -      (the virtualenv's python)

The Dockerfile removes what only building and testing need from the virtualenv and strips
extension modules, and the final stage is another base than the builder's: this checks that
what is left still works there. Every extension module is imported and every library bundled
in a `*.libs` folder loaded; every module of imgpipe's own packages is imported; and one image
is compressed to each output format, with a min_ssim goal where lossy (Pillow's codecs, numpy's
SSIM). It runs limited to one core, and the worker's default thread count must say 1.
Prints one line of counts; exits 1 with the failures on stderr.
"""

from __future__ import annotations

import ctypes
import importlib
import io
import pkgutil
import sys
import sysconfig
from pathlib import Path

OWN_PACKAGES = ("services", "gateway", "imgpipe")
# Modules of the `local` extra (the embedded servers of `make run`), not in the image.
LOCAL_ONLY = ("services.local",)
# Extension modules for what a server has no use for: Pillow's Tk display needs tkinter, which
# Debian ships apart (python3-tk) and no image of imgpipe has had.
NOT_LOADED = ("PIL._imagingtk",)


def load_binaries(site: Path, failures: list[str]) -> int:
    loaded = 0
    for path in sorted(site.rglob("*.so*")):
        relative = path.relative_to(site)
        try:
            if relative.parts[0].endswith(".libs"):
                ctypes.CDLL(str(path))
            else:
                module = ".".join([*relative.parts[:-1], relative.name.split(".")[0]])
                if module in NOT_LOADED:
                    continue
                importlib.import_module(module)
        except (ImportError, OSError) as exc:
            failures.append(f"{relative}: {exc}")
        else:
            loaded += 1
    return loaded


def import_own(failures: list[str]) -> int:
    imported = 0
    for top in OWN_PACKAGES:
        package = importlib.import_module(top)
        for module in pkgutil.walk_packages(package.__path__, f"{top}."):
            if module.name.endswith(".__main__") or module.name.startswith(LOCAL_ONLY):
                continue
            try:
                importlib.import_module(module.name)
            except ImportError as exc:
                failures.append(f"{module.name}: {exc}")
            else:
                imported += 1
    return imported


def compress_each_format(failures: list[str]) -> int:
    from PIL import Image

    from services.common.image_options import ImageOptions, OutputFormat
    from services.worker.imaging import compress

    source = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((96, 64)).save(source, "PNG")
    done = 0
    for output in (OutputFormat.JPEG, OutputFormat.WEBP, OutputFormat.PNG, OutputFormat.AVIF):
        goal = 0.0 if output == OutputFormat.PNG else 0.9  # min_ssim: lossy formats only
        result = compress(source.getvalue(), ImageOptions(format=output, min_ssim=goal))
        # Every output here is measured: min_ssim asks for it, and PNG is lossless (1.0).
        if result.format != output or result.ssim is None or not 0.9 <= result.ssim <= 1.0:
            failures.append(f"compress to {output}: {result.format}, SSIM {result.ssim}")
        else:
            done += 1
    return done


def threads_follow_the_cpu_limit(failures: list[str]) -> None:
    """Run with `--cpus=1`: the worker's default thread count must be 1, not the host's cores."""
    from services.worker.cpus import usable_cpus

    if (cores := usable_cpus()) != 1:
        failures.append(f"under --cpus=1 the worker would run {cores} codec threads")


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    failures: list[str] = []
    loaded = load_binaries(site, failures)
    imported = import_own(failures)
    threads_follow_the_cpu_limit(failures)
    try:
        compressed = compress_each_format(failures)
    except Exception as exc:  # a broken library shows here first: report it with the rest
        compressed = 0
        failures.append(f"compress: {exc!r}")
    print(
        f"check_image: {loaded} binaries loaded, {imported} modules imported, "
        f"{compressed} formats compressed, {len(failures)} failures"
    )
    for failure in failures:
        print(failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Certificates made at test time with the openssl CLI: a CA and leaves it signs, for the gRPC
TLS and mTLS tests. EC P-256 keys, valid for a day; nothing is kept between runs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Leaf:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Authority:
    """A CA in `folder`; `issue` makes certificates it signs."""

    folder: Path
    name: str

    @property
    def cert(self) -> Path:
        return self.folder / f"{self.name}.pem"

    @property
    def key(self) -> Path:
        return self.folder / f"{self.name}.key"

    @classmethod
    def create(cls, folder: Path, name: str = "ca") -> Authority:
        ca = cls(folder, name)
        _openssl(
            "req", "-x509", *_NEW_KEY, "-keyout", ca.key, "-out", ca.cert,
            "-subj", f"/CN=imgpipe test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign",
        )  # fmt: skip
        return ca

    def issue(self, name: str, alt_names: str = "DNS:localhost,IP:127.0.0.1") -> Leaf:
        """A certificate for server and client use, for `alt_names`."""
        leaf = Leaf(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        _openssl(
            "req", "-x509", *_NEW_KEY, "-keyout", leaf.key, "-out", leaf.cert,
            "-CA", self.cert, "-CAkey", self.key, "-subj", f"/CN={name}",
            "-addext", f"subjectAltName={alt_names}",
            "-addext", "extendedKeyUsage=serverAuth,clientAuth",
        )  # fmt: skip
        return leaf


_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1")


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)

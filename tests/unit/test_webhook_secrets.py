"""Each owner's webhook secret: HKDF-SHA256 against RFC 5869's vectors, and what it derives."""

from __future__ import annotations

import base64
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from services.common.db.webhooks import SecretGeneration
from services.status.webhook_secrets import (
    WebhookSecrets,
    derive_secret,
    hkdf_sha256,
    master_key,
    signature_header,
)

pytestmark = pytest.mark.unit

MASTER = "whsec_" + base64.b64encode(b"imgpipe-webhook-test-key").decode()


@pytest.mark.parametrize(
    ("ikm", "salt", "info", "length", "okm"),
    [
        (  # RFC 5869 A.1
            "0b" * 22,
            "000102030405060708090a0b0c",
            "f0f1f2f3f4f5f6f7f8f9",
            42,
            "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865",
        ),
        (  # RFC 5869 A.2: longer inputs, three blocks
            bytes(range(0x00, 0x50)).hex(),
            bytes(range(0x60, 0xB0)).hex(),
            bytes(range(0xB0, 0x100)).hex(),
            82,
            "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
            "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
            "cc30c58179ec3e87c14c01d5c1f3434f1d87",
        ),
        (  # RFC 5869 A.3: no salt, no info
            "0b" * 22,
            "",
            "",
            42,
            "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d9d201395faa4b61a96c8",
        ),
    ],
    ids=["A.1", "A.2", "A.3"],
)
def test_hkdf_matches_the_rfc_5869_vectors(
    ikm: str, salt: str, info: str, length: int, okm: str
) -> None:
    got = hkdf_sha256(
        bytes.fromhex(ikm), salt=bytes.fromhex(salt), info=bytes.fromhex(info), length=length
    )
    assert got.hex() == okm


def test_each_owner_and_generation_has_its_own_valid_secret() -> None:
    key = master_key(MASTER)
    secrets = {derive_secret(key, o, g) for o in ("acme", "globex", "acme\0") for g in (1, 2)}
    assert len(secrets) == 6
    assert derive_secret(key, "acme", 1) == derive_secret(key, "acme", 1)  # replicas agree
    for secret in secrets:
        assert secret.startswith("whsec_")
        Webhook(secret)  # a secret every Standard Webhooks library takes
    assert derive_secret(master_key("whsec_" + base64.b64encode(b"x" * 24).decode()), "acme", 1)
    with pytest.raises(ValueError, match="8160"):
        hkdf_sha256(b"k", salt=b"", info=b"", length=8161)


def test_the_previous_secret_signs_only_in_its_grace_period() -> None:
    secrets = WebhookSecrets(MASTER, grace_seconds=60)
    until = datetime(2026, 1, 1, tzinfo=UTC)
    rotated = secrets.of(SecretGeneration("acme", 3, until, True, until))
    assert rotated.signing == (rotated.secret, rotated.previous)
    assert rotated.previous == derive_secret(master_key(MASTER), "acme", 2)
    over = secrets.of(SecretGeneration("acme", 3, until, False, until))
    assert over.signing == (over.secret,) and over.previous_until is None
    # No owner (authentication off): the master secret itself, as before owners existed.
    assert secrets.of(SecretGeneration("", 1, None, False, None)).signing == (MASTER,)

    header = signature_header(rotated.signing, "evt_1", until, '{"a":1}')
    first, second = header.split(" ")
    assert first.startswith("v1,") and second.startswith("v1,") and first != second

"""API keys: minting, hashing, the IMGPIPE_API_KEYS format and its problems, and the small
parsers of the gateway's sign-in (Bearer values, safe redirect targets)."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from gateway.config import GatewaySettings
from gateway.sign_in import safe_next
from imgpipe.cli import main as cli_main
from services.common.auth import (
    KEY_PREFIX,
    KeyRing,
    Limits,
    bearer_token,
    key_hash,
    new_key,
    parse_api_keys,
    parse_rate,
)
from services.common.config import ConfigError
from services.common.errors import RateLimited, Unauthenticated
from services.ingest.config import IngestSettings
from services.status.config import StatusSettings

pytestmark = pytest.mark.unit

BASE = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r:6379/0"}
# Fixed keys in new_key's format: they name parametrized tests, and pytest-xdist's workers
# must collect the same names.
KEY_A = "imgpipe_" + base64.urlsafe_b64encode(bytes(range(32))).decode().rstrip("=")
KEY_B = "imgpipe_" + base64.urlsafe_b64encode(bytes(range(32, 64))).decode().rstrip("=")
HASH_A, HASH_B = key_hash(KEY_A), key_hash(KEY_B)


def parsed(raw: str, defaults: Limits | None = None) -> KeyRing:
    keys, problems = parse_api_keys(raw, defaults or Limits())
    assert problems == []
    return keys


def problems_of(raw: str) -> list[str]:
    return parse_api_keys(raw, Limits())[1]


def test_a_new_key_is_prefixed_random_and_urlsafe() -> None:
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        # 32 bytes in unpadded urlsafe base64 are 43 characters.
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key.removeprefix(KEY_PREFIX))


def test_the_configured_hash_is_the_sha256_of_the_key_in_hex() -> None:
    assert key_hash(KEY_A) == hashlib.sha256(KEY_A.encode()).hexdigest()
    assert re.fullmatch(r"[0-9a-f]{64}", key_hash(KEY_A))


def test_empty_configuration_means_auth_off() -> None:
    for raw in ("", "  ", ",", "\n,\n"):
        keys = parsed(raw)
        assert not keys.enabled
        assert keys.authenticate(KEY_A) is None


def test_keys_authenticate_as_their_names_with_default_limits() -> None:
    defaults = Limits(rate=5, burst=7, concurrent=3, images_per_day=99)
    keys = parsed(f"acme:{HASH_A}, globex:{HASH_B.upper()}", defaults)
    assert keys.enabled
    assert keys.owners == ["acme", "globex"]
    a, b = keys.authenticate(KEY_A), keys.authenticate(KEY_B)
    assert a is not None and b is not None
    assert (a.name, a.limits) == ("acme", defaults)
    assert b.name == "globex"


@pytest.mark.parametrize("presented", ["", "imgpipe_wrong", KEY_A + "x", KEY_A[:-1], "x" * 10_000])
def test_other_keys_do_not_authenticate(presented: str) -> None:
    assert parsed(f"acme:{HASH_A}").authenticate(presented) is None


def test_a_hash_is_not_a_key() -> None:
    # Whoever reads the configuration must not be able to call with what it holds.
    assert parsed(f"acme:{HASH_A}").authenticate(HASH_A) is None


def test_per_key_limits_override_the_defaults() -> None:
    keys = parsed(
        f"acme:{HASH_A} rate=600/min burst=5 concurrent=2 images_per_day=1000\n"
        f"globex:{HASH_B} rate=0"
    )
    a, b = keys.authenticate(KEY_A), keys.authenticate(KEY_B)
    assert a is not None and b is not None
    assert a.limits == Limits(rate=10.0, burst=5, concurrent=2, images_per_day=1000)
    assert b.limits == Limits(rate=0.0)


def test_several_keys_of_one_name_are_one_owner() -> None:
    keys = parsed(f"acme:{HASH_A} concurrent=4, acme:{HASH_B} concurrent=4")
    a, b = keys.authenticate(KEY_A), keys.authenticate(KEY_B)
    assert a == b
    assert keys.owners == ["acme"]


@pytest.mark.parametrize(
    ("raw", "rate"),
    [("20", 20.0), ("20/s", 20.0), ("90/min", 1.5), ("7200/h", 2.0), ("0.5/s", 0.5), ("0", 0.0)],
)
def test_rates(raw: str, rate: float) -> None:
    assert parse_rate(raw) == rate


@pytest.mark.parametrize("raw", ["", "fast", "20/day", "-1/s", "1e3"])
def test_bad_rates(raw: str) -> None:
    with pytest.raises(ValueError, match="N/s"):
        parse_rate(raw)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("acme", "IMGPIPE_API_KEYS entry 1: expected NAME:SHA256HEX"),
        (f"acme {HASH_A}", "IMGPIPE_API_KEYS entry 1: expected NAME:SHA256HEX"),
        (f"a b:{HASH_A}", "IMGPIPE_API_KEYS entry 1: expected NAME:SHA256HEX"),
        (f"-acme:{HASH_A}", "IMGPIPE_API_KEYS entry 1: the name must be"),
        ("acme:abc123", "IMGPIPE_API_KEYS entry 1 (acme): the hash must be 64 hexadecimal"),
        (f"acme:{HASH_A}:x", "IMGPIPE_API_KEYS entry 1: expected NAME:SHA256HEX"),
        (f"acme:{HASH_A} speed=3", "entry 1 (acme): unknown option 'speed'"),
        (f"acme:{HASH_A} rate=fast", "entry 1 (acme): rate: expected N/s, N/min or N/h"),
        (f"acme:{HASH_A} burst=0", "entry 1 (acme): burst: expected a whole number, at least 1"),
        (f"acme:{HASH_A} concurrent=-1", "entry 1 (acme): concurrent: expected a whole number"),
        (f"acme:{HASH_A}, acme:{HASH_A}", "entry 2 (acme): the same hash as an earlier entry"),
        (f"acme:{HASH_A}, acme:{HASH_B} concurrent=1", "entry 2 (acme): other limits than"),
    ],
)
def test_malformed_entries_are_named_by_position(raw: str, expected: str) -> None:
    problems = problems_of(raw)
    assert len(problems) == 1, problems
    assert problems[0].startswith("IMGPIPE_API_KEYS entry "), problems[0]
    assert expected in problems[0], problems[0]


def test_every_bad_entry_is_reported_at_once() -> None:
    problems = problems_of(f"acme:{HASH_A}, bad, globex:nothex, ok:{HASH_B}")
    assert [p.split(":")[0] for p in problems] == [
        "IMGPIPE_API_KEYS entry 2",
        "IMGPIPE_API_KEYS entry 3 (globex)",
    ]


@pytest.mark.parametrize(
    "raw", [KEY_A, f"acme:{KEY_A}", f"acme:{HASH_A} {KEY_A}", f"acme:{HASH_A} rate={KEY_A}"]
)
def test_a_key_pasted_where_its_hash_belongs_is_refused_and_never_printed(raw: str) -> None:
    problems = problems_of(raw)
    assert problems
    assert all(KEY_A not in p and KEY_A[len(KEY_PREFIX) :] not in p for p in problems)


def test_services_refuse_to_start_with_a_bad_entry_and_never_print_it() -> None:
    env = {**BASE, "IMGPIPE_API_KEYS": f"acme:{HASH_A},{KEY_B}", "IMGPIPE_LIMIT_RATE": "lots"}
    for settings in (IngestSettings, StatusSettings, GatewaySettings):
        with pytest.raises(ConfigError) as caught:
            settings.from_env(env)
        text = str(caught.value)
        assert "IMGPIPE_API_KEYS entry 2: looks like a key" in text
        assert "IMGPIPE_LIMIT_RATE='lots'" in text
        assert KEY_B not in text


def test_settings_carry_the_keys_and_the_limit_defaults() -> None:
    env = {
        **BASE,
        "IMGPIPE_API_KEYS": f"acme:{HASH_A} concurrent=2",
        "IMGPIPE_LIMIT_RATE": "100/min",
        "IMGPIPE_LIMIT_BURST": "3",
        "IMGPIPE_LIMIT_IMAGES_PER_DAY": "500",
    }
    principal = IngestSettings.from_env(env).api_keys.authenticate(KEY_A)
    assert principal is not None
    assert principal.limits.rate == pytest.approx(100 / 60)
    assert principal.limits == Limits(
        rate=principal.limits.rate, burst=3, concurrent=2, images_per_day=500
    )
    assert not IngestSettings.from_env(BASE).api_keys.enabled
    assert GatewaySettings.from_env(env).api_keys.authenticate(KEY_A) == principal


@pytest.mark.parametrize(
    ("value", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer   abc  ", "abc"),
        ("BEARER abc", "abc"),
        ("Basic YWxhZGRpbg==", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_values(value: str | None, token: str | None) -> None:
    assert bearer_token(value) == token


@pytest.mark.parametrize(
    ("raw", "target"),
    [
        ("/", "/"),
        ("/ui/requests/abc?x=1#top", "/ui/requests/abc?x=1#top"),
        ("", "/"),
        ("https://evil.example/", "/"),
        ("//evil.example/", "/"),
        ("/\\evil.example", "/"),
        ("/a\\b", "/"),
        ("javascript:alert(1)", "/"),
        ("/a\r\nSet-Cookie: x=1", "/"),
        ("/" + "a" * 3000, "/"),
    ],
)
def test_sign_in_only_redirects_to_paths_of_this_site(raw: str, target: str) -> None:
    assert safe_next(raw) == target


def test_errors_carry_their_http_headers() -> None:
    assert Unauthenticated("x").http_headers() == {"WWW-Authenticate": 'Bearer realm="imgpipe"'}
    assert Unauthenticated("x", key_given=True).http_headers() == {
        "WWW-Authenticate": 'Bearer realm="imgpipe", error="invalid_token"'
    }
    assert RateLimited("x", retry_after=0).http_headers() == {"Retry-After": "1"}
    assert RateLimited("x", retry_after=42).http_headers() == {"Retry-After": "42"}


def test_keygen_prints_a_key_and_the_entry_that_accepts_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli_main(["keygen", "acme"], environ={}) == 0
    out = capsys.readouterr().out
    [key] = re.findall(rf"{KEY_PREFIX}[A-Za-z0-9_-]+", out)
    [entry] = re.findall(r"acme:[0-9a-f]{64}", out)
    principal = parsed(entry).authenticate(key)
    assert principal is not None and principal.name == "acme"


def test_keygen_refuses_a_bad_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["keygen", "no spaces"], environ={}) == 2
    assert "NAME must be" in capsys.readouterr().err

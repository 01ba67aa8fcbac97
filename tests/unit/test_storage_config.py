"""Storage settings: the URL modes, presign expiry, the AWS variables, and what is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import GatewaySettings
from services.common.config import ConfigError
from services.common.storage import S3Options, Storage, StorageConfig
from services.local.launcher import plan_stack
from services.worker.config import WorkerSettings

pytestmark = pytest.mark.unit

BASE = {"IMGPIPE_DATABASE_URL": "postgresql://db/x", "IMGPIPE_REDIS_URL": "redis://r:6379/0"}
S3 = {
    **BASE,
    "IMGPIPE_STORAGE_URL": "s3://bucket/prefix",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:8333",
    "AWS_REGION": "eu-west-1",
    "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
    "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
}


def storage(**env: str) -> StorageConfig:
    return WorkerSettings.from_env({**BASE, **env}).common.storage


def problems(**env: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        WorkerSettings.from_env({**BASE, **env})
    return caught.value.problems


def test_s3_without_a_base_url_presigns_with_the_aws_variables() -> None:
    config = WorkerSettings.from_env(S3).common.storage
    assert config == StorageConfig(
        url="s3://bucket/prefix",
        public_base_url="",
        presign_expiry=3600,
        s3=S3Options(
            endpoint="http://127.0.0.1:8333",
            region="eu-west-1",
            access_key_id="AKIAEXAMPLE",
            secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        ),
    )
    assert "EXAMPLEKEY" not in repr(config)  # settings get logged; secrets must not be
    # The gateway reads the same: it renders the output CSV itself when URLs are presigned.
    assert GatewaySettings.from_env(S3).storage == config
    assert Storage.from_config(config).presigned


def test_s3_with_a_base_url_uses_it_and_file_stores_default_to_the_gateway() -> None:
    cdn = {**S3, "IMGPIPE_PUBLIC_BASE_URL": "https://cdn.example/img/"}
    config = WorkerSettings.from_env(cdn).common.storage
    assert (config.public_base_url, config.presign_expiry) == ("https://cdn.example/img/", None)
    explicit = {**cdn, "IMGPIPE_PUBLIC_URL_MODE": "BASE"}
    assert WorkerSettings.from_env(explicit).common.storage == config

    local = storage()
    assert local.url.startswith("file://")
    assert (local.public_base_url, local.presign_expiry) == ("http://127.0.0.1:8080/files/", None)
    # AWS variables mean nothing to a file store, even malformed ones.
    assert storage(AWS_ENDPOINT_URL="ftp://x", AWS_ACCESS_KEY_ID="only").s3 == S3Options()


def test_the_endpoint_region_and_expiry_have_their_sources() -> None:
    env = {
        **S3,
        "IMGPIPE_S3_ENDPOINT": "https://minio.internal:9000",
        "AWS_REGION": "",
        "AWS_DEFAULT_REGION": "us-west-2",
        "IMGPIPE_PRESIGN_EXPIRY": "604800",
        "AWS_SESSION_TOKEN": "token",
    }
    config = WorkerSettings.from_env(env).common.storage
    assert config.s3.endpoint == "https://minio.internal:9000"  # ours wins over AWS_ENDPOINT_URL
    assert config.s3.region == "us-west-2"
    assert config.s3.session_token == "token"
    assert config.presign_expiry == 604800
    # No keys: obstore takes the environment's role (IRSA, ECS, EC2).
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    anonymous = {name: value for name, value in S3.items() if name not in keys}
    assert WorkerSettings.from_env(anonymous).common.storage.s3.access_key_id == ""


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"IMGPIPE_PUBLIC_URL_MODE": "presigned"}, "IMGPIPE_PUBLIC_URL_MODE"),
        ({"IMGPIPE_PUBLIC_URL_MODE": "cdn"}, "IMGPIPE_PUBLIC_URL_MODE"),
        ({"IMGPIPE_PUBLIC_BASE_URL": "cdn.example/img"}, "IMGPIPE_PUBLIC_BASE_URL"),
        ({**S3, "IMGPIPE_PUBLIC_URL_MODE": "base"}, "IMGPIPE_PUBLIC_BASE_URL"),
        (
            {**S3, "IMGPIPE_PUBLIC_URL_MODE": "presigned", "IMGPIPE_PUBLIC_BASE_URL": "https://c/"},
            "IMGPIPE_PUBLIC_BASE_URL",
        ),
        ({**S3, "IMGPIPE_PRESIGN_EXPIRY": "60"}, "IMGPIPE_PRESIGN_EXPIRY"),
        ({**S3, "IMGPIPE_PRESIGN_EXPIRY": "604801"}, "IMGPIPE_PRESIGN_EXPIRY"),
        ({**S3, "IMGPIPE_PRESIGN_EXPIRY": "1h"}, "IMGPIPE_PRESIGN_EXPIRY"),
        ({**S3, "AWS_SECRET_ACCESS_KEY": ""}, "AWS_ACCESS_KEY_ID"),
        ({**S3, "AWS_ENDPOINT_URL": "127.0.0.1:8333"}, "AWS_ENDPOINT_URL"),
        ({**S3, "IMGPIPE_S3_ENDPOINT": "ftp://x"}, "IMGPIPE_S3_ENDPOINT"),
    ],
)
def test_a_bad_storage_setting_is_refused_by_name(env: dict[str, str], named: str) -> None:
    found = problems(**env)
    assert len(found) == 1
    assert found[0].startswith(named)


def test_presigning_needs_an_s3_store(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="s3://"):
        Storage.from_config(StorageConfig(tmp_path.as_uri(), presign_expiry=60))


def test_make_run_leaves_the_base_url_unset_for_s3(tmp_path: Path) -> None:
    s3 = plan_stack({"IMGPIPE_STORAGE_URL": "s3://bucket"}, cwd=tmp_path, python="python3")
    assert s3.public_base_url == ""  # so S3 URLs are presigned, not the gateway's /files/
    local = plan_stack({}, cwd=tmp_path, python="python3")
    assert local.public_base_url == "http://127.0.0.1:8080/files/"

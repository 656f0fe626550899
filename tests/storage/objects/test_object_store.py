"""The object store port: the same assertions on file:// and on s3:// (moto's
server on loopback, tests/object_store_support.py), and its settings."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from storage.objects import (
    InvalidObjectKey,
    ObjectNotFound,
    ObjectStore,
    ObjectStoreError,
    SignedUrlNotSupported,
    open_object_store,
)
from storage.objects.files import FileObjectStore
from storage.objects.keys import validate_key
from storage.process.settings import ObjectStoreSettings, Settings
from tests.object_store_support import MotoS3, free_port

pytestmark = pytest.mark.anyio

MB = 1024 * 1024


def payload(size: int, seed: int = 0) -> bytes:
    """Bytes that differ along their length, so a swapped or truncated part shows."""
    block = bytes((i * 31 + seed) % 251 for i in range(4096))
    return (block * (size // len(block) + 1))[:size]


async def test_round_trips_empty_and_one_megabyte(object_store: ObjectStore) -> None:
    await object_store.put("a/empty.bin", b"")
    await object_store.put("a/one.bin", payload(MB), content_type="application/octet-stream")
    assert await object_store.get("a/empty.bin") == b""
    assert await object_store.get("a/one.bin") == payload(MB)
    assert await object_store.size("a/one.bin") == MB
    assert await object_store.get_range("a/one.bin", 1000, 5000) == payload(MB)[1000:5000]
    assert await object_store.exists("a/empty.bin")


async def test_an_overwrite_replaces_the_whole_object(object_store: ObjectStore) -> None:
    await object_store.put("k.bin", payload(MB, seed=1))
    await object_store.put("k.bin", b"short")
    assert await object_store.get("k.bin") == b"short"
    assert await object_store.list() == ["k.bin"]


async def test_a_missing_key_is_object_not_found(object_store: ObjectStore) -> None:
    with pytest.raises(ObjectNotFound) as raised:
        await object_store.get("no/such.bin")
    assert raised.value.key == "no/such.bin"
    await object_store.put("no/other.bin", b"x")
    with pytest.raises(ObjectNotFound):
        await object_store.get("no")  # a folder on file://, a key prefix on s3://
    with pytest.raises(ObjectNotFound):
        await object_store.size("no/such.bin")
    with pytest.raises(ObjectNotFound):
        await object_store.get_range("no/such.bin", 0, 10)
    assert not await object_store.exists("no/such.bin")


async def test_list_is_a_string_prefix_and_sorted(object_store: ObjectStore) -> None:
    keys = [
        "archive/c1/2024-01/messages.parquet",
        "archive/c1/2024-02/messages.parquet",
        "archive/c1/2024-02/recipients.parquet",
        "archive/c10/2024-01/messages.parquet",
        "archive/c2/2024-01/messages.parquet",
        "media/c1/x.jpg",
    ]
    await asyncio.gather(*(object_store.put(k, k.encode()) for k in reversed(keys)))
    assert await object_store.list() == keys
    assert await object_store.list("archive/c1/") == keys[:3]
    assert await object_store.list("archive/c1") == keys[:4]  # c1 and c10
    assert await object_store.list("archive/c1/2024-0") == keys[:3]
    assert await object_store.list("archive/c1/2024-02/re") == [keys[2]]
    assert await object_store.list("archive/c3/") == []
    assert await object_store.list("nothing") == []


async def test_delete_removes_and_is_idempotent(object_store: ObjectStore) -> None:
    await object_store.put("d/1.bin", b"1")
    await object_store.put("d/2.bin", b"2")
    await object_store.delete("d/1.bin")
    await object_store.delete("d/1.bin")
    assert not await object_store.exists("d/1.bin")
    with pytest.raises(ObjectNotFound):
        await object_store.get("d/1.bin")
    assert await object_store.list("d/") == ["d/2.bin"]


@pytest.mark.parametrize(
    "key",
    ["", "/etc/passwd", "../x", "a/../../x", "a/./b", "a//b", "a/", ".hidden", "a/b#1", "ä", "a b"],
)
async def test_an_invalid_key_is_refused_before_any_io(object_store: ObjectStore, key: str) -> None:
    with pytest.raises(InvalidObjectKey):
        await object_store.put(key, b"x")
    with pytest.raises(InvalidObjectKey):
        await object_store.get(key)
    with pytest.raises(InvalidObjectKey):
        await object_store.delete(key)
    assert await object_store.list() == []


def test_key_rules() -> None:
    assert validate_key("archive/0190c3e2-7a1b/2024-01/messages.v1.parquet") == (
        "archive/0190c3e2-7a1b/2024-01/messages.v1.parquet"
    )
    with pytest.raises(InvalidObjectKey, match="1024"):
        validate_key("a" * 1025)


async def test_a_twenty_megabyte_object(object_store: ObjectStore) -> None:
    data = payload(20 * MB, seed=7)
    await object_store.put("big/twenty.bin", data)
    assert await object_store.get("big/twenty.bin") == data
    tail = await object_store.get_range("big/twenty.bin", 20 * MB - 10, 20 * MB)
    assert tail == data[-10:]


async def test_the_file_store_writes_under_its_folder_and_leaves_no_staging_files(
    tmp_path: Path,
) -> None:
    root = tmp_path / "objects"
    store = open_object_store(Settings.from_env({"KOINONIA_OBJECT_STORE_URL": root.as_uri()}))
    assert isinstance(store, FileObjectStore)
    await store.put("x/y/z.bin", b"hello")
    assert (root / "x" / "y" / "z.bin").read_bytes() == b"hello"
    assert sorted(p.name for p in root.rglob("*")) == ["x", "y", "z.bin"]
    await store.delete("x/y/z.bin")
    assert list(root.iterdir()) == []  # empty folders go with their last object
    with pytest.raises(SignedUrlNotSupported):
        await store.signed_url("x/y/z.bin", 60)


async def test_a_reader_sees_the_old_object_or_the_new_never_a_part(
    object_store: ObjectStore,
) -> None:
    old, new = payload(8 * MB, seed=1), payload(8 * MB, seed=2)
    await object_store.put("swap.bin", old)
    writer = asyncio.create_task(object_store.put("swap.bin", new))
    seen = set()
    for _ in range(200):  # bounded: the put takes well under 200 reads
        data = await object_store.get("swap.bin")
        assert data in (old, new)
        seen.add(data == new)
        if writer.done():
            break
    await writer
    assert await object_store.get("swap.bin") == new
    assert False in seen  # some reads ran before the new object was in place


async def test_leftovers_of_a_killed_put_are_not_objects(tmp_path: Path) -> None:
    root = tmp_path / "objects"
    store = open_object_store(Settings.from_env({"KOINONIA_OBJECT_STORE_URL": root.as_uri()}))
    await store.put("x/a.bin", b"whole")
    (root / "x" / "a.bin#1").write_bytes(b"wh")  # obstore's staging file, mid-write
    (root / "x" / ".tmp-a").write_bytes(b"w")  # any stray file
    assert await store.list() == ["x/a.bin"]
    assert await store.get("x/a.bin") == b"whole"


async def test_a_signed_url_fetches_the_object_until_it_expires(moto_s3: MotoS3) -> None:
    bucket = moto_s3.new_bucket()
    store = open_object_store(Settings.from_env(moto_s3.env(f"s3://{bucket}/media")))
    await store.put("c1/photo.jpg", b"\xff\xd8jpeg", content_type="image/jpeg")
    before = time.time()
    url = await store.signed_url("c1/photo.jpg", 300)
    async with httpx.AsyncClient() as client:
        response = await client.get(url)
        assert response.status_code == 200
        assert response.content == b"\xff\xd8jpeg"
        assert response.headers["content-type"] == "image/jpeg"
        # The signature is what opens it: the same address without it is refused.
        unsigned = url.partition("?")[0]
        assert unsigned == f"{moto_s3.endpoint_url}/{bucket}/media/c1/photo.jpg"
        assert (await client.get(unsigned)).status_code == 403
    # moto's server does not enforce expiry; S3 does, from these two parameters.
    query = parse_qs(urlsplit(url).query)
    assert query["X-Amz-Expires"] == ["300"]
    signed_at = time.mktime(time.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ"))
    signed_at -= time.timezone  # X-Amz-Date is UTC
    assert before - 5 <= signed_at <= time.time() + 5
    for bad in (0, 7 * 24 * 3600 + 1):
        with pytest.raises(ValueError, match="expires_s"):
            await store.signed_url("c1/photo.jpg", bad)


async def test_a_store_that_is_down_fails_after_a_bounded_number_of_retries() -> None:
    env = MotoS3.env_for(f"http://127.0.0.1:{free_port()}", "s3://bucket")  # nobody there
    store = open_object_store(Settings.from_env(env | {"KOINONIA_OBJECT_STORE_TIMEOUT_S": "1"}))
    with pytest.raises(ObjectStoreError, match="after 3 retries"):  # obstore's default: 10
        await store.get("k")


async def test_a_missing_bucket_is_the_store_s_error_not_a_missing_object(
    moto_s3: MotoS3,
) -> None:
    store = open_object_store(Settings.from_env(moto_s3.env("s3://no-such-bucket-here")))
    with pytest.raises(ObjectStoreError) as raised:
        await store.put("k", b"x")
    assert not isinstance(raised.value, ObjectNotFound)


def test_the_default_is_objects_under_the_data_folder(tmp_path: Path) -> None:
    settings = Settings.from_env({"KOINONIA_DATA_DIR": str(tmp_path / "data")})
    assert settings.object_store.url == (tmp_path / "data" / "objects").as_uri()
    assert settings.object_store.scheme == "file"
    assert settings.object_store.path == str(tmp_path / "data" / "objects")


def test_settings_built_by_hand_open_the_default_folder(tmp_path: Path) -> None:
    store = open_object_store(Settings(data_dir=tmp_path / "data"))
    assert store.url == (tmp_path / "data" / "objects").as_uri()
    assert (tmp_path / "data" / "objects").is_dir()
    with pytest.raises(ValueError, match="KOINONIA_OBJECT_STORE_URL"):
        open_object_store(ObjectStoreSettings())


def test_a_relative_data_folder_becomes_absolute_at_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings.from_env({"KOINONIA_DATA_DIR": ".koinonia"})
    assert settings.object_store.path == os.path.join(tmp_path, ".koinonia", "objects")


def test_an_s3_url_and_the_aws_variables() -> None:
    settings = Settings.from_env(
        {
            "KOINONIA_OBJECT_STORE_URL": "s3://church-archive/prod/koinonia/",
            "AWS_ACCESS_KEY_ID": "AKIA1",
            "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_REGION": "eu-west-3",
            "AWS_ENDPOINT_URL": "https://minio.internal:9000/",
        }
    ).object_store
    assert settings.url == "s3://church-archive/prod/koinonia"
    assert (settings.scheme, settings.bucket, settings.prefix) == (
        "s3",
        "church-archive",
        "prod/koinonia",
    )
    assert (settings.aws_access_key_id, settings.aws_secret_access_key) == ("AKIA1", "secret")
    assert settings.aws_region == "eu-west-3"
    assert settings.aws_endpoint_url == "https://minio.internal:9000"
    assert settings.timeout_s == 30.0
    bare = Settings.from_env({"KOINONIA_OBJECT_STORE_URL": "s3://bucket"}).object_store
    assert (bare.bucket, bare.prefix) == ("bucket", "")


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("KOINONIA_OBJECT_STORE_URL", "/var/objects", "must be file:///absolute/path or s3://"),
        ("KOINONIA_OBJECT_STORE_URL", "gs://bucket", "must be file:///absolute/path or s3://"),
        ("KOINONIA_OBJECT_STORE_URL", "file://objects/x", "takes no host"),
        ("KOINONIA_OBJECT_STORE_URL", "file:///var/../etc", "absolute path without .."),
        ("KOINONIA_OBJECT_STORE_URL", "s3://Bad_Bucket/x", "not a valid S3 bucket name"),
        ("KOINONIA_OBJECT_STORE_URL", "s3://", "not a valid S3 bucket name"),
        ("KOINONIA_OBJECT_STORE_URL", "s3://key:secret@bucket", "not credentials"),
        ("KOINONIA_OBJECT_STORE_URL", "s3://bucket/../x", "prefix"),
        ("KOINONIA_OBJECT_STORE_URL", "s3://bucket/x?region=us", "no query"),
        ("AWS_ENDPOINT_URL", "minio:9000", "AWS_ENDPOINT_URL must be"),
    ],
)
def test_a_bad_setting_is_refused_at_start_up(variable: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=variable) as raised:
        Settings.from_env({variable: value})
    assert message in str(raised.value)

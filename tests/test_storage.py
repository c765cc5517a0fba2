"""Repository URLs, and object-storage repositories against a real S3 API server (moto).

The end-to-end tests with a real ``modelloop serve`` are in
``tests/e2e/test_object_storage_e2e.py``; these cover the parts on their own: parsing and
the CLI's one-line errors, the listing, the publisher's claim on a version number, and the
local copy the server loads from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelloop.cli import main
from modelloop.layout import MODEL_CARD_FILE, VERSION_CLAIM_FILE
from modelloop.serving.mirror import MirroredRepository
from modelloop.serving.repository import RepositoryUnavailable
from modelloop.storage import ModelListing, ObjectRepository, StorageError, parse_repository
from tests.s3server import S3Server

BUCKET = "repo"


@pytest.mark.parametrize(
    ("text", "scheme", "path", "root"),
    [
        ("models", "", Path("models"), ""),
        ("/srv/models/", "", Path("/srv/models"), ""),
        ("file:///srv/models", "", Path("/srv/models"), ""),
        ("file://localhost/srv/models", "", Path("/srv/models"), ""),
        ("s3://bucket", "s3", None, "bucket"),
        ("s3://bucket/prod/models/", "s3", None, "bucket/prod/models"),
        ("S3://bucket/prod", "s3", None, "bucket/prod"),
    ],
)
def test_repository_urls_parse_into_a_directory_or_a_bucket_prefix(
    text: str, scheme: str, path: Path | None, root: str
) -> None:
    location = parse_repository(text)
    assert (location.scheme, location.path, location.root) == (scheme, path, root)
    assert location.remote == bool(scheme)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ftp://host/models", "unsupported repository URL scheme 'ftp'"),
        ("gs://bucket/models", "unsupported repository URL scheme 'gs'"),
        ("s3:///prefix", "names no bucket"),
        ("file://host/models", "names host 'host'"),
    ],
)
def test_unsupported_or_malformed_urls_are_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(StorageError, match=message) as caught:
        parse_repository(text)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--repo", "ftp://x/models"],
        ["export", "RUN", "--repo", "ftp://x/models"],
        ["up", "--repo", "ftp://x/models"],
        ["retrain", "--repo", "ftp://x/models", "--name", "digits"],
    ],
)
def test_the_cli_refuses_an_unsupported_scheme_in_one_line(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unsupported repository URL scheme 'ftp'" in err and "s3://bucket/prefix" in err
    assert list(tmp_path.iterdir()) == []  # nothing created, no directory named "ftp:"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--repo", "s3://bucket/models"], "modelloop up needs a local repository directory"),
        (
            ["retrain", "--repo", "s3://bucket/models", "--name", "digits"],
            "modelloop retrain needs a local repository directory",
        ),
        (["export", "no-such-run", "--repo", "s3://bucket/models"], "no-such-run"),
    ],
)
def test_an_s3_url_never_becomes_a_local_directory(
    argv: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s3:").exists()
    assert list(tmp_path.iterdir()) == []


# -- against a real S3 API ---------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with S3Server.start(tmp_path_factory.mktemp("moto")) as server:
        server.client().create_bucket(Bucket=BUCKET)
        yield server


@pytest.fixture
def store(s3: S3Server, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> ObjectRepository:
    """A repository under a prefix of its own, reached through the standard variables."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return ObjectRepository(parse_repository(f"s3://{BUCKET}/{request.node.name[:40]}"))


def put(s3: S3Server, store: ObjectRepository, key: str, body: bytes = b"x") -> None:
    s3.client().put_object(Bucket=BUCKET, Key=f"{store.location.root.split('/', 1)[1]}/{key}", Body=body)


def card(version: int) -> bytes:
    entry = {"name": "x", "dtype": "float32", "shape": [-1, 2]}
    return json.dumps({"version": version, "inputs": [entry], "outputs": [entry]}).encode()


def test_the_listing_counts_a_version_only_once_its_model_json_is_there(
    s3: S3Server, store: ObjectRepository
) -> None:
    put(s3, store, "m/config.json", b"{}")
    put(s3, store, "m/1/model.onnx")
    put(s3, store, "m/1/model.json", card(1))
    put(s3, store, "m/2/model.onnx")  # half uploaded: no marker yet
    put(s3, store, "m/01/model.json", card(1))  # not a version name
    put(s3, store, ".staging/abc/model.onnx")  # hidden
    listing = store.listing()
    assert list(listing) == ["m"]
    assert listing["m"].config is not None
    assert sorted(listing["m"].versions) == [1, 2]
    assert list(listing["m"].committed()) == [1]
    assert sorted(listing["m"].committed()[1]) == ["model.json", "model.onnx"]


def test_publish_writes_the_files_then_model_json_and_cleans_its_staging_prefix(
    s3: S3Server, store: ObjectRepository, tmp_path: Path
) -> None:
    staged = tmp_path / "staged"
    (staged / "saved_model").mkdir(parents=True)
    (staged / "model.onnx").write_bytes(b"onnx")
    (staged / "saved_model" / "saved_model.pb").write_bytes(b"pb")
    seen: list[int] = []

    def finalize(path: Path, version: int) -> None:
        # When the number is known, every other file is already in the version's prefix.
        seen.append(version)
        assert sorted(store.listing()["m"].versions[version]) == ["model.onnx", "saved_model/saved_model.pb"]
        (path / MODEL_CARD_FILE).write_bytes(card(version))

    url, version = store.publish(staged, "m", finalize)
    assert (url, version, seen) == (f"s3://{store.location.root}/m/1", 1, [1])
    assert list(store.listing()["m"].committed()) == [1]
    keys = [o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]]
    root = store.location.root.split("/", 1)[1]
    assert not [k for k in keys if k.startswith(f"{root}/.staging/")]
    assert f"{root}/m/1/{VERSION_CLAIM_FILE}" in keys


def test_concurrent_publishers_never_share_a_version_number(
    s3: S3Server, store: ObjectRepository, tmp_path: Path
) -> None:
    # Another publisher claimed 1 and 2 after this one listed (its view is stale): the
    # create-only claim fails on each, and it takes 3.
    put(s3, store, f"m/1/{VERSION_CLAIM_FILE}")
    put(s3, store, f"m/2/{VERSION_CLAIM_FILE}")

    class Stale(ObjectRepository):
        def listing(self) -> dict[str, ModelListing]:
            return {}

    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.onnx").write_bytes(b"onnx")
    stale = Stale(store.location)
    _, version = stale.publish(staged, "m", lambda path, v: (path / MODEL_CARD_FILE).write_bytes(card(v)))
    assert version == 3
    # A claimed number that never got its model.json is never served, and never reused.
    assert list(store.listing()["m"].committed()) == [3]
    _, after = store.publish(staged, "m", lambda path, v: (path / MODEL_CARD_FILE).write_bytes(card(v)))
    assert after == 4


def test_the_local_copy_follows_the_store_and_stays_put_when_it_is_unreachable(
    s3: S3Server, store: ObjectRepository, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    mirror = MirroredRepository(store.location, cache)
    for v in (1, 2, 3):
        put(s3, store, f"m/{v}/model.onnx", f"v{v}".encode())
        put(s3, store, f"m/{v}/model.json", card(v))
    put(s3, store, "m/4/model.onnx")  # half uploaded
    put(s3, store, "gone/1/model.json", card(1))
    mirror.sync()
    # The default policy wants the latest committed version only; 4 is not committed.
    assert list(mirror.versions("m")) == [3]
    assert (cache / "m" / "3" / "model.onnx").read_bytes() == b"v3"
    assert mirror.model_names() == ["gone", "m"]
    assert not [p for p in (cache / "m").iterdir() if p.name.startswith(".")]  # no temporary left

    # A config change is fetched, and its policy followed; a model gone from the store leaves.
    put(s3, store, "m/config.json", json.dumps({"version_policy": {"all": {}}}).encode())
    root = store.location.root.split("/", 1)[1]
    s3.client().delete_object(Bucket=BUCKET, Key=f"{root}/gone/1/model.json")
    mirror.sync()
    assert list(mirror.versions("m")) == [1, 2, 3]
    assert mirror.read_config("m").version_policy.all is not None
    assert mirror.model_names() == ["m"]

    # A version deleted from the store leaves the copy (the registry then unloads it).
    s3.client().delete_object(Bucket=BUCKET, Key=f"{root}/m/1/model.json")
    s3.client().delete_object(Bucket=BUCKET, Key=f"{root}/m/1/model.onnx")
    mirror.sync()
    assert list(mirror.versions("m")) == [2, 3]

    # A version whose marker came before its files (a hand upload in the wrong order) is
    # copied again once the files are there.
    put(s3, store, "m/5/model.json", card(5))
    mirror.sync()
    assert sorted(p.name for p in (cache / "m" / "5").iterdir()) == ["model.json"]
    put(s3, store, "m/5/model.onnx", b"v5")
    mirror.sync()
    assert (cache / "m" / "5" / "model.onnx").read_bytes() == b"v5"
    assert list(mirror.versions("m")) == [2, 3, 5]
    assert not [p for p in (cache / "m").iterdir() if p.name.startswith(".")]

    # Unreachable: the copy keeps what it had, and the error says why.
    mirror.store = ObjectRepository(store.location)
    mirror.store._fs = None
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        with pytest.raises(
            RepositoryUnavailable, match=re.escape("cannot reach the object store at http://127.0.0.1:9")
        ):
            mirror.sync()
    assert list(mirror.versions("m")) == [2, 3, 5]
    assert mirror.model_names() == ["m"]


def test_publishing_with_wrong_credentials_fails_in_one_line_and_claims_nothing(
    s3: S3Server, store: ObjectRepository, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    staged = tmp_path / "staged"
    staged.mkdir()
    (staged / "model.onnx").write_bytes(b"onnx")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    denied = ObjectRepository(store.location)
    with pytest.raises(StorageError, match="access denied") as caught:
        denied.publish(staged, "m", lambda path, v: (path / MODEL_CARD_FILE).write_bytes(card(v)))
    assert "\n" not in str(caught.value) and "check the credentials" in str(caught.value)
    root = store.location.root.split("/", 1)[1]
    assert s3.client().list_objects_v2(Bucket=BUCKET, Prefix=f"{root}/")["KeyCount"] == 0

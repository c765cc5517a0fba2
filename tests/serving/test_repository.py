"""ModelRepository and the config.json it reads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from modelloop.serving.repository import ModelRepository, RepositoryError
from modelloop.serving.settings import BatchingSettings, ModelConfig, ServingSettings, VersionPolicy

from .fakes import write_fake_version


def test_scans_models_and_integer_versions(tmp_path: Path) -> None:
    for v in (1, 2, 10):
        write_fake_version(tmp_path, "m", v)
    for name in ("01", "0", "abc", "3.5", ".5", "-1"):
        (tmp_path / "m" / name).mkdir()
    (tmp_path / "m" / "7").write_text("a file, not a version")
    (tmp_path / "m" / ".publish.lock").write_text("")
    (tmp_path / ".staging" / "x").mkdir(parents=True)
    (tmp_path / "README").write_text("not a model")
    repo = ModelRepository(tmp_path)
    assert repo.model_names() == ["m"]
    assert list(repo.versions("m")) == [1, 2, 10]
    assert repo.versions("m")[10] == tmp_path / "m" / "10"
    assert repo.versions("absent") == {}


def test_missing_root_holds_no_models(tmp_path: Path) -> None:
    assert ModelRepository(tmp_path / "nope").model_names() == []


def test_reads_metadata(tmp_path: Path) -> None:
    path = write_fake_version(tmp_path, "m", 3, features=4)
    meta = ModelRepository.read_metadata(path, "m", 3, "onnxruntime_onnx")
    assert meta.name == "m" and meta.version == 3 and meta.platform == "onnxruntime_onnx"
    assert (
        meta.inputs[0].name == "x" and meta.inputs[0].dtype == np.float32 and meta.inputs[0].shape == (-1, 4)
    )
    assert [o.name for o in meta.outputs] == ["sum", "echo"]
    assert meta.task == "regression" and meta.extra == {}


def test_reads_real_digits_metadata(digits_repo: Path) -> None:
    repo = ModelRepository(digits_repo)
    path = repo.versions("digits")[1]
    meta = repo.read_metadata(path, "digits", 1, "onnxruntime_onnx")
    assert meta.inputs[0].name == "pixels" and meta.inputs[0].shape == (-1, 64)
    assert meta.outputs[0].name == "probabilities" and meta.outputs[0].shape == (-1, 10)
    assert meta.labels == tuple(str(i) for i in range(10))
    assert "parity" in meta.extra
    assert repo.runtime_kind(path, ModelConfig()) == "onnx"
    assert repo.runtime_kind(path, ModelConfig(runtime="savedmodel")) == "savedmodel"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "model.json is missing"),
        ("{", "not JSON"),
        ("[]", "must hold a JSON object"),
        ('{"inputs": []}', "'inputs' must be a non-empty list"),
        ('{"inputs": [{"name": "x"}], "outputs": []}', "inputs\\[0\\] needs 'name', a NumPy 'dtype'"),
        ('{"inputs": [{"name": "x", "dtype": "nope", "shape": [-1]}]}', "inputs\\[0\\]"),
        ('{"inputs": [{"name": "x", "dtype": "float32", "shape": [-1, 0]}]}', "use -1 for free dims"),
    ],
)
def test_bad_metadata_names_the_problem(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "m" / "1"
    path.mkdir(parents=True)
    if content is not None:
        (path / "model.json").write_text(content)
    with pytest.raises(RepositoryError, match=message):
        ModelRepository.read_metadata(path, "m", 1, "p")


def test_config_defaults_when_absent(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    config = ModelRepository(tmp_path).read_config("m")
    assert config == ModelConfig()
    assert config.version_policy.select([3, 1, 2]) == [3]


def test_config_is_parsed(tmp_path: Path) -> None:
    write_fake_version(tmp_path, "m", 1)
    (tmp_path / "m" / "config.json").write_text(
        json.dumps(
            {
                "version_policy": {"latest": {"num_versions": 2}},
                "version_labels": {"stable": 1},
                "batching": {"max_batch_size": 8, "enabled": False},
                "runtime": "savedmodel",
                "onnx_providers": ["CPUExecutionProvider"],
                "intra_op_num_threads": 2,
                "drift": {"psi_threshold": 0.2},
            }
        )
    )
    repo = ModelRepository(tmp_path)
    config = repo.read_config("m")
    assert config.batching == BatchingSettings(max_batch_size=8, enabled=False)
    assert config.version_labels == {"stable": 1}
    assert config.drift == {"psi_threshold": 0.2}
    write_fake_version(tmp_path, "m", 2)
    write_fake_version(tmp_path, "m", 3)
    assert repo.wanted_versions("m", config) == [2, 3]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "invalid model config"),
        ('{"version_polcy": {}}', "version_polcy: Extra inputs are not permitted"),
        ('{"version_policy": {"latest": {}, "all": {}}}', "exactly one of latest, all, specific"),
        ('{"version_policy": {"specific": {"versions": []}}}', "version_policy.specific.versions"),
        ('{"version_labels": {"bad-label": 1}}', "must match"),
        ('{"version_labels": {"ok": 0}}', "versions start at 1"),
        ('{"runtime": "torch"}', "runtime"),
        ('{"batching": {"max_batch_size": 0}}', "batching.max_batch_size"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path: Path, content: str, message: str) -> None:
    write_fake_version(tmp_path, "m", 1)
    (tmp_path / "m" / "config.json").write_text(content)
    with pytest.raises(RepositoryError, match=message) as info:
        ModelRepository(tmp_path).read_config("m")
    assert "config.json" in str(info.value)


def test_version_policies_select() -> None:
    on_disk = [1, 2, 3, 4]
    assert VersionPolicy().select(on_disk) == [4]
    assert VersionPolicy.model_validate({"latest": {"num_versions": 3}}).select(on_disk) == [2, 3, 4]
    assert VersionPolicy.model_validate({"all": {}}).select(on_disk) == on_disk
    assert VersionPolicy.model_validate({"specific": {"versions": [4, 2, 9]}}).select(on_disk) == [2, 4]
    assert VersionPolicy().select([]) == []


def test_fingerprint_changes_with_files(tmp_path: Path) -> None:
    import os

    path = write_fake_version(tmp_path, "m", 1)
    before = ModelRepository.fingerprint(path)
    later = os.stat(path / "model.json").st_mtime + 10
    os.utime(path / "model.json", (later, later))
    assert ModelRepository.fingerprint(path) != before
    assert ModelRepository.fingerprint(tmp_path / "gone") == ()


def test_serving_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MODELLOOP_REPO", str(tmp_path))
    monkeypatch.setenv("MODELLOOP_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("MODELLOOP_BATCHING__MAX_BATCH_SIZE", "64")
    settings = ServingSettings()
    assert settings.repo == tmp_path
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "s3cret"
    assert settings.batching.max_batch_size == 64 and settings.batching.batch_timeout_micros == 1000
    assert settings.grpc_max_message_bytes == 64 * 1024 * 1024
    assert "s3cret" not in repr(settings)


def test_serving_settings_reject_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        ServingSettings(repo=tmp_path, rest_port=70000)
    with pytest.raises(ValidationError):
        ServingSettings(repo=tmp_path, poll_interval_s=0)

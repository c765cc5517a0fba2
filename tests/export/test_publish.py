"""Atomic, concurrent-safe publication of version directories."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from modelloop.export.publish import PublishError, list_versions, publish_version, staging_dir


def _stage_and_publish(repo: Path, payload: str) -> Path:
    with staging_dir(repo) as staged:
        (staged / "payload.txt").write_text(payload)

        def finalize(path: Path, version: int) -> None:
            (path / "model.json").write_text(json.dumps({"version": version}))

        return publish_version(staged, repo, "m", finalize=finalize)


def test_list_versions_ignores_everything_but_integer_directories(tmp_path):
    for name in ("1", "3", "10", "007", "abc", ".staging", "2.5"):
        (tmp_path / name).mkdir()
    (tmp_path / "4").write_text("a file, not a version")
    assert list_versions(tmp_path) == [1, 3, 10]
    assert list_versions(tmp_path / "missing") == []


def test_concurrent_publishers_each_get_their_own_version(tmp_path):
    with ThreadPoolExecutor(max_workers=8) as pool:
        dirs = list(pool.map(lambda i: _stage_and_publish(tmp_path, f"payload-{i}"), range(16)))
    assert sorted(int(d.name) for d in dirs) == list(range(1, 17))
    payloads = {(d / "payload.txt").read_text() for d in dirs}
    assert len(payloads) == 16  # nobody clobbered anybody
    for d in dirs:
        assert json.loads((d / "model.json").read_text())["version"] == int(d.name)
    assert not any((tmp_path / ".staging").iterdir())


def test_a_failure_while_staging_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError), staging_dir(tmp_path) as staged:
        (staged / "half.bin").write_bytes(b"x" * 10)
        raise RuntimeError("export crashed")
    assert not any((tmp_path / ".staging").iterdir())
    assert list_versions(tmp_path / "m") == []


def test_failing_finalize_publishes_nothing(tmp_path):
    def finalize(path: Path, version: int) -> None:
        raise PublishError("metadata could not be written")

    with pytest.raises(PublishError), staging_dir(tmp_path) as staged:
        publish_version(staged, tmp_path, "m", finalize=finalize)
    assert list_versions(tmp_path / "m") == []

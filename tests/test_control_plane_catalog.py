"""The control plane's view of the repository: what it evaluates and what its rollout judge sees."""

from __future__ import annotations

import json
from pathlib import Path

from modelloop.monitor import RepositoryCatalog, RolloutCatalog
from modelloop.serving.repository import ModelRepository
from modelloop.serving.types import ModelState


def _repo(tmp_path: Path, versions: list[int], config: dict[str, object] | None = None) -> Path:
    for v in versions:
        (tmp_path / "digits" / str(v)).mkdir(parents=True)
    if config is not None:
        (tmp_path / "digits" / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_the_rollout_judge_sees_the_champion_a_server_keeps_beside_the_newest(tmp_path: Path) -> None:
    repo = ModelRepository(_repo(tmp_path, [1, 2, 3]))
    # The default version policy loads the newest version; a server in a rollout keeps the
    # one before it too, so the judge sees every version up to the newest.
    assert [s.version for s in RepositoryCatalog(repo).statuses("digits")] == [3]
    statuses = RolloutCatalog(repo).statuses("digits")
    assert [s.version for s in statuses] == [1, 2, 3]
    assert {s.state for s in statuses} == {ModelState.AVAILABLE}


def test_versions_above_the_version_policys_choice_are_not_candidates(tmp_path: Path) -> None:
    config = {"version_policy": {"specific": {"versions": [2]}}}
    repo = ModelRepository(_repo(tmp_path, [1, 2, 3], config))
    assert [s.version for s in RolloutCatalog(repo).statuses("digits")] == [1, 2]
    (tmp_path / "other" / "digits").mkdir(parents=True)
    empty = ModelRepository(tmp_path / "other")
    assert RolloutCatalog(empty).statuses("digits") == []

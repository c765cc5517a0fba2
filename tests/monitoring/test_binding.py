"""The store records the repository it describes; rollout state can be cleared; RETIRED says why."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from modelloop.control.rollout.controller import RolloutController
from modelloop.errors import ErrorCode, ServiceError
from modelloop.layout import REPOSITORY_ID_FILE, repository_id
from modelloop.monitoring.stores import open_stores
from modelloop.monitoring.stores.binding import RepositoryIdentity, RepositoryMismatch, repository_identity
from modelloop.monitoring.stores.rollouts import RolloutDoc
from modelloop.serving.rollout import RolloutCoordinator
from modelloop.serving.types import RolloutPolicy
from tests.monitoring.test_rollout import POLICY, Catalog

LATEST = lambda versions: [max(versions)] if versions else []  # noqa: E731 - the default policy


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    return str(request.getfixturevalue("postgres_url"))


def test_a_repository_gets_one_id_however_many_processes_ask(tmp_path: Path) -> None:
    found: list[str | None] = []
    threads = [threading.Thread(target=lambda: found.append(repository_id(tmp_path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(found)) == 1 and found[0] is not None and len(found[0]) == 32
    assert (tmp_path / REPOSITORY_ID_FILE).read_text().strip() == found[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [REPOSITORY_ID_FILE]  # no temporary left
    assert repository_identity(tmp_path).id == found[0]


def test_a_repository_that_cannot_be_written_is_named_by_its_path(tmp_path: Path) -> None:
    # A directory that cannot take the id file (here: not there at all; in a cluster: a
    # read-only volume) is named by its path.
    repo = tmp_path / "not-writable"
    assert repository_id(repo) is None
    assert repository_identity(repo) == RepositoryIdentity(f"path:{repo.resolve()}", str(repo.resolve()))
    assert repository_identity(tmp_path, "s3://bucket/models") == RepositoryIdentity(
        "url:s3://bucket/models", "s3://bucket/models"
    )


def test_without_create_nothing_is_written(tmp_path: Path) -> None:
    assert repository_id(tmp_path, create=False) is None
    assert not (tmp_path / REPOSITORY_ID_FILE).exists()


def test_the_store_adopts_one_repository_and_refuses_another(store_url: str) -> None:
    a = RepositoryIdentity("aaaa", "/srv/a")
    b = RepositoryIdentity("bbbb", "/tmp/b")
    store = open_stores(store_url)
    try:
        first = store.binding.bind_repository(a)
        assert first.adopted and not first.had_rollouts and first.recorded == a
        again = store.binding.bind_repository(a)
        assert not again.adopted and again.recorded == a
        with pytest.raises(RepositoryMismatch) as caught:
            store.binding.bind_repository(b)
        message = caught.value.message
        assert caught.value.code is ErrorCode.FAILED_PRECONDITION and "\n" not in message
        for part in ("/srv/a", "/tmp/b", "--state-dir", "--store"):
            assert part in message
    finally:
        store.close()


def test_a_path_identity_gives_way_to_the_id_of_the_same_repository(store_url: str) -> None:
    store = open_stores(store_url)
    try:
        store.binding.bind_repository(RepositoryIdentity("path:/models", "/models"))  # mounted read-only
        assert store.binding.bind_repository(RepositoryIdentity("cafe", "/models")).recorded.id == "cafe"
        # From then on the id is what counts: a server that still reads no id file agrees ...
        store.binding.bind_repository(RepositoryIdentity("path:/models", "/models"))
        # ... and another repository at the same path does not.
        with pytest.raises(RepositoryMismatch):
            store.binding.bind_repository(RepositoryIdentity("beef", "/models"))
    finally:
        store.close()


def _retired_state(now: float) -> dict[str, Any]:
    """A rollout another repository left: version 3 the champion, version 2 RETIRED."""
    return {
        "id": "digits-2-1000",
        "model": "digits",
        "champion": 3,
        "candidate": None,
        "mode": "canary",
        "steps": [10, 100],
        "step": 0,
        "state": "rolled_back",
        "retired": {"2": "error rate 0.400"},
        "history": [
            {"t": now, "event": "rolled_back", "step": 0, "share": 0, "reason": "version 2 RETIRED: x"}
        ],
    }


def test_a_pre_identity_store_adopts_and_shows_what_it_keeps_out(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    store = open_stores(store_url)
    try:
        assert store.rollouts.save_rollout(RolloutDoc("digits", 0, _retired_state(1_700_000_000.0)))
        catalog = Catalog()
        catalog.available = [1]
        controller = RolloutController(
            store,
            catalog,
            POLICY,
            CollectorRegistry(),
            lambda model, version: "multiclass",
            repository=RepositoryIdentity("new-repo", "/tmp/new"),
        )
        with caplog.at_level("WARNING"):
            controller.refresh()
        assert "held rollout state from before it recorded its repository" in caplog.text
        coordinator = RolloutCoordinator(RolloutPolicy(mode="canary"), controller)
        # The repository holds versions 1 and 2: the stored state keeps 2 out, and says so.
        with caplog.at_level("WARNING"):
            assert coordinator.plan("digits", {}, [1, 2], LATEST, [1]) == [1]
        why = coordinator.kept_out("digits")[2]
        assert why.startswith(
            "version 2 is kept out: RETIRED by rollout digits-2-1000 (rolled back at 2023-11-14"
        )
        assert "error rate 0.400" in why and "version 3, which this repository lacks" in why
        assert why.endswith("clear with `modelloop rollout clear digits`") and why in caplog.text
        # The operator clears it: version 2 loads, and nothing is kept out any more.
        cleared = controller.clear("digits")
        assert cleared["cleared"] and cleared["retired_released"] == [2]
        assert cleared["previous"]["id"] == "digits-2-1000"
        assert store.rollouts.rollouts() == {}
        assert coordinator.plan("digits", {}, [1, 2], LATEST, [1]) == [1, 2]
        assert coordinator.kept_out("digits") == {}
        with pytest.raises(ServiceError) as caught:
            controller.clear("digits")
        assert caught.value.code is ErrorCode.NOT_FOUND
    finally:
        store.close()


def test_a_rollback_records_when_and_by_which_rollout(tmp_path: Path) -> None:
    store = open_stores(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        catalog = Catalog()
        controller = RolloutController(
            store, catalog, POLICY, CollectorRegistry(), lambda model, version: "multiclass"
        )
        controller.tick(now=1_000.0)
        assert controller.assignment("digits") is not None
        controller.act("digits", "rollback", now=2_000.0)
        assignment = controller.assignment("digits")
        assert assignment is not None and assignment.retired == frozenset({2})
        state = store.rollouts.rollouts()["digits"].state
        assert state["retired_at"] == {"2": 2_000.0} and state["retired_by"] == {"2": state["id"]}
        assert assignment.retired_why[2] == (
            f"RETIRED by rollout {state['id']} (rolled back at 1970-01-01 00:33:20 UTC: "
            "rolled back by an operator)"
        )
        # Restored by an operator: no longer RETIRED, nor dated.
        controller.act("digits", "promote", now=3_000.0)
        state = store.rollouts.rollouts()["digits"].state
        assert state["retired"] == {} and state["retired_at"] == {} and state["retired_by"] == {}
    finally:
        store.close()


def test_a_controller_bound_elsewhere_reads_nothing(tmp_path: Path) -> None:
    store = open_stores(f"sqlite:///{tmp_path / 'state.db'}")
    try:
        store.binding.bind_repository(RepositoryIdentity("old", "/srv/old"))
        assert store.rollouts.save_rollout(RolloutDoc("digits", 0, _retired_state(1.0)))
        controller = RolloutController(
            store,
            Catalog(),
            POLICY,
            CollectorRegistry(),
            lambda model, version: "multiclass",
            repository=RepositoryIdentity("new", "/srv/new"),
        )
        with pytest.raises(RepositoryMismatch):
            controller.refresh()
        assert controller.assignment("digits") is None
    finally:
        store.close()

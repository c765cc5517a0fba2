"""Rollouts against a real server: canary walk, automatic rollbacks, restart, shadow, bad config.

One ``modelloop serve`` process (monitoring on, rollout passes every 0.2 s) serves a private
copy of the digits repository with a canary policy in ``config.json``. Versions are
published while it runs, as a retrain would publish them (built beside the repository,
renamed in). A client sends labelled digits with fresh request ids and posts their labels,
and counts every failed request. The tests are the steps of one story on one server, each
run once and in this order, whichever test asks first (``tests.tools.Story``), so that each
test passes alone and in any order:

1. version 2 (the same model) walks 10 -> 50 -> 100 % and becomes the champion;
2. versions 3, 4, 5 (classes permuted, raising on real inputs, slow) are each rolled back
   automatically at the first step, and no answer comes from them after it;
3. after a restart the rollout state and the RETIRED versions are still there, and the newest
   RETIRED version's status says why it is kept out;
4. shadow mode (version 6, classes permuted): every answer still comes from the champion,
   and the agreement rate and the median latency before and during the shadow are printed;
5. an invalid policy is refused with its reason while the routing goes on; the POST routes
   need the admin token, an unknown model is a 404.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from modelloop.serving.rollout import in_share
from tests.e2e.serverproc import ServerProcess, start_server, wait_for
from tests.rollout_variants import publish_variant
from tests.tools import Story

TOKEN = "rollout-admin-token"
POLICY = {
    "mode": "canary",
    "steps": [10, 50, 100],
    "step_min_requests": 30,
    "min_labels": 20,
    "max_error_rate": 0.02,
    "max_accuracy_drop": 0.2,
    "max_latency_ratio": 3.0,
}
AUTH = {"authorization": f"Bearer {TOKEN}"}


def write_policy(repo: Path, rollout: dict[str, Any]) -> None:
    (repo / "digits" / "config.json").write_text(json.dumps({"rollout": rollout}))


@pytest.fixture(scope="module")
def rollout_env(tmp_path_factory: pytest.TempPathFactory, digits_repo: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("rollout")
    repo = root / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    write_policy(repo, POLICY)
    env = {
        "MODELLOOP_ADMIN_TOKEN": TOKEN,
        "MODELLOOP_MONITORING_STATE_DIR": str(root / "state"),
        "MODELLOOP_MONITORING_ROLLOUT_INTERVAL_S": "0.2",
        "MODELLOOP_MONITORING_EVAL_INTERVAL_S": "1",
    }
    return {"repo": repo, "env": env}


@pytest.fixture(scope="module")
def holder() -> Iterator[dict[str, ServerProcess]]:
    procs: dict[str, ServerProcess] = {}
    try:
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture(scope="module")
def clients() -> Iterator[list[Client]]:
    made: list[Client] = []
    try:
        yield made
    finally:
        for client in made:
            client.http.close()


def server_of(holder: dict[str, ServerProcess], rollout_env: dict[str, Any]) -> ServerProcess:
    if "server" not in holder:
        holder["server"] = start_server(rollout_env["repo"], env=rollout_env["env"])
    return holder["server"]


@dataclass
class Client:
    """Labelled digits traffic: every request a fresh id, labels posted in batches."""

    url: str
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))
    failures: list[str] = field(default_factory=list)
    versions: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    unlabelled: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        data = load_digits()
        self.rows = data.data.astype(np.float32)
        self.targets = data.target.astype(int)
        self.index = itertools.cycle(range(len(self.rows)))

    def predict(self, n: int, *, label: bool = True) -> list[int]:
        answered = []
        for _ in range(n):
            i = next(self.index)
            rid = uuid.uuid4().hex
            start = time.perf_counter()
            r = self.http.post(
                f"{self.url}/v1/models/digits:predict",
                json={"instances": [self.rows[i].tolist()]},
                headers={"x-request-id": rid},
            )
            self.latencies.append(time.perf_counter() - start)
            if r.status_code != 200:
                self.failures.append(f"{r.status_code} {r.text[:200]}")
                continue
            version = int(r.headers["x-model-version"])
            self.versions[version] += 1
            answered.append(version)
            if label:
                self.unlabelled.append((rid, int(self.targets[i])))
        return answered

    def send_labels(self) -> None:
        # The prediction log is written off the request path: an id it does not hold yet
        # comes back "unknown" and is sent again with the next batch.
        if not self.unlabelled:
            return
        items = [{"request_id": rid, "target": t} for rid, t in self.unlabelled]
        r = self.http.post(f"{self.url}/v1/models/digits/feedback", json={"feedback": items})
        assert r.status_code in (200, 404, 409), r.text
        if r.status_code == 404:
            return  # none logged yet: all of them again next time
        unknown = set(r.json().get("unknown", [])) if r.status_code == 200 else set()
        self.unlabelled = [(rid, t) for rid, t in self.unlabelled if rid in unknown]

    def current(self) -> dict[str, Any]:
        """The rollout, or {} before there is one."""
        r = self.http.get(f"{self.url}/monitoring/rollouts/digits")
        return r.json() if r.status_code == 200 else {}

    def rollout(self) -> dict[str, Any]:
        r = self.http.get(f"{self.url}/monitoring/rollouts/digits")
        assert r.status_code == 200, r.text
        return r.json()

    def drive(self, until: str, *, candidate: int, timeout: float = 60) -> dict[str, Any]:
        """Sends labelled traffic until the rollout of ``candidate`` reaches state ``until``."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.predict(40)
            time.sleep(0.05)
            self.send_labels()
            r = self.http.get(f"{self.url}/monitoring/rollouts/digits")
            if r.status_code == 200:
                state = r.json()
                ours = state["candidate"] == candidate or (
                    until == "promoted" and state["champion"] == candidate
                )
                if state["state"] == until and ours:
                    return state
        raise AssertionError(f"rollout of version {candidate} never reached {until}: {state}")


def loaded_versions(client: Client) -> dict[int, str]:
    r = client.http.get(f"{client.url}/v1/models/digits")
    return {int(s["version"]): s["state"] for s in r.json()["model_version_status"]}


@dataclass
class Scene:
    """What the story's steps share: the repository and environment, the server, the clients."""

    env: dict[str, Any]
    holder: dict[str, ServerProcess]
    clients: list[Client]

    @property
    def repo(self) -> Path:
        return self.env["repo"]

    def client(self) -> Client:
        client = Client(server_of(self.holder, self.env).rest_url)
        self.clients.append(client)
        return client


def apply_policy(client: Client, repo: Path, rollout: dict[str, Any]) -> None:
    """Writes a valid policy and waits until the server has read it.

    A valid policy is invisible until it acts, so an invalid one goes first: once the rollout
    route names its error, the registry and the controller have read ``config.json``; once
    the error is gone again, they have read the valid policy.
    """
    write_policy(repo, {**rollout, "steps": [50, 10]})
    assert wait_for(lambda: "steps must increase" in client.rollout()["config_error"], timeout=30)
    write_policy(repo, rollout)
    assert wait_for(lambda: client.rollout()["config_error"] == "", timeout=30)


def good_candidate_walks_to_champion(scene: Scene) -> None:
    client = scene.client()
    client.predict(60)  # the champion has labels before the candidate comes
    client.send_labels()
    publish_variant(scene.repo, "same", 2)
    assert wait_for(lambda: loaded_versions(client).get(2) == "AVAILABLE", timeout=30)
    state = client.drive("promoted", candidate=2)
    assert client.failures == []
    assert state["champion"] == 2 and state["candidate"] is None
    shares = [e["share"] for e in state["history"] if e["event"] in ("started", "step")]
    assert shares == [10, 50, 100], state["history"]
    assert state["history"][-1]["event"] == "promoted"
    assert client.versions[1] > 0 and client.versions[2] > 0
    # The old champion unloads after its in-flight requests; every answer is version 2's.
    assert wait_for(lambda: loaded_versions(client).get(1) in (None, "END"), timeout=20)
    assert set(client.predict(30)) == {2}
    metrics = client.http.get(f"{client.url}/metrics").text
    assert 'modelloop_rollout_events_total{event="promoted",model="digits"} 1.0' in metrics
    assert 'modelloop_rollout_state{model="digits",state="promoted",version="2"} 1.0' in metrics
    total = sum(client.versions.values())
    print(f"\ngood candidate: {total} requests, 0 failed, shares {shares} -> promoted")


def bad_candidate_rolled_back(kind: str, version: int, guardrail: str) -> Callable[[Scene], None]:
    def step(scene: Scene) -> None:
        client = scene.client()
        publish_variant(scene.repo, kind, version)
        assert wait_for(lambda: loaded_versions(client).get(version) == "AVAILABLE", timeout=30)
        state = client.drive("rolled_back", candidate=version)
        assert client.failures == [], client.failures[:3]
        assert guardrail in state["reason"], state["reason"]
        assert str(version) in state["retired"]
        assert state["champion"] == 2
        # Within one step: it never got past 10 %.
        assert [e["event"] for e in state["history"]] == ["started", "rolled_back"], state["history"]
        print(f"\n{kind}: rolled back at 10 %: {state['reason']}")
        assert wait_for(lambda: loaded_versions(client).get(version) in (None, "END"), timeout=20)
        assert set(client.predict(50)) == {2}
        assert client.failures == []

    step.__name__ = f"{kind}_candidate_rolled_back"
    return step


BAD = {
    kind: bad_candidate_rolled_back(kind, version, guardrail)
    for kind, version, guardrail in [
        ("permuted", 3, "accuracy"),
        ("raises", 4, "error rate"),
        ("slow", 5, "latency"),
    ]
}


def retired_survives_restart(scene: Scene) -> None:
    server = server_of(scene.holder, scene.env)
    assert server.stop() == 0
    scene.holder["server"] = start_server(scene.repo, env=scene.env["env"])
    client = scene.client()
    state = client.rollout()
    assert state["state"] == "rolled_back"
    assert set(state["retired"]) == {"3", "4", "5"}
    # Only version 2 is loaded; version 5, the newest, is kept out and its status says why.
    assert loaded_versions(client) == {2: "AVAILABLE", 5: "END"}
    status = client.http.get(f"{client.url}/v1/models/digits/versions/5").json()["model_version_status"][0]
    assert status["status"]["error_message"].startswith("version 5 is kept out: RETIRED by rollout digits-5-")
    assert status["status"]["error_message"].endswith("clear with `modelloop rollout clear digits`")
    assert set(client.predict(40)) == {2}
    assert client.failures == []


def shadow_never_changes_answers(scene: Scene) -> None:
    client = scene.client()
    client.predict(300, label=False)  # warm
    baseline = statistics.median(client.latencies[-200:])
    apply_policy(client, scene.repo, {**POLICY, "mode": "shadow"})
    publish_variant(scene.repo, "permuted", 6)
    assert wait_for(lambda: client.current().get("candidate") == 6, timeout=30)
    rows = client.rows[:200]
    pinned = []
    for start in range(0, len(rows), 25):  # within max_batch_size
        r = client.http.post(
            f"{client.url}/v1/models/digits/versions/2:predict",
            json={"instances": rows[start : start + 25].tolist()},
        )
        pinned.extend(r.json()["predictions"])
    client.latencies.clear()
    for i in range(len(rows)):
        start = time.perf_counter()
        r = client.http.post(f"{client.url}/v1/models/digits:predict", json={"instances": [rows[i].tolist()]})
        client.latencies.append(time.perf_counter() - start)
        assert r.status_code == 200 and r.headers["x-model-version"] == "2"
        assert np.argmax(r.json()["predictions"][0]) == np.argmax(pinned[i])
    shadowed = statistics.median(client.latencies)
    assert wait_for(
        lambda: client.rollout()["guardrails"].get("6", {}).get("shadow_rows", 0) >= 100, timeout=30
    )
    state = client.rollout()
    agreement = state["guardrails"]["6"]["agreement"]
    assert state["state"] == "shadow" and state["share"] == 0, state["reason"]
    assert agreement is not None and agreement < 0.2  # its classes are shifted: it nearly never agrees
    # Printed, not asserted: on a shared host the medians move with the neighbours' load.
    print(f"\nshadow: agreement {agreement:.3f}; median {baseline * 1e3:.2f} -> {shadowed * 1e3:.2f} ms")


def bad_config_and_operator_routes(scene: Scene) -> None:
    client = scene.client()
    write_policy(scene.repo, {**POLICY, "mode": "shadow", "steps": [50, 10]})
    assert wait_for(lambda: "steps must increase" in client.rollout()["config_error"], timeout=10)
    assert client.rollout()["state"] == "shadow"  # the current routing goes on
    assert set(client.predict(20, label=False)) == {2}
    base = f"{client.url}/monitoring/rollouts"
    assert client.http.post(f"{base}/digits/pause").status_code == 401
    assert client.http.get(f"{base}/nope").status_code == 404
    r = client.http.post(f"{base}/digits/pause", headers=AUTH)
    assert r.status_code == 200 and r.json()["paused"] is True
    r = client.http.post(f"{base}/digits/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["state"] == "rolled_back" and "6" in r.json()["retired"]
    r = client.http.post(f"{base}/digits/rollback", headers=AUTH)
    assert r.status_code == 400 and "rolled_back" in r.json()["error"]
    assert client.failures == []
    # The same through the CLI: status prints the state; an action without the token fails in one line.
    cli = [sys.executable, "-m", "modelloop", "rollout"]
    env = {k: v for k, v in os.environ.items() if k != "MODELLOOP_ADMIN_TOKEN"}
    status = subprocess.run(
        [*cli, "status", "digits", "--url", client.url], capture_output=True, text=True, timeout=60, env=env
    )
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith("digits: champion 2, candidate 6; rolled_back")
    assert json.loads(status.stdout.split("\n", 1)[1])["retired"]["6"]
    refused = subprocess.run(
        [*cli, "pause", "digits", "--url", client.url], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 1
    assert (
        refused.stderr.startswith("modelloop: error: pause digits: HTTP 401")
        and refused.stderr.count("\n") == 1
    )


STORY = [
    good_candidate_walks_to_champion,
    *BAD.values(),
    retired_survives_restart,
    shadow_never_changes_answers,
    bad_config_and_operator_routes,
]


@pytest.fixture(scope="module")
def story(
    holder: dict[str, ServerProcess], rollout_env: dict[str, Any], clients: list[Client]
) -> Story[Scene]:
    return Story(Scene(rollout_env, holder, clients), STORY)


def test_good_candidate_walks_to_champion(story: Story[Scene]) -> None:
    story.through(good_candidate_walks_to_champion)


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_candidate_rolled_back(story: Story[Scene], kind: str) -> None:
    story.through(BAD[kind])


def test_retired_survives_restart(story: Story[Scene]) -> None:
    story.through(retired_survives_restart)


def test_shadow_never_changes_answers(story: Story[Scene]) -> None:
    story.through(shadow_never_changes_answers)


def test_bad_config_and_operator_routes(story: Story[Scene]) -> None:
    story.through(bad_config_and_operator_routes)


def test_two_workers_agree_on_the_rollout(
    tmp_path: Path, digits_repo: Path, rollout_env: dict[str, Any], clients: list[Client]
) -> None:
    """``serve --workers 2``: one state in the store, one split, whichever worker answers."""
    repo = tmp_path / "repo"
    shutil.copytree(digits_repo, repo, ignore=shutil.ignore_patterns(".staging", ".publish.lock"))
    write_policy(repo, POLICY)
    env = {**rollout_env["env"], "MODELLOOP_MONITORING_STATE_DIR": str(tmp_path / "state")}
    server = start_server(repo, "--workers", "2", "--state-dir", str(tmp_path / "state"), env=env)
    try:
        client = Client(server.rest_url)
        clients.append(client)
        client.predict(60)
        client.send_labels()
        publish_variant(repo, "same", 2)
        assert wait_for(lambda: client.current().get("candidate") == 2, timeout=30)
        r = client.http.post(f"{client.url}/monitoring/rollouts/digits/pause", headers=AUTH)
        assert r.status_code == 200
        share = r.json()["share"]
        # Each request on a new connection, so the kernel spreads them over both workers:
        # the same id gets the same version every time, the one the paused share gives it.
        ids = [f"same-id-{i}" for i in range(40)]
        expected = {rid: "2" if in_share("digits", rid, share) else "1" for rid in ids}
        row = client.rows[0].tolist()

        def answers() -> dict[str, str]:
            got = {}
            for rid in ids:
                with httpx.Client(timeout=30) as fresh:
                    answer = fresh.post(
                        f"{client.url}/v1/models/digits:predict",
                        json={"instances": [row]},
                        headers={"x-request-id": rid},
                    )
                assert answer.status_code == 200
                got[rid] = answer.headers["x-model-version"]
            return got

        # Both workers have read the paused state once a whole round answers as it says.
        assert wait_for(lambda: answers() == expected, timeout=30, interval=0.2)
        seen: dict[str, set[str]] = {i: set() for i in ids}
        for _ in range(3):
            for rid, version in answers().items():
                seen[rid].add(version)
        assert seen == {rid: {version} for rid, version in expected.items()}, seen
        assert set(expected.values()) == {"1", "2"}
        # Resumed, the walk ends with the candidate as the champion, and no request failed.
        r = client.http.post(f"{client.url}/monitoring/rollouts/digits/promote", headers=AUTH)
        assert r.status_code == 200 and r.json()["share"] == 50
        state = client.drive("promoted", candidate=2)
        assert state["champion"] == 2 and client.failures == []
    finally:
        server.stop()

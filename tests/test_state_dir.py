"""Where the state of a repository lives by default, and the commands that find it there."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelloop.arguments import build_parser
from modelloop.cli import _serving_settings, _simulate_state_dir, _simulate_token
from modelloop.control.rollout.cli import summary
from modelloop.monitoring.settings import FEEDBACK_TOKEN_FILE, ensure_feedback_token_file
from modelloop.monitoring.stores import open_stores
from modelloop.monitoring.stores.binding import RepositoryIdentity
from modelloop.storage import default_state_dir, parse_repository
from tests.test_cli import assert_one_line_error, run_cli


def test_the_default_is_the_platform_state_directory_one_folder_per_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    monkeypatch.chdir(tmp_path)
    here = default_state_dir(parse_repository("models"))
    assert here.parent == tmp_path / "state-home" / "modelloop" and here.name.startswith("models-")
    # The same repository from another directory: the same state.
    monkeypatch.chdir("/")
    assert default_state_dir(parse_repository(str(tmp_path / "models"))) == here
    assert default_state_dir(parse_repository(f"file://{tmp_path}/models")) == here
    # Another repository: its own.
    assert default_state_dir(parse_repository(str(tmp_path / "other" / "models"))) != here
    remote = default_state_dir(parse_repository("s3://bucket/prod/models/"))
    assert remote.name.startswith("models-") and remote != here
    # Without XDG_STATE_HOME (or with a relative one): ~/.local/state.
    monkeypatch.setenv("XDG_STATE_HOME", "relative")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_state_dir(parse_repository("/srv/models")).parent == (
        tmp_path / "home" / ".local" / "state" / "modelloop"
    )


def test_serve_and_up_use_it_unless_told_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    monkeypatch.delenv("MODELLOOP_MONITORING_STATE_DIR", raising=False)
    parser = build_parser()
    repo = str(tmp_path / "models")
    for command in ("serve", "up"):
        _, monitoring, _ = _serving_settings(parser.parse_args([command, "--repo", repo]))
        assert monitoring.state_dir == default_state_dir(parse_repository(repo))
        assert monitoring.resolved_store_url().startswith(f"sqlite:///{tmp_path / 'state-home'}")
    _, monitoring, _ = _serving_settings(parser.parse_args(["serve", "--repo", repo, "--state-dir", "st"]))
    assert monitoring.state_dir == Path("st")
    monkeypatch.setenv("MODELLOOP_MONITORING_STATE_DIR", str(tmp_path / "from-env"))
    _, monitoring, _ = _serving_settings(parser.parse_args(["serve", "--repo", repo]))
    assert monitoring.state_dir == tmp_path / "from-env"


def test_simulate_finds_the_token_up_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state-home"))
    monkeypatch.delenv("MODELLOOP_MONITORING_STATE_DIR", raising=False)
    monkeypatch.delenv("MODELLOOP_FEEDBACK_TOKEN", raising=False)
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    args = parser.parse_args(["simulate", "--url", "http://x"])
    assert _simulate_token(None, _simulate_state_dir(args)) is None  # `up` never ran
    # `up` with its default repository (./models) wrote its token into that repository's state.
    token_file = ensure_feedback_token_file(default_state_dir(parse_repository("models")))
    assert _simulate_token(None, _simulate_state_dir(args)) == token_file.read_text().strip()
    # Another repository, or an explicit state directory.
    other = parser.parse_args(["simulate", "--url", "http://x", "--repo", str(tmp_path / "elsewhere")])
    assert _simulate_token(None, _simulate_state_dir(other)) is None
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / FEEDBACK_TOKEN_FILE).write_text("explicit-token\n")
    explicit = parser.parse_args(["simulate", "--url", "http://x", "--state-dir", str(tmp_path / "st")])
    assert _simulate_token(None, _simulate_state_dir(explicit)) == "explicit-token"


def test_the_clear_summary_says_what_was_released() -> None:
    line = summary(
        {
            "model": "digits",
            "cleared": True,
            "retired_released": [2, 4],
            "previous": {"id": "digits-4-1", "state": "rolled_back"},
        }
    )
    assert line == (
        "digits: rollout state cleared (rollout digits-4-1, rolled_back); RETIRED versions released: "
        "2, 4; the server loads what the version policy wants"
    )
    args = build_parser().parse_args(["rollout", "clear", "digits", "--url", "http://x"])
    assert (args.action, args.name) == ("clear", "digits")


def test_retrain_refuses_a_store_that_describes_another_repository(tmp_path: Path, digits_repo: Path) -> None:
    repo = tmp_path / "models"
    shutil.copytree(digits_repo / "digits" / "1", repo / "digits" / "1")
    store = open_stores(f"sqlite:///{tmp_path / 'state' / 'modelloop.db'}")
    try:
        store.binding.bind_repository(RepositoryIdentity("another", "/srv/another"))
    finally:
        store.close()
    state = str(tmp_path / "state")
    proc = run_cli("retrain", "--repo", str(repo), "--name", "digits", "--state-dir", state, timeout=120)
    assert_one_line_error(proc, "describes the repository /srv/another")
    assert str(repo.resolve()) in proc.stderr.strip().splitlines()[-1]

"""Labeler and admin tokens: parsing, files, constant-time matching, and the start-up errors they cause."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from modelloop.cli import main
from modelloop.monitoring.settings import (
    FEEDBACK_TOKEN_FILE,
    LabelerSettings,
    MonitoringSettings,
    ensure_feedback_token_file,
)
from modelloop.serving.settings import ServingSettings
from modelloop.tokens import TokenMatcher, bearer_token, merge_token_maps, parse_token_map, read_token_file

SECRET = "s3cret-token-value"
ENV = (
    "MODELLOOP_FEEDBACK_TOKEN",
    "MODELLOOP_FEEDBACK_TOKEN_FILE",
    "MODELLOOP_FEEDBACK_TOKENS",
    "MODELLOOP_FEEDBACK_TOKENS_FILE",
    "MODELLOOP_ADMIN_TOKEN",
    "MODELLOOP_ADMIN_TOKEN_FILE",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_a_token_map_names_sources_and_refuses_what_cannot_be_a_token():
    assert parse_token_map('{"team-a": "t1", "qa.2": "t2"}', "X") == {"team-a": "t1", "qa.2": "t2"}
    for text, problem in [
        ("not json", "not JSON"),
        ('["t1"]', "expected a JSON object"),
        ("{}", "names no source"),
        ('{"a": 1}', "must be a string, got int"),
        ('{"a": ""}', "the token is empty"),
        ('{"a": "has space"}', "visible ASCII without spaces"),
        ('{"": "t"}', "source name ''"),
        ('{"anonymous": "t"}', "reserved"),
        ('{"a/b": "t"}', "source name 'a/b'"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_token_map(text, "MODELLOOP_FEEDBACK_TOKENS")


def test_merged_maps_refuse_a_source_twice_or_a_shared_token():
    assert merge_token_maps({"a": "t1"}, {"default": "t2"}) == {"a": "t1", "default": "t2"}
    with pytest.raises(ValueError, match="'default' is configured twice"):
        merge_token_maps({"default": "t1"}, {"default": "t2"})
    with pytest.raises(ValueError, match="'a' and 'b' share a token") as info:
        merge_token_maps({"a": "same", "b": "same"})
    assert "same" not in str(info.value).replace("share", "")


def test_the_matcher_names_the_source_of_a_token_and_nothing_else():
    matcher = TokenMatcher({"a": "token-a", "b": "token-b"})
    assert matcher.match("token-b") == "b" and matcher.match("token-a") == "a"
    for guess in ("token-", "token-bb", "TOKEN-A", ""):
        assert matcher.match(guess) is None
    assert matcher and not TokenMatcher({}) and matcher.sources == ["a", "b"]
    assert bearer_token("Bearer abc") == "abc" and bearer_token("bearer  abc ") == "abc"
    for header in (None, "", "Basic abc", "Bearer", "Bearer "):
        assert bearer_token(header) is None


def test_token_files_are_read_stripped_and_checked(tmp_path: Path):
    path = tmp_path / "token"
    path.write_text(f"{SECRET}\n")
    assert read_token_file(path, "X") == SECRET
    path.write_text(" \n")
    with pytest.raises(ValueError, match="is empty"):
        read_token_file(path, "X")
    with pytest.raises(ValueError, match="cannot read"):
        read_token_file(tmp_path / "missing", "X")


def test_labeler_settings_combine_a_default_token_and_named_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    assert not LabelerSettings().configured
    monkeypatch.setenv("MODELLOOP_FEEDBACK_TOKEN", SECRET)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"team-a": "token-a"}))
    monkeypatch.setenv("MODELLOOP_FEEDBACK_TOKENS_FILE", str(tokens))
    labelers = LabelerSettings()
    assert labelers.sources() == ["default", "team-a"]
    assert labelers.matcher().match(SECRET) == "default" and labelers.matcher().match("token-a") == "team-a"
    assert SECRET not in repr(labelers) and "token-a" not in repr(labelers)


def test_admin_token_from_a_file(tmp_path: Path):
    path = tmp_path / "admin"
    path.write_text(SECRET + "\n")
    settings = ServingSettings(repo=tmp_path, admin_token_file=path)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == SECRET
    with pytest.raises(ValidationError, match="not both"):
        ServingSettings(repo=tmp_path, admin_token=SECRET, admin_token_file=path)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MODELLOOP_FEEDBACK_TOKENS": "{not json"}, "MODELLOOP_FEEDBACK_TOKENS: not JSON"),
        ({"MODELLOOP_FEEDBACK_TOKENS": '{"a": ["x"]}'}, "the token of source 'a' must be a string"),
        ({"MODELLOOP_FEEDBACK_TOKENS": '{"a": ""}'}, "the token is empty"),
        ({"MODELLOOP_FEEDBACK_TOKEN": ""}, "MODELLOOP_FEEDBACK_TOKEN: the token is empty"),
        ({"MODELLOOP_FEEDBACK_TOKEN_FILE": "/nonexistent/token"}, "cannot read '/nonexistent/token'"),
        (
            {"MODELLOOP_FEEDBACK_TOKENS_FILE": "/nonexistent/t.json"},
            "MODELLOOP_FEEDBACK_TOKENS_FILE: cannot read",
        ),
        ({"MODELLOOP_ADMIN_TOKEN_FILE": "/nonexistent/admin"}, "MODELLOOP_ADMIN_TOKEN_FILE: cannot read"),
        (
            {"MODELLOOP_FEEDBACK_TOKEN": SECRET, "MODELLOOP_FEEDBACK_TOKEN_FILE": "/x"},
            "MODELLOOP_FEEDBACK_TOKEN or MODELLOOP_FEEDBACK_TOKEN_FILE, not both",
        ),
        (
            {"MODELLOOP_FEEDBACK_TOKEN": SECRET, "MODELLOOP_FEEDBACK_TOKENS": json.dumps({"x": SECRET})},
            "share a token",
        ),
    ],
)
def test_a_malformed_token_configuration_stops_start_up_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    message: str,
):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code = main(["serve", "--repo", str(tmp_path), "--state-dir", str(tmp_path / "state")])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("modelloop: error: invalid settings: ") and message in err
    assert SECRET not in err


def test_a_server_without_labeler_tokens_warns_at_start(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    from modelloop.server import ModelServer

    monitoring = MonitoringSettings(state_dir=tmp_path / "state")
    with caplog.at_level(logging.INFO, logger="modelloop.server"):
        open_server = ModelServer(ServingSettings(repo=tmp_path), monitoring=monitoring)
        guarded = ModelServer(
            ServingSettings(repo=tmp_path),
            monitoring=monitoring,
            labelers=LabelerSettings(feedback_tokens=json.dumps({"team-a": SECRET})),
        )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "feedback is unauthenticated" in warnings[0].getMessage()
    assert any("sources: team-a" in r.getMessage() for r in caplog.records)
    for server in (open_server, guarded):
        assert server.monitoring is not None
        server.monitoring.stores.close()


def test_up_creates_its_own_labeler_token_once(tmp_path: Path):
    path = ensure_feedback_token_file(tmp_path / "state")
    assert path.name == FEEDBACK_TOKEN_FILE and path.stat().st_mode & 0o077 == 0
    token = path.read_text().strip()
    assert len(token) >= 32 and ensure_feedback_token_file(tmp_path / "state").read_text().strip() == token
    labelers = LabelerSettings(feedback_token_file=path)
    assert labelers.matcher().match(token) == "default"

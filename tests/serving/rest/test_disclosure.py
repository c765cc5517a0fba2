"""What an unauthenticated caller learns: load errors without host paths, no credentials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from modelloop.errors import hide_credentials, redact
from modelloop.serving.rest.app import create_app

from ..edge_support import RuntimeFactory, serve, write_digits

ROW = [0.0] * 64


class QuotesItsPath(RuntimeFactory):
    """Version 2 fails to load the way ONNX Runtime does, quoting the file's absolute path."""

    def __call__(self, kind: str, path: Path, metadata: Any, config: Any) -> Any:
        if metadata.version == 2:
            raise RuntimeError(
                f"[ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from {path / 'model.onnx'} "
                "failed:Protobuf parsing failed."
            )
        return super().__call__(kind, path, metadata, config)


async def test_a_failed_version_is_reported_without_host_paths(tmp_path: Path) -> None:
    repo = tmp_path / "secret-host-dir" / "models"
    write_digits(repo, (1, 2))
    async with serve(repo, QuotesItsPath()) as stack:
        app = create_app(stack.dataplane, stack.settings, stack.prometheus)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://test"
        ) as client:
            answers = [
                await client.get("/v1/models/digits"),
                await client.get("/v1/models/digits/versions/2"),
                await client.get("/"),
                await client.post("/v1/models/digits/versions/2:predict", json={"instances": [ROW]}),
                await client.get("/v2/models/digits/versions/2/ready"),
            ]
        for answer in answers:
            assert str(tmp_path) not in answer.text and "secret-host-dir" not in answer.text, answer.text
        # The reason is still there, relative to the repository.
        assert "Load model from digits/2/model.onnx failed" in answers[0].text
        assert "digits/2/model.onnx" in answers[2].text


def test_redact_drops_credentials_and_paths() -> None:
    text = "cannot reach http://user:pa55@minio:9000/b at /srv/models/m/1/model.onnx or /opt/x/lib.py"
    assert redact(text, "/srv/models") == "cannot reach http://***@minio:9000/b at m/1/model.onnx or …/lib.py"
    assert hide_credentials("s3://key:secret@bucket/p and https://tok@h/x") == (
        "s3://***@bucket/p and https://***@h/x"
    )
    assert (
        redact("see https://example.com/a/b/c and model 'a/b'")
        == "see https://example.com/a/b/c and model 'a/b'"
    )

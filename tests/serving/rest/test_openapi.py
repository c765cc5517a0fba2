"""The OpenAPI document: the self-decoding routes document their bodies, the examples validate
against their own schemas, and the document says nothing the app does not do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from modelloop.control.http import create_alerts_router, create_feedback_router
from modelloop.serving.rest.app import create_app

from ..edge_support import EdgeStack, serve, write_digits

BODIES = {
    "/v1/models/{model_method}": {"PredictRowRequest", "PredictColumnarRequest"},
    "/v1/models/{model}/versions/{version_method}": {"PredictRowRequest", "PredictColumnarRequest"},
    "/v1/models/{model}/labels/{label_method}": {"PredictRowRequest", "PredictColumnarRequest"},
    "/v2/models/{model}/infer": {"V2InferRequest"},
    "/v2/models/{model}/versions/{version}/infer": {"V2InferRequest"},
    "/v1/models/{name}/feedback": {"FeedbackRequest"},
    "/monitoring/alerts": {"AlertmanagerWebhook"},
}


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[EdgeStack]:
    write_digits(tmp_path / "models", (1,))
    async with serve(tmp_path / "models", admin_token="t") as stack:
        yield stack


@pytest.fixture
async def document(stack: EdgeStack) -> dict[str, Any]:
    # Monitoring's routers as the composition root mounts them (monitoring off: the
    # documentation does not depend on it).
    routers = [create_feedback_router(None, 1024), create_alerts_router(None, "t", 1024)]
    app = create_app(stack.dataplane, stack.settings, stack.prometheus, routers=routers)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        response = await client.get("/openapi.json")
    assert response.status_code == 200
    return response.json()


def _refs(schema: dict[str, Any]) -> set[str]:
    if "$ref" in schema:
        return {schema["$ref"].rsplit("/", 1)[1]}
    return {ref for option in schema.get("anyOf", []) for ref in _refs(option)}


def _validator(document: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    registry = Registry().with_resource("urn:doc", Resource(contents=document, specification=DRAFT202012))
    schema = {"$ref": f"urn:doc#/components/schemas/{name}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


async def test_self_decoding_routes_document_their_bodies_from_the_models(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    for path, models in BODIES.items():
        body = document["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        json_body = body["content"]["application/json"]
        assert _refs(json_body["schema"]) == models, path
        assert models <= set(schemas)
        assert json_body["examples"], path
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert (
        "binary_data_size"
        in infer["requestBody"]["content"]["application/octet-stream"]["schema"]["description"]
    )
    assert {p["name"] for p in infer["parameters"]} == {"model", "Inference-Header-Content-Length"}
    ok = infer["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "application/octet-stream"}
    assert _refs(ok["application/json"]["schema"]) == {"V2InferResponse"}


async def test_every_body_example_validates_against_its_own_schema(document: dict[str, Any]) -> None:
    checked = 0
    for path, models in BODIES.items():
        content = document["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        for name, example in content["examples"].items():
            matches = [m for m in models if _validator(document, m).is_valid(example["value"])]
            assert matches, f"{path} example {name} fits none of {models}"
            checked += 1
    assert checked >= 12
    # The schemas are not vacuous: a body of the wrong shape is refused.
    assert not _validator(document, "V2InferRequest").is_valid({"inputs": []})
    assert not _validator(document, "PredictRowRequest").is_valid({"inputs": [[1.0]]})
    assert not _validator(document, "FeedbackRequest").is_valid({"feedback": [{"targets": [1]}]})


async def test_no_framework_422_and_no_private_keys_left(document: dict[str, Any]) -> None:
    text = str(document)
    assert "x-modelloop" not in text
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            assert "422" not in operation["responses"], (method, path)
            # Every route documents how it fails, besides its success.
            assert any(code.startswith(("4", "5")) for code in operation["responses"]) or path in (
                "/v2",
                "/v2/models/stats",
                "/metrics",
            ), (method, path)


async def test_admin_routes_declare_the_bearer_token(document: dict[str, Any]) -> None:
    assert document["components"]["securitySchemes"]["adminToken"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The server's MODELLOOP_ADMIN_TOKEN; admin routes are off without one.",
    }
    secured = {
        (method, path)
        for path, item in document["paths"].items()
        for method, operation in item.items()
        if operation.get("security")
    }
    assert secured == {
        ("post", "/v2/repository/index"),
        ("post", "/v2/repository/models/{model}/load"),
        ("post", "/v2/repository/models/{model}/unload"),
        ("post", "/monitoring/alerts"),
        ("get", "/v2/systemsharedmemory/status"),
        ("get", "/v2/systemsharedmemory/region/{name}/status"),
        ("post", "/v2/systemsharedmemory/region/{name}/register"),
        ("post", "/v2/systemsharedmemory/region/{name}/unregister"),
        ("post", "/v2/systemsharedmemory/unregister"),
    }
    for method, path in secured:
        assert {"401", "403"} <= set(document["paths"][path][method]["responses"])


async def test_path_examples_prefill_try_it_out(document: dict[str, Any]) -> None:
    def examples(path: str) -> dict[str, str]:
        parameters = document["paths"][path]["post"]["parameters"]
        return {p["name"]: p.get("example") for p in parameters if p["in"] == "path"}

    assert examples("/v1/models/{model_method}") == {"model_method": "digits:predict"}
    assert examples("/v1/models/{model}/versions/{version_method}") == {
        "model": "digits",
        "version_method": "1:predict",
    }
    assert examples("/v2/models/{model}/versions/{version}/infer") == {"model": "digits", "version": "1"}
    # Admin routes get none: an example there would unload the example model.
    assert examples("/v2/repository/models/{model}/unload") == {"model": None}


async def test_docs_pages_use_the_packaged_assets(stack: EdgeStack) -> None:
    app = create_app(stack.dataplane, stack.settings, stack.prometheus)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            assert "/docs/assets/" in html and "cdn." not in html and "fonts.googleapis" not in html
        for name, media in (
            ("swagger-ui-bundle.js", "text/javascript"),
            ("swagger-ui.css", "text/css"),
            ("redoc.standalone.js", "text/javascript"),
            ("favicon.png", "image/png"),
        ):
            asset = await client.get(f"/docs/assets/{name}")
            assert asset.status_code == 200 and asset.headers["content-type"].startswith(media), name
            assert len(asset.content) > 1000
    # Behind a path prefix (root_path), the page asks for the prefixed URLs.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, root_path="/serving"), base_url="http://test"
    ) as client:
        html = (await client.get("/docs")).text
        assert "/serving/docs/assets/swagger-ui-bundle.js" in html and "/serving/openapi.json" in html

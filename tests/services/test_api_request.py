"""services/payloads.py PredictionRequest inside a real in-process BentoML app: BentoML still reads an api's
input through `IODescriptor.from_http_request` (not documented API), so every request goes through our reader."""

from __future__ import annotations

import asyncio
import base64

import bentoml
import httpx
import pytest
from starlette.responses import JSONResponse

from services.payloads import PredictionRequest, RequestHookMoved, check_request_hook

REQUEST = PredictionRequest.limited_to(2)
MOVED = (f"bentoml {bentoml.__version__} no longer reads an api's input with IODescriptor.from_http_request: "
         "update services/payloads.py PredictionRequest")


@bentoml.service
class Probe:
    """One api with ConvForge's input model that echoes what it was given."""

    @bentoml.api(route="/probe", input_spec=REQUEST, output_spec=REQUEST)
    async def probe(self, images: list[bytes], received: float = 0.0, error=None, **options) -> JSONResponse:
        if error is not None:
            return JSONResponse({"error": str(error)}, status_code=error.status)
        targets = options.pop("targets", None)
        return JSONResponse({"sizes": [len(blob) for blob in images], "read": received > 0, **options,
                             "targets": None if targets is None else [type(t).__name__ for t in targets]})


def call(*requests: dict) -> list[httpx.Response]:
    """POST each request's keyword arguments to /probe of the running app."""
    async def main() -> list[httpx.Response]:
        app = Probe.to_asgi()
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://probe") as client:
                return [await client.post("/probe", **kwargs) for kwargs in requests]

    return asyncio.run(main())


def test_bentoml_still_has_the_input_hook() -> None:
    try:
        check_request_hook()
    except RequestHookMoved as exc:
        pytest.fail(str(exc))  # "BentoML changed its input hook: ..." names the version


def test_bentoml_api_endpoint_reads_input_with_our_reader() -> None:
    """(One app per test process: BentoML registers its request series once.) `targets` come through as bytes,
    undecoded: decoding them is the scoring api's (services/service.py `_load`), not the reader's, which runs on
    the event loop for every api (it used to decode them all, whether the api scored them or not)."""
    form, hostile, as_json, targets, json_targets = call(
        dict(files=[("images", ("a.png", b"abc")), ("images", ("b.png", b"abcd"))], data={"top_k": "3"}),
        dict(files=[("images", (None, "http://127.0.0.1:1/x"))]),  # BentoML's own reader would fetch this URL
        dict(json={"images": [base64.b64encode(b"abc").decode()], "box_format": "xywh"}),
        dict(files=[("images", ("a.png", b"abc")), ("targets", ("t.png", b"not a png"))]),
        dict(json={"images": [base64.b64encode(b"abc").decode()], "targets": [base64.b64encode(b"nor").decode()]}))
    assert targets.status_code == 200 and targets.json()["targets"] == ["bytes"], targets.text
    assert json_targets.status_code == 200 and json_targets.json()["targets"] == ["bytes"], json_targets.text
    assert form.status_code == 200, f"{MOVED} ({form.status_code}: {form.text})"
    assert form.json()["sizes"] == [3, 4] and form.json()["top_k"] == 3 and form.json()["read"], MOVED
    assert hostile.status_code == 422 and "file upload" in hostile.json()["error"], f"{MOVED} ({hostile.text})"
    assert as_json.status_code == 200 and as_json.json()["box_format"] == "xywh", f"{MOVED} ({as_json.text})"


def test_bentoml_clients_see_a_file_list_and_send_multipart() -> None:
    schema = REQUEST.model_json_schema()
    assert schema["properties"]["images"]["items"]["type"] == "file"  # what BentoML's HTTP clients look for
    assert schema["required"] == ["images"] and "error" not in schema["properties"]
    assert REQUEST.mime_type() == "multipart/form-data"  # OpenAPI documents the multipart body
    served = REQUEST.model_json_schema(mode="serialization")["properties"]["images"]["items"]
    assert served == {"type": "string", "format": "binary"}


def test_a_changed_hook_is_one_clear_error(monkeypatch) -> None:
    async def synchronous_is_not_it(cls, request, serde, extra):  # a different signature
        return None

    monkeypatch.setattr(bentoml.IODescriptor, "from_http_request", classmethod(synchronous_is_not_it))
    with pytest.raises(RequestHookMoved, match="BentoML changed its input hook: bentoml .*PredictionRequest"):
        check_request_hook()


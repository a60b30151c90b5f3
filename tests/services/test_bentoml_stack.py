"""The guard inside BentoML's own middleware stack (`Service.to_asgi`, the app a server worker builds): BentoML's
request series keep a bounded `endpoint` label (services/batching.py bound_endpoint_labels, a private hook
checked here), and the 504 of BentoML's timeout, answered outside the guard, is still counted in
convforge_requests. The app runs in a fresh interpreter, as in a worker: BentoML registers its request series
once per process, so a second app in the test process (tests/services/test_api_request.py has one) would clash."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services import batching
from services.batching import MetricsMoved, check_metrics_middleware

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 0.3
INVENTED = 50  # distinct unknown paths a client sends
ODD = ["/QUICK", "/quick/x", "/%E2%98%83"]  # the reviewer's: a case change, a sub-path, a snowman


def stack_app():
    """A BentoML service of one quick api and one that outlives BentoML's timeout, behind the guard, as an ASGI
    app, its labels bounded as services/service.py bounds them."""
    import bentoml
    from starlette.responses import JSONResponse

    from services.batching import bound_endpoint_labels
    from services.guard import RequestGuard, endpoint_label
    from services.payloads import PredictionRequest

    request = PredictionRequest.limited_to(2)

    @bentoml.service(traffic={"timeout": TIMEOUT_S})
    class Stack:
        @bentoml.api(route="/quick", input_spec=request, output_spec=request)
        async def quick(self, images: list[bytes], received: float = 0.0, error=None, **options) -> JSONResponse:
            return JSONResponse({"ok": True}, headers={"X-Model-Version": "m:3"})

        @bentoml.api(route="/stuck", input_spec=request, output_spec=request)
        async def stuck(self, images: list[bytes], received: float = 0.0, error=None, **options) -> JSONResponse:
            await asyncio.sleep(30)
            return JSONResponse({"ok": True})

    Stack.add_asgi_middleware(RequestGuard, max_body_bytes=10_000, routes={"/quick": "quick", "/stuck": "stuck"})
    bound_endpoint_labels(endpoint_label)
    return Stack.to_asgi()


async def scenario() -> dict:
    """What the app answers to invented paths, real routes and a stuck call, and what its metrics then hold."""
    import httpx
    from prometheus_client import REGISTRY

    def timeouts() -> float:
        labels = {"task": "stuck", "endpoint": "/stuck", "model_version": "none", "status_class": "5xx"}
        return REGISTRY.get_sample_value("convforge_requests_total", labels) or 0.0

    app, image = stack_app(), {"json": {"images": ["YQ=="]}}
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://stack") as client:
            unknown = [await client.get(path) for path in [f"/x{uuid.uuid4().hex}" for _ in range(INVENTED)] + ODD]
            known = [await client.post("/quick", **image), await client.get("/livez"),
                     await client.get("/docs.json"), await client.get("/quick")]
            stuck = await client.post("/stuck", **image, timeout=10)
            await asyncio.sleep(0.1)  # BentoML answers 504 before the cancelled call (the guard's) has unwound
    return {"unknown": [[a.status_code, a.json()] for a in unknown], "known": [a.status_code for a in known],
            "stuck": [stuck.status_code, stuck.json()], "timeouts": timeouts(),
            "labels": sorted({s.labels["endpoint"] for family in REGISTRY.collect()
                              if family.name.startswith("bentoml_service_request") for s in family.samples
                              if "endpoint" in s.labels})}


@pytest.fixture(scope="module")
def observed() -> dict:
    run = subprocess.run([sys.executable, __file__], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_installed_bentoml_still_labels_its_series_where_we_bound_them() -> None:
    try:
        check_metrics_middleware()
    except MetricsMoved as exc:
        pytest.fail(str(exc))  # "BentoML moved its traffic metrics middleware: ..." names the version and what


def test_a_moved_metrics_middleware_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(batching, "METRICS_MODULE", "bentoml._internal.server.http.nowhere")
    with pytest.raises(MetricsMoved, match="BentoML moved its traffic metrics middleware: .*nowhere"):
        check_metrics_middleware()


def test_unknown_paths_share_one_endpoint_label_and_get_a_json_404(observed) -> None:
    """Each invented path used to add its own series to BentoML's request counter (the raw path as its label);
    now they share one, and the real routes keep their own."""
    from services.guard import UNMATCHED

    assert all(status == 404 and body["error"] for status, body in observed["unknown"]), observed["unknown"][:3]
    assert observed["known"] == [200, 200, 200, 405]
    labels = set(observed["labels"])
    assert {UNMATCHED, "/quick", "/docs.json"} <= labels and not labels & set(ODD), labels
    assert not [label for label in labels if label.startswith("/x")] and len(labels) <= 8, labels


def test_bentomls_timeout_504_is_counted_by_the_guard(observed) -> None:
    status, body = observed["stuck"]
    assert status == 504 and f"{TIMEOUT_S} seconds" in body["error"], observed["stuck"]
    assert observed["timeouts"] == 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    print(json.dumps(asyncio.run(scenario())))

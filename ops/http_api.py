"""The HTTP front of `unirec serve`: GET /recommend and /search on raw ASGI, everything
else (/healthz, /metrics) through FastAPI; the work itself is `serving.Service`'s.

Parameters are validated on the event loop (`parse_params`: every error names its
parameter, 400), then the request goes to the service's inference thread
(`Service.submit`) and its answer is written back as JSON.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

import orjson

from unirec.ops.config import ServingConfig
from unirec.ops.serving import Service

async def _send_json(send, status: int, body: Mapping[str, Any]) -> None:
    data = orjson.dumps(body)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def _json(status: int, body: Mapping[str, Any]):
    from starlette.responses import Response

    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


_HOT = {"/recommend": "recommend", "/search": "search"}
_BOOL = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}


def _text(query: Mapping[str, str], name: str, max_chars: int) -> tuple[str | None, str | None]:
    """(error message or None, value) of a required, non-blank text parameter."""
    v = query.get(name)
    if v is None:
        return f"{name}: required", None
    if not v.strip():
        return f"{name}: must not be empty", None
    if len(v) > max_chars:
        return f"{name}: longer than {max_chars} characters", None
    return None, v


def parse_params(query: Mapping[str, str], cfg: ServingConfig, *, search: bool) -> tuple[str | None, dict]:
    """(error message or None, handler kwargs) from the query string: every message names its
    parameter. Plain code rather than FastAPI's declared parameters: those cost ~0.7 ms of
    CPU per request (dependency solving), a third of a cached request."""
    err, user_id = _text(query, "user_id", cfg.max_id_chars)
    if err:
        return err, {}
    k = query.get("k")
    try:
        k = cfg.default_k if k is None else int(k)
    except ValueError:
        return f"k: must be an integer, got {k[:20]!r}", {}
    if not 1 <= k <= cfg.max_k:
        return f"k: must be between 1 and {cfg.max_k}, got {k}", {}
    out = {"user_id": user_id, "k": k}
    if search:
        err, out["q"] = _text(query, "q", cfg.max_query_chars)
        if err:
            return err, {}
    else:
        flag = query.get("exclude_seen")
        if flag is not None and flag.lower() not in _BOOL:
            return f"exclude_seen: must be true or false, got {flag[:20]!r}", {}
        out["exclude_seen"] = cfg.exclude_seen if flag is None else _BOOL[flag.lower()]
    return None, out


def create_app(service: Service):
    """The ASGI app: validation on the event loop, work on the inference thread.

    Bad parameters are 400 with `{"error": "<param>: <what is wrong>"}`."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from prometheus_client import make_asgi_app

    cfg = service.cfg

    @asynccontextmanager
    async def lifespan(app):
        service.start()
        yield
        service.close()

    app = FastAPI(title="unirec", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.mount("/metrics", make_asgi_app(service.metrics_registry))

    async def front(scope, receive, send):
        """GET /recommend and /search straight on ASGI (FastAPI's middleware stack would cost
        ~0.2 ms of the event loop per request); everything else goes through FastAPI."""
        name = _HOT.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "GET" else None
        if name is None:
            return await app(scope, receive, send)
        query = dict(parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True))
        err, kw = parse_params(query, cfg, search=name == "search")
        if err:
            service.metrics.requests.labels(name, "-", "400").inc()
            return await _send_json(send, 400, {"error": err})
        await _send_json(send, *await service.submit(name, kw.pop("user_id"), kw.pop("k"), **kw))

    @app.get("/healthz")
    async def healthz():
        view = service.view
        exp = view.exp
        arms = {} if exp is None else {
            a.name: {"share": a.share, "version": getattr(view.get(a.version), "version", None)}
            for a in exp.arms}
        ok = exp is not None and all(v["version"] for v in arms.values() if v["share"] > 0)
        return _json(200 if ok else 503, {"status": "ok" if ok else "no_model",
                                          "experiment": exp and exp.id, "arms": arms})

    return front

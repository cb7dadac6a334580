"""The aiohttp application: the page, its bundled assets and the JSON API it reads.

    GET /                  the page (static/index.html)
    GET /static/NAME       app.js, style.css
    GET /api/info          files, models, optional columns, whether a run is live
    GET /api/summary?F     totals, frequent errors, per-model figures, latency histogram
    GET /api/rows?F&offset=&limit=&sort=   a page of rows
    GET /api/row/N         row N in full: the request sent, the answer, usage, a sweep's rows
    GET /api/state         reads what a live run wrote since; the generation the page compares

F is the filters (`Filters.from_query`). Every request must carry the token (query parameter
`token`, which also sets a cookie, or that cookie); every answer forbids framing and inline
script (a strict Content-Security-Policy), so content from results can only ever be text.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from batchrunner.viewer.dataset import Dataset, Filters

__all__ = ["create_app"]

DATASET = web.AppKey("dataset", Dataset)
TOKEN = web.AppKey("token", str)
LAST_REFRESH = web.AppKey("last_refresh", list)  # [monotonic seconds]: mutable once running
REFRESH_EVERY_S = 1.5  # a live run's checkpoint is read again at most this often
_STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the token is in the first URL: never pass it on
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(dataset: Dataset, *, token: str) -> web.Application:
    """The viewer's web application over `dataset`; every request needs `token`."""
    if not token:
        raise ValueError("the viewer always needs a token")
    app = web.Application(middlewares=[_guard])
    app[DATASET] = dataset
    app[TOKEN] = token
    app[LAST_REFRESH] = [time.monotonic()]
    app.router.add_get("/", _index)
    app.router.add_get("/static/{name}", _static)
    app.router.add_get("/api/info", _info)
    app.router.add_get("/api/summary", _summary)
    app.router.add_get("/api/rows", _rows)
    app.router.add_get("/api/row/{index}", _row)
    app.router.add_get("/api/state", _state)
    return app


def cookie_name(app: web.Application) -> str:
    """The cookie that carries the token (per server, so two viewers do not collide)."""
    return "batchrunner_view_" + hmac.new(app[TOKEN].encode(), b"cookie", "sha256").hexdigest()[:8]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The token check, and the security headers on every answer."""
    app = request.app
    expected = app[TOKEN].encode()
    cookie = cookie_name(app)
    from_query = request.query.get("token", "")
    given = from_query or request.cookies.get(cookie, "")
    if not hmac.compare_digest(given.encode(), expected):
        response: web.StreamResponse = web.Response(
            status=403,
            text="batchrunner view: open the URL that `batchrunner view` printed "
            "(it carries the access token)\n",
        )
    else:
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # answered here, so it carries the headers below
            response = web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
        if from_query:
            response.set_cookie(cookie, app[TOKEN], httponly=True, samesite="Strict", path="/")
    response.headers.update(_HEADERS)
    return response


async def _index(request: web.Request) -> web.Response:
    return web.Response(body=_asset("index.html"), content_type="text/html", charset="utf-8")


async def _static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in _STATIC:
        raise web.HTTPNotFound()
    return web.Response(body=_asset(name), content_type=_STATIC[name], charset="utf-8")


def _asset(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


async def _info(request: web.Request) -> web.Response:
    return await _answer(request, lambda data: data.describe())


async def _summary(request: web.Request) -> web.Response:
    filters = _filters(request)
    return await _answer(request, lambda data: data.summary(filters))


async def _rows(request: web.Request) -> web.Response:
    filters = _filters(request)
    offset = _integer(request, "offset", 0)
    limit = _integer(request, "limit", 50)
    sort = request.query.get("sort") or None
    return await _answer(
        request, lambda data: data.page(filters, offset=offset, limit=limit, sort=sort)
    )


async def _row(request: web.Request) -> web.Response:
    text = request.match_info["index"]
    if not text.isdigit():
        raise web.HTTPNotFound()
    index = int(text)
    return await _answer(request, lambda data: data.row(index))


async def _state(request: web.Request) -> web.Response:
    app = request.app
    data = app[DATASET]
    now = time.monotonic()
    if data.live and now - app[LAST_REFRESH][0] >= REFRESH_EVERY_S:
        app[LAST_REFRESH][0] = now
        await asyncio.to_thread(data.refresh)
    return _json({"generation": data.generation, "live": data.live, "rows": data.rows})


async def _answer(request: web.Request, work: Callable[[Dataset], Any]) -> web.Response:
    """Run a dataset question off the event loop; bad parameters are a 400 with the reason."""
    data = request.app[DATASET]
    try:
        result = await asyncio.to_thread(work, data)
    except ValueError as exc:
        return _json({"error": str(exc)}, status=400)
    except KeyError:
        return _json({"error": "no such row"}, status=404)
    return _json(result)


def _filters(request: web.Request) -> Filters:
    try:
        return Filters.from_query(dict(request.query))
    except ValueError as exc:
        raise web.HTTPBadRequest(
            text=orjson.dumps({"error": str(exc)}).decode(), content_type="application/json"
        ) from None


def _integer(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name, "")
    if not raw:
        return default
    if not raw.isdigit():
        raise web.HTTPBadRequest(
            text=orjson.dumps({"error": f"{name} must be a whole number"}).decode(),
            content_type="application/json",
        )
    return int(raw)


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
    return web.Response(body=body, status=status, content_type="application/json")

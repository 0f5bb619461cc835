"""The HTTP application: operations endpoints plus every channel's routes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMethod
from aiohttp.web_request import BaseRequest

from switch.lease import Role
from switch.web.problems import Problem, json_response, problem_for

if TYPE_CHECKING:
    from switch.node import Node

log = logging.getLogger("gridpay.http")

NODE: web.AppKey[Node] = web.AppKey("node")


class InFlight:
    """The requests this node took as the active node (they passed `require_active`) and has
    not answered yet. A node that stops being active lets them finish under its epoch before
    its posting path stops and before it gives the lease up (see `Node._finish_requests`)."""

    __slots__ = ("_taken", "_idle")

    def __init__(self) -> None:
        self._taken: set[int] = set()  # id() of each request: alive until it is let go
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._taken)

    def take(self, request: web.Request) -> None:
        self._taken.add(id(request))
        self._idle.clear()

    def let_go(self, request: web.Request) -> None:
        if self._taken:
            self._taken.discard(id(request))
            if not self._taken:
                self._idle.set()

    async def finished(self, within_s: float) -> int:
        """Wait until every request taken is answered, `within_s` at most; how many are
        left."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), within_s)
        return len(self._taken)


IN_FLIGHT: web.AppKey[InFlight] = web.AppKey("in_flight", InFlight)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def node_of(request: web.Request) -> Node:
    return request.app[NODE]


@web.middleware
async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Counts and times every request, and turns errors into problem+json answers (one
    middleware for both: each one is a layer of calls on every request)."""
    started = time.perf_counter()
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    status = 500
    app = request.app
    try:
        try:
            resp = await handler(request)
        except Exception as e:
            resp = problem_for(request, e)
        status = resp.status
        return resp
    except web.HTTPException as e:  # a redirect or success raised, answered by aiohttp
        status = e.status
        raise
    finally:
        app[IN_FLIGHT].let_go(request)  # if `require_active` took it
        m = app[NODE].metrics
        m.child(m.http_requests, name, str(status)).inc()
        m.child(m.http_latency, name).observe(time.perf_counter() - started)


async def healthz(request: web.Request) -> web.Response:
    node = node_of(request)
    return json_response({"status": "ok", "node_id": node.settings.node.id,
                          "uptime_s": round(time.time() - node.started_at, 1)})


async def readyz(request: web.Request) -> web.Response:
    node = node_of(request)
    checks: dict[str, bool] = {}
    try:
        async with node.pool.acquire(timeout=1.0) as con:
            checks["database"] = await con.fetchval("SELECT 1", timeout=1.0) == 1
    except Exception:
        checks["database"] = False
    try:
        checks["redis"] = bool(await node.redis.ping())
    except Exception:
        checks["redis"] = False
    hsm = node.components.get("hsm")
    if hsm is not None:
        try:
            await hsm.echo(b"ready")
            checks["hsm"] = True
        except Exception:
            checks["hsm"] = False
    checks["active"] = node.is_active
    ok = all(checks.values())
    return json_response({"ready": ok, "role": str(node.role), "checks": checks},
                         status=200 if ok else 503)


async def metrics(request: web.Request) -> web.Response:
    node = node_of(request)
    refresh = node.components.get("metrics_refresh")
    if refresh is not None:
        await refresh()
    return web.Response(body=node.metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


def require_active(request: web.Request) -> Node:
    node = node_of(request)
    if not node.is_active:
        if node.stopping:
            detail = "this node is stopping; send the request to the active node"
        elif node.role is Role.ACTIVE:  # its lease lapsed here: the database is out of reach
            detail = ("this node could not renew its lease in time (is the database "
                      "reachable?); retry shortly")
        else:
            detail = "this node is the standby; send the request to the active node"
        raise Problem(503, "standby", detail, headers={"Retry-After": "1"})
    # counted until it is answered (the middleware lets it go): a node stepping aside waits
    # for it before it stops its posting path and hands over or releases the lease
    request.app[IN_FLIGHT].take(request)
    return node


def build_app(node: Node) -> web.Application:
    app = web.Application(middlewares=[metrics_middleware],
                          client_max_size=1024 * 1024 * 8)
    app[NODE] = node
    app[IN_FLIGHT] = InFlight()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for register in node.components.get("routes", []):
        register(app)
    return app


# --- requests that cannot be parsed ----------------------------------------------------------

class _ProblemHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, but a request it cannot parse (a bad header byte, a header
    line over the limit, a broken chunk) is answered with a fixed problem+json. aiohttp's own
    answer is text/plain with the parser's message, which quotes the offending bytes: an
    `Authorization` header, key and all."""

    def handle_error(self, request: BaseRequest, status: int = 500,
                     exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        # Written after aiohttp's own handle_error (3.x: the BadHttpMethod case, the private
        # _request_count, the answer already begun): look at it again when aiohttp moves on.
        if status >= 500:
            super().handle_error(request, status, exc, None)  # logged with its traceback
        else:  # the client's mistake: one warning line, not an error with a traceback
            # (not even that for what is not HTTP at all on a connection's first request: TLS
            # or a port scanner, as aiohttp itself has it)
            level = (logging.DEBUG if self._request_count == 1
                     and isinstance(exc, BadHttpMethod) else logging.WARNING)
            log.log(level, "malformed HTTP request refused",
                    extra={"status": status, "peer": request.remote,
                           "error": type(exc).__name__ if exc is not None else None})
            if request.writer.output_size > 0:  # as aiohttp does: no second answer
                raise ConnectionError("a response was sent already")
        problem = (Problem(500, "internal_error", "the request could not be completed")
                   if status >= 500 else
                   Problem(status, "bad_request", "the request is not well-formed HTTP/1.1 (a "
                           "header line with a forbidden byte or over 8190 bytes, a bad "
                           "chunk, ...); nothing was done"))
        resp = problem.response()
        resp.force_close()
        return resp


class _ProblemServer(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _ProblemHandler(self, loop=self._loop, **self._kwargs)


class ProblemRunner(web.AppRunner):
    """`web.AppRunner` whose connections answer unparseable requests with problem+json."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _ProblemServer  # the same server, our connection handler
        app_handle = server.request_handler

        async def handle(request: BaseRequest) -> web.StreamResponse:
            # an Expect header other than 100-continue is refused before the middlewares
            # run, by aiohttp in text/plain quoting the header: a problem+json here instead
            try:
                return await app_handle(request)
            except web.HTTPExpectationFailed:
                return Problem(417, "expectation_failed", "the only expectation this server "
                               "meets is 'Expect: 100-continue'").response()

        server.request_handler = handle  # read by each connection's handler as it is made
        return server

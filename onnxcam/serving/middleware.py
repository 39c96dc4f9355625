"""ASGI middleware around the routes: request metrics, a per-request timeout, the body size limit (with a
bounded drain, so that clients that write the whole body before reading get their 413), and the API key."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .protocol import HTTPError

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]
OPEN_ROUTES = ("/v2/health/live", "/v2/health/ready", "/metrics")  # answered without the API key


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("onnxcam_requests", "Requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.batch_size = Histogram("onnxcam_batch_size", "Images per session run", buckets=(1, 2, 4, 8, 16, 32, 64),
                                    registry=self.registry)
        self.latency = Histogram("onnxcam_request_seconds", "Request latency", ["route"], registry=self.registry)
        self.in_flight = Gauge("onnxcam_requests_in_flight", "Requests being answered", registry=self.registry)


async def send_json(send: Send, status: int, body: dict, *, close: bool = False) -> None:
    content = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


DRAIN_IDLE_SECONDS = 5.0  # a sender that pauses this long while its body is drained is cut off


async def drain(receive: Receive, limit: int, timeout: float) -> None:
    """Read and drop the rest of a request body, up to `limit` bytes and `timeout` seconds, and no pause over
    DRAIN_IDLE_SECONDS: a client that sends its whole body before reading (Python's urllib, requests) then
    reads the answer instead of a reset connection; a slow or endless sender is cut off at the bounds."""
    async def read_rest() -> None:
        drained = 0
        while drained <= limit:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_SECONDS)
            drained += len(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body", False):
                return

    try:
        await asyncio.wait_for(read_rest(), timeout)
    except (asyncio.TimeoutError, HTTPError):
        return


class MetricsMiddleware:
    """Counts requests by route name and status, and times them (the metrics route itself is not counted)."""

    def __init__(self, app: App, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        status, start = [500], time.perf_counter()

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.in_flight.dec()
            route = getattr(scope.get("route"), "name", None) or "unmatched"
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)


class TimeoutMiddleware:
    """Each request is answered within `seconds`: 408 if its body was still arriving, 504 otherwise."""

    def __init__(self, app: App, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "body_done": scope["method"] in ("GET", "HEAD")}

        async def receive_tracked() -> dict:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def send_tracked(message: dict) -> None:
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive_tracked, send_tracked), self.seconds)
        except asyncio.TimeoutError:
            if state["started"]:
                raise
            if state["body_done"]:
                await send_json(send, 504, {"error": f"no answer within {self.seconds:g} s"})
            else:
                await send_json(send, 408, {"error": f"the request body did not arrive within {self.seconds:g} s"},
                                close=True)


class BodyLimitMiddleware:
    """Bodies over `max_body` bytes get 413, whether their length is declared or found while reading. The
    rest of the body is drained first (at most `drain_limit` bytes and `drain_seconds`), as nginx's
    lingering close does, so that a client still writing its body reads the 413."""

    def __init__(self, app: App, max_body: int, drain_limit: int, drain_seconds: float):
        self.app, self.max_body = app, max_body
        self.drain_limit, self.drain_seconds = drain_limit, drain_seconds

    def _too_large(self) -> HTTPError:
        return HTTPError(413, f"request body over the limit of {self.max_body} bytes")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body:
            await drain(receive, self.drain_limit, self.drain_seconds)
            return await send_json(send, 413, {"error": str(self._too_large())}, close=True)
        received = [0]

        async def receive_limited() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            if received[0] > self.max_body:
                if message.get("more_body", False):
                    await drain(receive, self.drain_limit, self.drain_seconds)
                raise self._too_large()
            return message

        await self.app(scope, receive_limited, send)


class ApiKeyMiddleware:
    """Every route but health and metrics needs `Authorization: Bearer <key>`; compared in constant time."""

    def __init__(self, app: App, api_key: str, drain_limit: int, drain_seconds: float):
        self.app, self.expected = app, f"Bearer {api_key}".encode()
        self.drain_limit, self.drain_seconds = drain_limit, drain_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_ROUTES:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        await drain(receive, self.drain_limit, self.drain_seconds)
        body = {"error": "this server needs an API key: send the header 'Authorization: Bearer <key>'"
                if not given else "wrong API key"}
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": json.dumps(body).encode()})

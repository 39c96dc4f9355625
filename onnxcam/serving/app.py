"""An embeddable ASGI explanation server (the `serve` extra): the Open Inference Protocol and KServe V1
routes, an image route for people, a web page, micro-batching and Prometheus metrics.

    app = create_app("model.onnx")        # mount it in another Starlette/FastAPI app, or:
    onnxcam serve model.onnx --port 8000
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware

from ..core.files import MAX_PIXELS
from ..explainer import Explainer
from .batcher import MicroBatcher
from .middleware import ApiKeyMiddleware, BodyLimitMiddleware, Metrics, MetricsMiddleware, TimeoutMiddleware
from .routes import EXCEPTION_HANDLERS, Service

log = logging.getLogger("onnxcam.serving")


def create_app(model_path, *, name: str | None = None, provider: str = "auto", max_batch: int = 8,
               max_wait_ms: float = 5.0, queue_size: int = 64, max_body: int = 32 * 2 ** 20,
               max_pixels: int = MAX_PIXELS, api_key: str | None = None, request_timeout: float = 60.0,
               drain_limit: int = 256 * 2 ** 20, drain_seconds: float = 30.0) -> Starlette:
    """The ASGI application serving one explainable model.

    Bodies over `max_body` bytes get 413 after the rest is drained (at most `drain_limit` bytes and
    `drain_seconds`); every request is answered within `request_timeout` seconds; with `api_key`, all
    routes but health and metrics need `Authorization: Bearer <api_key>`.
    """
    explainer = Explainer(model_path, provider=provider)
    metrics = Metrics()
    batcher = MicroBatcher(explainer, metrics.batch_size, max_batch, max_wait_ms / 1000, queue_size)
    service = Service(explainer, name or Path(model_path).name.split(".")[0], batcher, metrics, max_body, max_pixels)
    drain = {"drain_limit": drain_limit, "drain_seconds": drain_seconds}
    middleware = [Middleware(MetricsMiddleware, metrics=metrics),  # outermost: counts every answer
                  Middleware(TimeoutMiddleware, seconds=request_timeout),
                  Middleware(BodyLimitMiddleware, max_body=max_body, **drain)]
    if api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=api_key, **drain))

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await batcher.start()
        yield
        await batcher.stop(grace=request_timeout)

    app = Starlette(routes=service.routes(), middleware=middleware, exception_handlers=EXCEPTION_HANDLERS,
                    lifespan=lifespan)
    app.state.service, app.state.explainer, app.state.metrics = service, explainer, metrics
    app.state.model_name, app.state.request_timeout = service.name, request_timeout
    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(app: Starlette, host: str = "127.0.0.1", port: int = 8000, *, drain_delay: float = 0.0,
        api_key: bool = False) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully: readiness turns false at once, new requests
    are still answered for `drain_delay` seconds (while a load balancer stops sending), then the listening
    socket closes, the requests already accepted are answered, and the process exits."""
    if not api_key and not is_loopback(host):
        log.warning(f"warning: serving on {host} without an API key: anyone who can reach this address can use "
                    f"the model (set an API key)")
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(app.state.request_timeout) + 5)
    GracefulServer(config, app.state.service, drain_delay).run()


class GracefulServer(uvicorn.Server):
    """uvicorn's server whose first SIGTERM/SIGINT turns readiness false and runs the batch the batcher holds
    before it stops accepting (after the drain delay, or at a second signal)."""

    def __init__(self, config: uvicorn.Config, service: Service, drain_delay: float):
        super().__init__(config)
        self.service, self.drain_delay = service, drain_delay

    def handle_exit(self, sig: int, frame) -> None:
        if self.service.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.service.draining = True
        self.service.batcher.flush()  # the requests it holds are answered now, not after its wait for a batch
        exit_later = threading.Timer(self.drain_delay, super().handle_exit, (signal.SIGTERM, None))
        exit_later.daemon = True
        exit_later.start()


@contextlib.contextmanager
def serving(app: Starlette, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread (port 0: a free one); yields the base URL."""
    import socket

    if port == 0:
        with socket.socket() as probe:
            probe.bind((host, 0))
            port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)

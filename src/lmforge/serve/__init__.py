"""``lmforge serve``: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the continuous-batching engine
(:mod:`lmforge.generation.engine`), a web page, Prometheus metrics; ``lmforge batch`` runs OpenAI batch files
through the same engine. See docs/serve.md.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import time
import warnings
from typing import Any

from ..errors import LMForgeError
from .service import ModelService, ServeConfig, load_service, model_id

LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 = a free port, read back with ``getsockname``)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise LMForgeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") from None
    sock.listen(2048)
    return sock


class Server:
    """A uvicorn server for ``cfg`` on a thread of its own (``start``/``stop``) or in the foreground (``run``)."""

    def __init__(self, cfg: ServeConfig, service: ModelService | None = None, log_level: str = "warning") -> None:
        # the HTTP stack loads only to serve over HTTP (batch jobs and the engine alone do without it)
        import uvicorn

        from .app import create_app

        cfg.validate()
        if not is_loopback(cfg.host) and not cfg.api_key:
            warnings.warn(f"serving on {cfg.host} without an API key: anyone who can reach this address can use "
                          "the model; set --api-key or LMFORGE_API_KEY", stacklevel=2)
        self.cfg = cfg
        self.load_error: str | None = None
        self.sock = bind_socket(cfg.host, cfg.port)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(cfg, service, on_load_error=self._load_failed)
        self.uvicorn = uvicorn.Server(uvicorn.Config(self.app, log_level=log_level, access_log=False,
                                                     timeout_graceful_shutdown=2, lifespan="on"))
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        return f"http://{host}:{self.port}"

    def _load_failed(self, message: str) -> None:
        self.load_error = message
        self.uvicorn.should_exit = True

    def run(self) -> None:
        """Serve until interrupted; a model that fails to load raises its error here."""
        try:
            self.uvicorn.run(sockets=[self.sock])
        finally:
            self.sock.close()
        if self.load_error:
            raise LMForgeError(self.load_error)

    def start(self, wait_ready: float | None = 120.0) -> Server:
        """Run on a background thread; with ``wait_ready`` wait (seconds) until the model is loaded."""
        self._thread = threading.Thread(target=lambda: self.uvicorn.run(sockets=[self.sock]), daemon=True,
                                        name="lmforge-http")
        self._thread.start()
        if wait_ready:
            deadline = time.monotonic() + wait_ready
            while self.app.state.lmforge["service"] is None:
                if self.load_error:
                    raise LMForgeError(self.load_error)
                if time.monotonic() > deadline or not self._thread.is_alive():
                    raise LMForgeError(f"the server did not become ready in {wait_ready:.0f}s")
                time.sleep(0.02)
            while not self.uvicorn.started:
                time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self.sock.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["Server", "ServeConfig", "ModelService", "load_service", "model_id", "is_loopback"]

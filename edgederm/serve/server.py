"""``edgederm serve``: one bundle on the KServe v2 protocol, HTTP (uvicorn) and gRPC (grpcio).

Security defaults: the server binds to loopback. Binding to any other address
needs ``allow_remote=True`` and a bearer token of at least
:data:`MIN_TOKEN_LENGTH` characters, checked on every request in constant time;
without both the server refuses to start. The token is read from a file or the
``EDGEDERM_SERVE_TOKEN`` environment variable, never from the command line, where
other users of the machine could read it in the process list. A Unix socket is
created readable and writable by its owner only.

Shutdown (SIGTERM, SIGINT or :meth:`Server.stop`): the server stops accepting
(new requests get 503 / UNAVAILABLE, readiness turns false), finishes every
request already admitted within ``grace`` seconds, then exits.
"""
from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from edgederm.runtime.errors import InputError

from .protocol import Limits
from .service import InferenceService

log = logging.getLogger(__name__)

MIN_TOKEN_LENGTH = 16
TOKEN_ENV = "EDGEDERM_SERVE_TOKEN"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def check_bind(host: str, allow_remote: bool, token: str | None) -> None:
    """Refuse a non-loopback bind without the explicit flag and a token."""
    if token is not None and len(token) < MIN_TOKEN_LENGTH:
        raise InputError(f"the bearer token has {len(token)} characters; expected at least {MIN_TOKEN_LENGTH}. "
                         "Fix: generate one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    if is_loopback(host):
        return
    if not allow_remote or token is None:
        missing = " and ".join(m for m, ok in (("--allow-remote", allow_remote), ("a token", token is not None))
                               if not ok)
        raise InputError(
            f"refusing to serve on {host!r}, which is not a loopback address, without {missing}. Patient images "
            "would be open to the network. Fix: serve on 127.0.0.1 (the default), or pass --allow-remote with a "
            f"token in --token-file or ${TOKEN_ENV}, and put TLS in front of the server")


def read_token(token_file: str | os.PathLike[str] | None) -> str | None:
    if token_file is not None:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise InputError(f"cannot read the token file {os.fspath(token_file)!r}: {exc.strerror or exc}") from None
        if not token:
            raise InputError(f"the token file {os.fspath(token_file)!r} is empty; expected the bearer token")
        return token
    return os.environ.get(TOKEN_ENV) or None


class Server:
    """A model served on HTTP and gRPC until :meth:`stop`; ``port=0`` picks a free port."""

    def __init__(self, model: Any, name: str | None = None, host: str = "127.0.0.1", http_port: int | None = 8000,
                 grpc_port: int | None = 8001, uds: str | os.PathLike[str] | None = None, allow_remote: bool = False,
                 token: str | None = None, limits: Limits | None = None, grace_s: float = 30.0) -> None:
        check_bind(host, allow_remote, token)
        self.host = host
        self.grace_s = grace_s
        self.service = InferenceService(model, name=name, limits=limits, token=token)
        self._requested = (http_port, grpc_port, None if uds is None else os.fspath(uds))
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        self._uvicorn: Any = None
        self._http_thread: threading.Thread | None = None
        self._grpc: Any = None

    @property
    def name(self) -> str:
        return self.service.name

    def start(self, timeout: float = 30.0) -> Server:
        import uvicorn

        from .grpc_service import create_server
        from .http_app import create_app

        http_port, grpc_port, uds = self._requested
        sockets = [self._tcp_socket(http_port)] if http_port is not None else []
        if uds is not None:
            sockets.append(_unix_socket(uds))
        if not sockets:
            raise InputError("nothing to serve on: give an HTTP port or a Unix socket path")
        if http_port is not None:
            self.http_port = sockets[0].getsockname()[1]
        if grpc_port is not None:
            self._grpc, self.grpc_port = create_server(self.service, f"{_bracket(self.host)}:{grpc_port}")
            self._grpc.start()
        config = uvicorn.Config(create_app(self.service), log_config=None, access_log=False, lifespan="off",
                                http="h11", ws="none", server_header=False,
                                timeout_graceful_shutdown=max(int(self.grace_s), 1))
        self._uvicorn = uvicorn.Server(config)
        self._http_thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": sockets},
                                             name="edgederm-http", daemon=True)
        self._http_thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._http_thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the HTTP server did not start; see the log above")
            time.sleep(0.01)
        return self

    def _tcp_socket(self, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, port))
        except OSError as exc:
            sock.close()
            raise InputError(f"cannot bind HTTP to {self.host}:{port}: {exc.strerror or exc}; choose another "
                             "--http-port (0 picks a free one)") from None
        return sock

    def stop(self, grace: float | None = None) -> bool:
        """Stop accepting, finish admitted requests within ``grace`` seconds; True if all finished."""
        grace = self.grace_s if grace is None else grace
        self.service.accepting = False
        grpc_done = self._grpc.stop(grace) if self._grpc is not None else None
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._http_thread is not None:
            self._http_thread.join(grace + 5)
        if grpc_done is not None:
            grpc_done.wait(grace + 5)
        finished = self.service.close(grace)
        uds = self._requested[2]
        if uds is not None and os.path.exists(uds):
            os.unlink(uds)
        return finished

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def addresses(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.name}
        if self.http_port is not None:
            out["http"] = f"http://{_bracket(self.host)}:{self.http_port}"
        if self.grpc_port is not None:
            out["grpc"] = f"{_bracket(self.host)}:{self.grpc_port}"
        if self._requested[2] is not None:
            out["uds"] = self._requested[2]
        return out

    def run_until_signal(self, on_ready: Callable[[], None] | None = None) -> bool:
        """Serve until SIGTERM or SIGINT, then shut down gracefully (main thread only).

        ``on_ready`` runs once the handlers are in place: a supervisor that reads it as
        "started" may send SIGTERM at once.
        """
        stop = threading.Event()

        def on_signal(signum: int, frame: object) -> None:
            log.warning("received %s: finishing in-flight requests (up to %.0f s)", signal.Signals(signum).name,
                        self.grace_s)
            stop.set()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if on_ready is not None:
                on_ready()
            while not stop.wait(0.5):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.stop()


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _unix_socket(path: str) -> socket.socket:
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise InputError(f"--uds {path!r} exists and is not a socket; choose another path")
        os.unlink(path)  # a socket left by a server that did not stop cleanly
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # owner only, from the moment the socket exists
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    return sock


def run_cli(args: Any, **trust: Any) -> int:
    """``edgederm serve``: load the bundle, serve it, print the addresses as one JSON line.

    ``trust``: the device-trust options of ``load`` (pinned keys, graph key, audit log,
    self-test); with an audit log every prediction the server makes is recorded.
    """
    from edgederm.runtime import load, load_active

    if (args.bundle is None) == (args.store is None):
        raise InputError("give a BUNDLE or --store DIR (one of them): `edgederm serve BUNDLE` or "
                         "`edgederm serve --store DIR`")
    token = read_token(args.token_file)
    check_bind(args.host, args.allow_remote, token)  # before loading: a refused start costs nothing
    limits = Limits(max_request_bytes=int(args.max_request_mb * 2**20), max_image_side=args.max_image_side,
                    max_image_pixels=args.max_image_pixels, timeout_s=args.timeout, queue_size=args.queue_size,
                    workers=args.workers)
    options = {"backend": args.backend, "precision": args.precision, "memory_budget": args.memory_budget, **trust}
    model = load_active(args.store, **options) if args.store is not None else load(args.bundle, **options)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access = logging.getLogger("edgederm.serve.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO if args.access_log else logging.WARNING)
    access.propagate = False
    server = Server(model, name=args.name, host=args.host, http_port=None if args.http_port < 0 else args.http_port,
                    grpc_port=None if args.grpc_port < 0 else args.grpc_port, uds=args.uds,
                    allow_remote=args.allow_remote, token=token, limits=limits, grace_s=args.grace).start()
    finished = server.run_until_signal(
        lambda: print(json.dumps({"event": "serving", **server.addresses()}), flush=True))
    print(json.dumps({"event": "stopped", "finished_in_flight": finished}), flush=True)
    return 0 if finished else 1

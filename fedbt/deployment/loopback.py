"""What this machine's loopback carries: one model-sized payload sent as a deployment sends it.

A deployment moves each model through the SuperLink's HTTPS API (and, for sites, nginx in
front of it). Timing the same bytes over a plain socket, over TLS, and as one HTTPS POST to
uvicorn (the server Flower runs) separates what the wire costs from what Flower adds on top.
Each sender and receiver is a thread of this process; sockets and TLS release the GIL.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import uvicorn

from fedbt.deployment.certs import CertLayout, make_deployment_certs
from fedbt.deployment.nodes import LOOPBACK

CHUNK = 1 << 20


def _receive_all(connection: socket.socket, size: int) -> None:
    buffer = bytearray(CHUNK)
    received = 0
    while received < size:
        count = connection.recv_into(buffer)
        if not count:
            raise ConnectionError(f"the sender closed after {received} of {size} bytes")
        received += count


def _socket_seconds(payload: bytes, wrap_server: Callable, wrap_client: Callable) -> float:
    """Seconds to send `payload` from one thread to another over a loopback TCP connection."""
    with socket.create_server((LOOPBACK, 0)) as listener:
        port = listener.getsockname()[1]

        def receive() -> None:
            connection, _ = listener.accept()
            with wrap_server(connection) as connection:
                _receive_all(connection, len(payload))
                connection.sendall(b"k")  # the sender's clock stops when all bytes arrived

        receiver = threading.Thread(target=receive)
        receiver.start()
        with wrap_client(socket.create_connection((LOOPBACK, port))) as sender:
            started = time.perf_counter()
            sender.sendall(payload)
            sender.recv(1)
            seconds = time.perf_counter() - started
        receiver.join()
    return seconds


async def _drain(scope, receive, send) -> None:
    """An ASGI app that reads a request's whole body and answers 200 with nothing."""
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def _https_post_seconds(payload: bytes, layout: CertLayout) -> float:
    """Seconds for one HTTPS POST of `payload` from httpx to uvicorn, on a fresh connection."""
    with socket.create_server((LOOPBACK, 0)) as probe:
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _drain, host=LOOPBACK, port=port, lifespan="off", log_level="warning",
        ssl_certfile=str(layout.server_cert), ssl_keyfile=str(layout.server_key),
    )  # fmt: skip
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.05)
        tls = ssl.create_default_context(cafile=str(layout.ca_cert))
        with httpx.Client(verify=tls, timeout=300) as client:
            started = time.perf_counter()
            # The server certificate names localhost, as the SuperLink's does.
            client.post(f"https://localhost:{port}/", content=payload).raise_for_status()
            return time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join()


def loopback_rates(megabytes: float) -> dict[str, float]:
    """MB/s of one `megabytes` payload: plain TCP, TLS, one HTTPS POST to uvicorn, and SHA-256
    (what Flower computes of every object it stores) for comparison."""
    payload = bytes(int(megabytes * 1e6))
    plain = _socket_seconds(payload, lambda s: s, lambda s: s)
    with tempfile.TemporaryDirectory(prefix="fedbt-loopback-") as folder:
        layout = make_deployment_certs(Path(folder), [LOOPBACK], [])
        server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_tls.load_cert_chain(layout.server_cert, layout.server_key)
        client_tls = ssl.create_default_context(cafile=str(layout.ca_cert))
        tls = _socket_seconds(
            payload,
            lambda s: server_tls.wrap_socket(s, server_side=True),
            lambda s: client_tls.wrap_socket(s, server_hostname="localhost"),
        )
        https = _https_post_seconds(payload, layout)
    started = time.perf_counter()
    hashlib.sha256(payload).digest()
    sha256 = time.perf_counter() - started
    return {name: megabytes / seconds for name, seconds in
            (("tcp", plain), ("tls", tls), ("https_post", https), ("sha256", sha256))}  # fmt: skip

"""The server's public front (nginx, as `fedbt server` runs it): what it lets through, what it
logs, which TLS it speaks. The body limit is measured against a packed ResNet50 update."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import pytest
from flwr.app import ArrayRecord, RecordDict
from flwr.proto.message_pb2 import PushObjectRequest
from flwr.proto.node_pb2 import Node
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedbt.deployment.front import MAX_BODY_BYTES
from fedbt.deployment.local import LocalFederation
from fedbt.deployment.nodes import LOOPBACK
from fedbt.federated.packing import pack_content
from fedbt.model.architectures import build_resnet50_transfer

# A caller's own loopback address, other than the 127.0.0.1 the front uses towards the SuperLink.
CALLER, CHUNKED_CALLER, LEGITIMATE_CALLER = "127.0.0.7", "127.0.0.8", "127.0.0.9"
# The largest push-object request of a packed ResNet50 update (the test below measures it).
LARGEST_REQUEST_BYTES = 5_242_993
ATTACK_BYTES = 300 * 1024 * 1024
LOG_WAIT = 10.0  # seconds for a process's log line to reach its file


def request_bodies(content: RecordDict) -> list[int]:
    """The size of each push-object request that carries `content` to the server, as Flower cuts it."""
    largest_ids = {"node": Node(node_id=2**63 - 1), "run_id": 2**63 - 1}
    requests = (
        PushObjectRequest(**largest_ids, object_id=oid, object_content=obj.deflate())
        for oid, obj in get_all_nested_objects(content).items()
    )
    return [len(request.SerializeToString()) for request in requests]


def test_the_body_limit_fits_every_request_of_a_packed_resnet50_update():
    state = {name: tensor.float() for name, tensor in build_resnet50_transfer(4, 1, None).state_dict().items()}
    bodies = request_bodies(pack_content(RecordDict({"arrays": ArrayRecord(torch_state_dict=state)})))
    print(f"packed ResNet50 update: {len(bodies)} requests, {sum(bodies):,} bytes, the largest {max(bodies):,}")
    assert sum(bodies) > sum(t.numel() * 4 for t in state.values()) > 90e6  # the whole update, ~94 MB
    assert max(bodies) == LARGEST_REQUEST_BYTES, "Flower cuts messages differently: measure the front's limit again"
    assert max(bodies) < MAX_BODY_BYTES / 2, f"largest request {max(bodies):,} bytes: too close to the front's limit"


@pytest.fixture(scope="module")
def front(tmp_path_factory, site_files):
    """A real `fedbt server` (SuperLink and nginx front) on loopback, stopped whatever happens."""
    work = tmp_path_factory.mktemp("front")
    federation = LocalFederation(work, work / "no-data", site_files[:1])
    try:
        federation.start_server()
        yield federation
    finally:
        federation.close()


def tls_context(federation: LocalFederation) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(federation.certs / "ca.pem"))


def open_tls(federation: LocalFederation, context: ssl.SSLContext, caller: str = CALLER) -> ssl.SSLSocket:
    raw = socket.create_connection((LOOPBACK, federation.port), timeout=30, source_address=(caller, 0))
    return context.wrap_socket(raw, server_hostname="localhost")


def post_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()  # fmt: skip


def log_line_with(log: Path, *parts: str) -> str:
    """The first line of `log` holding every part, waiting a little for the process to write it."""
    deadline = time.monotonic() + LOG_WAIT
    while True:
        lines = [line for line in log.read_text().splitlines() if all(part in line for part in parts)]
        if lines or time.monotonic() > deadline:
            return lines[0] if lines else ""
        time.sleep(0.2)


@pytest.mark.e2e
def test_a_300_mb_unauthenticated_body_is_refused_before_it_is_read_and_logged_with_its_address(front):
    with open_tls(front, tls_context(front)) as conn:
        conn.sendall(post_head("/v1/fleet/push-object", ATTACK_BYTES))
        conn.sendall(bytes(1024 * 1024))  # the first MB of 300: the answer comes without the rest
        answer = conn.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    line = log_line_with(front.work / "server" / "front.log", f"{CALLER}:", "/v1/fleet/push-object", " 413 ")
    assert line, "the refused body is not in the front's log with the caller's address"


@pytest.mark.e2e
def test_a_body_the_size_of_the_largest_legitimate_request_reaches_the_superlink(front):
    body = bytes(LARGEST_REQUEST_BYTES)
    with open_tls(front, tls_context(front), LEGITIMATE_CALLER) as conn:
        conn.sendall(post_head("/v1/fleet/push-object", len(body)) + body)
        status = conn.recv(4096).decode(errors="replace").split(" ")[1]
    assert status != "413"
    assert log_line_with(front.work / "server" / "superlink.log", LEGITIMATE_CALLER, "/v1/fleet/push-object")


@pytest.mark.e2e
def test_a_call_the_superlink_refuses_is_logged_with_the_callers_address_at_the_front_and_the_superlink(front):
    body = b"not a signed request"
    with open_tls(front, tls_context(front)) as conn:
        conn.sendall(post_head("/v1/fleet/pull-messages", len(body)) + body)
        status = conn.recv(4096).decode(errors="replace").split(" ")[1]
    assert status.startswith("4"), status
    front_log = front.work / "server" / "front.log"
    front_line = log_line_with(front_log, f"{CALLER}:", "/v1/fleet/pull-messages", f" {status} ")
    assert front_line, "a refused routine Fleet call is missing from the front's log"
    superlink_line = log_line_with(front.work / "server" / "superlink.log", CALLER, "/v1/fleet/pull-messages")
    assert superlink_line, "the SuperLink's log does not name the caller the front saw"


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("version", "cipher", "accepted"),
    [
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA", False),  # CBC with SHA-1
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384", False),  # CBC with SHA-384
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256", True),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305", True),
        (ssl.TLSVersion.TLSv1_3, None, True),
    ],
    ids=["tls1.2-cbc-sha1", "tls1.2-cbc-sha384", "tls1.2-aes-gcm", "tls1.2-chacha20", "tls1.3"],
)
def test_the_front_speaks_tls_1_2_with_aead_suites_only_and_tls_1_3(front, version, cipher, accepted):
    context = tls_context(front)
    context.minimum_version = context.maximum_version = version
    if cipher:
        context.set_ciphers(cipher)  # this client offers that suite alone (and would fail here if it could not)
    if not accepted:
        with pytest.raises(ssl.SSLError, match="HANDSHAKE_FAILURE|NO_SHARED_CIPHER|no shared cipher"):
            open_tls(front, context).close()
        return
    with open_tls(front, context) as conn:
        assert conn.version() == version.name.replace("_", ".")
        assert cipher is None or conn.cipher()[0] == cipher



@pytest.mark.e2e
def test_a_300_mb_body_sent_in_chunks_is_cut_off_at_the_limit(front):
    """Without a declared length nginx cannot refuse up front: it stops passing the body on, and
    answers 413, once the limit is passed (what follows is read and thrown away, not kept)."""
    chunk = bytes(1024 * 1024)
    head = ("POST /v1/fleet/push-object HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/protobuf\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")  # fmt: skip
    with open_tls(front, tls_context(front), CHUNKED_CALLER) as conn:
        conn.sendall(head.encode())
        for _ in range(ATTACK_BYTES // len(chunk)):
            conn.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        answer = conn.recv(4096).decode(errors="replace")
    assert answer.startswith("HTTP/1.1 413"), answer[:200]
    line = log_line_with(front.work / "server" / "front.log", f"{CHUNKED_CALLER}:", " 413 ")
    read = int(line.split("body=")[1].split()[0])
    assert read <= MAX_BODY_BYTES + 2 * len(chunk), f"the front read {read:,} bytes before refusing"

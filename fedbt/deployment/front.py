"""The server's public front: nginx terminating TLS and passing on the Fleet API only.

Flower 1.41's SuperLink serves its Fleet API (what SuperNodes call), its Control API (submit,
stop and list runs, register sites) and its Runtime API (the ServerApp's) on one HTTPS port,
and the open-source SuperLink authorises nothing on Control. So `fedbt server` binds the
SuperLink to loopback, where only the server machine reaches Control, and puts this front on
the public address: requests under FLEET_PREFIX go to the SuperLink, every other path gets 403.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from fedbt.deployment.processes import DeploymentError

# The prefix of every Fleet API route of Flower 1.41's SuperLink (flwr/superlink/routers/fleet/router.py).
FLEET_PREFIX = "/v1/fleet/"
# Fleet calls each site makes often (polls, heartbeats, transfers, run checks): logged only
# when refused or failed (status 400 and above), like every other request is.
ROUTINE_FLEET_CALLS = (
    "get-run",  # every 5 s from each site with a task in training (flower_internals.StoppedRunWatcher)
    "pull-messages",
    "push-messages",
    "send-node-heartbeat",
    "pull-object",
    "push-object",
    "confirm-message-received",
)
# The largest request body the front lets through. A message travels as one request per object,
# and Flower cuts every array into chunks of at most 5 MiB (FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE):
# a packed ResNet50 update in float32 (94.3 MB) is 23 requests, the largest 5,242,993 bytes
# (tests/test_front_limits.py measures it). Three times that leaves room for Flower's framing to grow
# while a caller without a key can make the SuperLink hold at most this much per connection.
MAX_BODY_BYTES = 16 * 1024 * 1024
# TLS 1.2 with forward-secret AEAD suites only (ECDHE with AES-GCM or ChaCha20-Poly1305: Mozilla's
# "intermediate" profile without DHE); TLS 1.3 has nothing else. fedbt's certificates are ECDSA;
# the RSA twins serve an operator's own RSA certificate.
TLS_PROTOCOLS = "TLSv1.2 TLSv1.3"
TLS12_CIPHERS = ":".join(
    f"ECDHE-{auth}-{cipher}"
    for auth in ("ECDSA", "RSA")
    for cipher in ("AES128-GCM-SHA256", "AES256-GCM-SHA384", "CHACHA20-POLY1305")
)
# Where Debian and most distributions install nginx, off a non-root user's PATH.
NGINX_DIRS = ("/usr/sbin", "/usr/local/sbin")


@dataclass(frozen=True)
class Front:
    public_host: str
    public_port: int
    superlink_port: int  # the SuperLink's, on 127.0.0.1
    server_cert: Path
    server_key: Path
    ca_cert: Path
    workdir: Path  # nginx's prefix: its configuration, pid file and (unused) temp folders

    def config(self) -> str:
        listen = f"[{self.public_host}]" if ":" in self.public_host else self.public_host
        return f"""\
daemon off;
worker_processes 1;
pid front.pid;
error_log stderr notice;
events {{ worker_connections 256; }}
http {{
    # Who called what from where: every request but the sites' routine calls, and those too when
    # refused or failed (status 400 and above; 413 for a body over the limit, 401/403 for a bad key).
    map "$status $uri" $front_logs {{
        ~^[45] 1;
        "~^[0-9]+ {FLEET_PREFIX}({"|".join(ROUTINE_FLEET_CALLS)})$" 0;
        default 1;
    }}
    log_format front '$remote_addr:$remote_port [$time_iso8601] "$request" $status '
                     'body=$request_length sent=$bytes_sent $request_time s';
    access_log /dev/stderr front if=$front_logs;
    server_tokens off;
    client_body_temp_path tmp/body;
    proxy_temp_path tmp/proxy;
    fastcgi_temp_path tmp/fastcgi;
    uwsgi_temp_path tmp/uwsgi;
    scgi_temp_path tmp/scgi;
    server {{
        listen {listen}:{self.public_port} ssl;
        ssl_certificate {self.server_cert};
        ssl_certificate_key {self.server_key};
        ssl_protocols {TLS_PROTOCOLS};
        ssl_ciphers {TLS12_CIPHERS};
        ssl_prefer_server_ciphers off;
        ssl_session_tickets off;
        location {FLEET_PREFIX} {{
            # The SuperLink authenticates every Fleet call itself, after reading its body: a body
            # declared larger than the limit gets 413 before a byte of it is read, one sent in chunks
            # when it passes the limit. Below it, bodies stream through unbuffered.
            client_max_body_size {MAX_BODY_BYTES};
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            # The SuperLink's certificate names localhost; nginx checks IP addresses poorly.
            proxy_pass https://127.0.0.1:{self.superlink_port};
            # The SuperLink (uvicorn, which believes this header from 127.0.0.1 only) logs the caller's
            # address instead of the front's. Set, never appended to: a caller cannot add addresses.
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_ssl_verify on;
            proxy_ssl_name localhost;
            proxy_ssl_trusted_certificate {self.ca_cert};
        }}
        location / {{
            # Control, Runtime, health and docs: the server machine reaches them on loopback only.
            return 403;
        }}
    }}
}}
"""

    def command(self) -> list[str]:
        """nginx in the foreground with this front's configuration (written first)."""
        nginx = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), *NGINX_DIRS]))
        if nginx is None:
            raise DeploymentError("nginx not found: the server's public front needs it (apt-get install nginx)")
        (self.workdir / "tmp").mkdir(parents=True, exist_ok=True)
        config = self.workdir / "front.conf"
        config.write_text(self.config())
        return [nginx, "-p", f"{self.workdir}/", "-c", str(config), "-e", "stderr"]

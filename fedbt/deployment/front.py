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
# Fleet calls each site makes several times a second (polls, heartbeats, transfers): not logged.
UNLOGGED_FLEET_CALLS = (
    "pull-messages",
    "push-messages",
    "send-node-heartbeat",
    "pull-object",
    "push-object",
    "confirm-message-received",
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
    # Who called what from where (the SuperLink behind sees every caller as 127.0.0.1), except the
    # sites' polls and transfers, many a second.
    map $uri $front_logs {{
        ~^{FLEET_PREFIX}({"|".join(UNLOGGED_FLEET_CALLS)})$ 0;
        default 1;
    }}
    access_log /dev/stderr combined if=$front_logs;
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
        ssl_protocols TLSv1.2 TLSv1.3;
        location {FLEET_PREFIX} {{
            # Model transfers are large and the SuperLink authenticates every Fleet call itself:
            # stream them through, unbuffered and unbounded.
            client_max_body_size 0;
            proxy_request_buffering off;
            proxy_buffering off;
            proxy_http_version 1.1;
            proxy_read_timeout 300s;
            proxy_send_timeout 300s;
            # The SuperLink's certificate names localhost; nginx checks IP addresses poorly.
            proxy_pass https://127.0.0.1:{self.superlink_port};
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

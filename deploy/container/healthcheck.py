#!/usr/bin/env python3
"""The image's HEALTHCHECK: GET /healthz on this container's lepton HTTP port.

The port is $LEPTON_HEALTH_PORT (default 7480, a coordinator's --http-port; a worker
container sets it to its --metrics-port, 7490). With $LEPTON_TLS_DIR the port speaks
HTTPS with the node certificate, which is always valid for 127.0.0.1: it is checked
against the cluster CA there. /healthz needs no bearer token. Exit 0: healthy.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request

TIMEOUT_S = 3.0


def url_and_context() -> tuple[str, ssl.SSLContext | None]:
    port = int(os.environ.get("LEPTON_HEALTH_PORT", "7480"))
    tls_dir = os.environ.get("LEPTON_TLS_DIR")
    if not tls_dir:
        return f"http://127.0.0.1:{port}/healthz", None
    context = ssl.create_default_context(cafile=os.path.join(tls_dir, "ca.pem"))
    return f"https://127.0.0.1:{port}/healthz", context


def main() -> int:
    url, context = url_and_context()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S, context=context) as reply:
            healthy = reply.status == 200
    except (OSError, ValueError) as exc:
        print(f"lepton-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())

"""Network checks bounded in time: offline machines must fail in seconds, not minutes of retries."""

from __future__ import annotations

import os
import socket
import threading


def reachable(host: str, port: int = 443, timeout: float = 1.5) -> bool:
    """DNS + TCP connect to host:port within `timeout` seconds (a silent network otherwise hangs for minutes).
    CLASSFORGE_OFFLINE=1 skips the probe."""
    if os.environ.get("CLASSFORGE_OFFLINE") == "1":
        return False
    ok: list[bool] = []

    def probe():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)

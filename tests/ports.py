"""Loopback ports for the servers the tests (and the benchmark) start.

Our own node binds port 0 and reports the port it got; the independent peers (DCMTK tools,
Orthanc, PostgreSQL) must be told a port, so they take one that was free a moment ago.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])

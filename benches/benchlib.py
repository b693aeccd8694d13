"""Helpers shared by the Python benchmarks in this directory (auth_flood.py, idle.py)."""

import socket


def free_port():
    """A free TCP port on 127.0.0.1 (free now; the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid, field):
    """A memory figure of process `pid` from /proc/PID/status (VmRSS, VmHWM...), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def rss_kib(pid):
    """Resident memory of process `pid` (VmRSS), in KiB; 0 once it is gone."""
    return status_kib(pid, "VmRSS")

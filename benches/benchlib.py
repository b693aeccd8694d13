"""Helpers shared by the Python benchmarks in this directory (auth_flood.py, connections.py,
idle.py, latency.py)."""

import os
import socket
import subprocess
import sys
import time


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


def wait_listening(daemon, port, log_name, seconds=30):
    """Waits until the daemon (a Popen) accepts connections on 127.0.0.1:`port`; exits the
    benchmark, pointing at its log, if it dies or does not listen within `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline or daemon.poll() is not None:
                sys.exit("postern did not start; see " + log_name)
            time.sleep(0.1)


async def reply(reader):
    """Reads one (multi-line) SMTP reply from an asyncio reader; returns its code, or None at
    EOF."""
    while True:
        line = await reader.readline()
        if not line:
            return None
        if len(line) < 4 or line[3:4] != b"-":
            return int(line[:3])


def read_line(sock):
    """Reads from `sock` up to the end of a line (a greeting, a single-line reply), or EOF."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(512)
        if not chunk:
            break
        data += chunk
    return data


def start_daemon(binary, tmp, relay, config, env=None):
    """Writes TMP/config.toml (the server name and data directory, a relay listener on
    127.0.0.1:`relay`, then the TOML text `config`) and starts `binary serve` on it in `tmp`,
    its log in TMP/postern.log. Returns (the Popen, the open log file)."""
    path = os.path.join(tmp, "config.toml")
    with open(path, "w") as f:
        f.write(f"""
[server]
hostname = "postern.example.test"
data_dir = "data"
[[listener]]
addr = "127.0.0.1:{relay}"
mode = "relay"
{config}""")
    log = open(os.path.join(tmp, "postern.log"), "w")
    daemon = subprocess.Popen(
        [os.path.abspath(binary), "serve", "--config", path],
        stderr=log, cwd=tmp, env={**os.environ, **(env or {})},
    )
    return daemon, log

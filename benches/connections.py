#!/usr/bin/env python3
"""Many concurrent clients: CONNECTIONS clients connect at once, all are greeted, and then every
one of them sends a message while all the others are still connected.

    benches/connections.py [--bin target/release/postern] [--connections 10000] [--size 4096]
                           [--sink] [--limits "max_concurrent_data = 100"]

Starts `postern serve` on loopback in a temporary directory with the shipped limits, except:
`limits.max_connections` raised to CONNECTIONS + 16, `relay.networks` set to 127.0.0.0/8 (the
clients are the applications that relay through us), and a smarthost on a loopback port where
nobody listens (so every message is queued and deferred: what is measured is the sessions, not
the deliveries), or with --sink Postfix's smtp-sink there (the messages are delivered). Each client connects from its own loopback address (127.1.x.y), so the
per-address caps (20 open, 60 a minute) are not what limits the run.

Then:
- all CONNECTIONS clients connect and read their 220 greeting, one after another, and stay
  connected (the daemon holds them all);
- each sends EHLO, MAIL, RCPT and DATA pipelined, waits for 354, sends a SIZE-byte body and the
  terminator and QUIT, and reads the 250 and the 221: all clients at once, driven by one
  selector loop;
- the daemon's VmRSS is sampled every 50 ms throughout, and VmHWM (its peak) read at the end.

Prints how many clients were greeted, how many messages got 250, the replies of the others, how
long each phase took, and the RSS with all connected and at the peak. The process running this
needs a descriptor per client (raised to the hard limit here; the daemon inherits it, and raises
its own soft limit to the hard one anyway). Only loopback addresses are used. Not a test: run it
by hand.
"""

import argparse
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, read_line, rss_kib, start_daemon, status_kib, wait_listening  # noqa: E402


def source_address(i):
    """The i-th client's own loopback address: 127.1.0.1, 127.1.0.2, ... (never .0 or .255)."""
    return f"127.1.{i // 254}.{i % 254 + 1}"


def connect_all(port, n, pid, peak):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((source_address(i), 0))
        s.connect(("127.0.0.1", port))
        greeting = read_line(s)
        if not greeting.startswith(b"220"):
            sys.exit(f"client {i}: no greeting: {greeting!r}")
        socks.append(s)
        if i % 500 == 0:
            peak[0] = max(peak[0], rss_kib(pid))
    return socks


class Client:
    """One client's transaction: what it has read, and how far it has got."""

    def __init__(self, sock, body):
        self.sock = sock
        self.body = body
        self.buf = b""
        self.stage = "354"  # waiting for 354, then for the final reply
        self.result = None

    def replies(self):
        """Complete final reply lines read so far, consumed."""
        lines = []
        while b"\r\n" in self.buf:
            line, self.buf = self.buf.split(b"\r\n", 1)
            if line[3:4] != b"-":
                lines.append(line.decode(errors="replace"))
        return lines

    def on_readable(self):
        """Reads what arrived; returns True once this client is done."""
        try:
            chunk = self.sock.recv(4096)
        except (ConnectionResetError, BlockingIOError) as e:
            if isinstance(e, BlockingIOError):
                return False
            chunk = b""
        if not chunk:
            self.result = self.result or "(closed before the end)"
            return True
        self.buf += chunk
        for line in self.replies():
            if self.stage == "354":
                # EHLO, MAIL and RCPT answers come first; 354 (or a refusal of DATA) ends it.
                if line.startswith("354"):
                    self.sock.setblocking(True)
                    self.sock.sendall(self.body + b".\r\nQUIT\r\n")
                    self.sock.setblocking(False)
                    self.stage = "final"
                elif line.startswith(("4", "5")):
                    self.result = line[:9]
                    return True
            elif self.stage == "final":
                self.result = line[:9]
                self.stage = "quit"
            else:
                return True
        return False


def send_all(socks, size, pid, peak):
    body = b"Subject: one of many\r\n\r\n" + b"x" * 70 + b"\r\n"
    body += (b"y" * 78 + b"\r\n") * max(0, (size - len(body)) // 80)
    sel = selectors.DefaultSelector()
    clients = []
    for i, s in enumerate(socks):
        s.sendall(
            b"EHLO client.test\r\nMAIL FROM:<app@example.test>\r\n"
            + f"RCPT TO:<r{i}@dest.test>\r\n".encode()
            + b"DATA\r\n"
        )
        s.setblocking(False)
        c = Client(s, body)
        clients.append(c)
        sel.register(s, selectors.EVENT_READ, c)
    left = len(clients)
    next_sample = time.monotonic()
    deadline = time.monotonic() + 300
    while left:
        if time.monotonic() > deadline:
            sys.exit(f"{left} clients not done after 300 s")
        for key, _ in sel.select(timeout=0.05):
            if key.data.on_readable():
                sel.unregister(key.fileobj)
                key.fileobj.close()
                left -= 1
        if time.monotonic() >= next_sample:
            peak[0] = max(peak[0], rss_kib(pid))
            next_sample += 0.05
    results = {}
    for c in clients:
        results[c.result] = results.get(c.result, 0) + 1
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/postern")
    ap.add_argument("--connections", type=int, default=10000)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--limits", default="", help="more [limits] settings, e.g. 'max_concurrent_data = 100'")
    ap.add_argument("--sink", action="store_true",
                    help="deliver to Postfix's smtp-sink (counted) instead of deferring every message")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)  # the daemon runs in the temp directory
    if args.connections > 254 * 254:
        sys.exit("at most 64,516 clients (one loopback address each)")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        sys.exit(f"needs {want} open files; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    tmp = tempfile.mkdtemp(prefix="postern-conns-")
    relay, nobody = free_port(), free_port()
    sink = None
    if args.sink:
        sink = subprocess.Popen(
            ["smtp-sink", "-u", "nobody", "-c", f"127.0.0.1:{nobody}", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    daemon, log = start_daemon(args.bin, tmp, relay, f"""
[relay]
networks = ["127.0.0.0/8"]
[limits]
max_connections = {args.connections + 16}
{args.limits}
[delivery]
smarthost = ["127.0.0.1:{nobody}"]
tls = "none"
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
""", env={"RUST_LOG": "warn"})
    try:
        wait_listening(daemon, relay, log.name)
        time.sleep(0.5)
        start_rss = rss_kib(daemon.pid)
        peak = [start_rss]
        t0 = time.monotonic()
        socks = connect_all(relay, args.connections, daemon.pid, peak)
        connected = time.monotonic() - t0
        all_open = rss_kib(daemon.pid)
        t1 = time.monotonic()
        results = send_all(socks, args.size, daemon.pid, peak)
        sent = time.monotonic() - t1
        hwm = status_kib(daemon.pid, "VmHWM")
    finally:
        daemon.terminate()
        daemon.wait()
        if sink:
            sink.terminate()
            sink.wait()
    mib = lambda k: k / 1024
    accepted = sum(n for r, n in results.items() if r and r.startswith("250"))
    print(
        f"{args.connections} concurrent clients, {args.size}-byte messages, {args.bin}, "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"greeted {len(socks)} in {connected:.2f} s; messages accepted {accepted} of "
        f"{args.connections} in {sent:.2f} s; replies {results}"
    )
    print(
        f"RSS at start {mib(start_rss):.1f} MiB, with all connected {mib(all_open):.1f} MiB, "
        f"peak {mib(max(peak[0], hwm)):.1f} MiB (VmHWM {mib(hwm):.1f})"
    )
    print(f"(temp dir {tmp})")


if __name__ == "__main__":
    main()

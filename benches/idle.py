#!/usr/bin/env python3
"""Idle connections: the daemon's memory before, while 1,000 idle clients hold every slot, and
after the command timeout has closed them all.

    benches/idle.py [--bin target/release/postern] [--connections 1000] [--timeout 5] [--rounds 2]
                    [--settle 31]

Starts `postern serve` on loopback in a temporary directory with the shipped limits, except:
`relay.networks` narrowed to 127.0.0.1/32 (so the idle clients are outside clients, subject to
the per-address caps), `limits.command_timeout` set to TIMEOUT seconds (shipped: 5 minutes) so
a run takes seconds, and `limits.max_connections` raised to CONNECTIONS if it is above the
shipped 1,000. Then, ROUNDS times:

- CONNECTIONS clients connect from 127.0.1.1-127.0.1.254 (1,000 is 4 per address: under the
  shipped caps of 20 open and 60 a minute per address for up to 15 rounds a minute), read the
  220 greeting and send nothing more;
- the daemon's VmRSS (/proc/PID/status) is sampled every 50 ms until the server has closed
  every connection (each must get `421 4.4.2` and then EOF);
- once all are closed, one message is sent from 127.0.0.1 to check the daemon still serves,
  and the RSS is read SETTLE seconds later (default 31: the daemon hands freed memory back to
  the system every 30 s).

Prints, per round, the RSS before, the peak with the connections open, and after; and how long
the timeouts took to close them all. Several rounds tell a leak (RSS grows every round) from
memory the allocator keeps for reuse (it stops growing). The environment reaches the daemon:
MALLOC_ARENA_MAX=1 makes glibc keep one heap instead of one per thread that served sessions. Only loopback addresses are used. Not a test: run it by
hand (the test `idle_connections_are_closed_by_the_timeout_and_their_slots_freed` in
tests/abuse.rs checks the behaviour).
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
from benchlib import free_port, read_line, rss_kib, start_daemon, wait_listening  # noqa: E402


def open_idle(port, n):
    socks = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.1.{i % 254 + 1}", 0))
        s.connect(("127.0.0.1", port))
        greeting = read_line(s)
        if not greeting.startswith(b"220"):
            sys.exit(f"connection {i}: no greeting: {greeting!r}")
        socks.append(s)
    return socks


def wait_closed(socks, pid, limit):
    """Waits until the server has closed every socket; returns (peak RSS, seconds, replies)."""
    sel = selectors.DefaultSelector()
    received = {}
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
        received[s] = b""
    open_ = len(socks)
    peak = rss_kib(pid)
    replies = {}
    start = time.monotonic()
    next_sample = start
    while open_:
        if time.monotonic() - start > limit:
            sys.exit(f"{open_} connections still open after {limit} s")
        for key, _ in sel.select(timeout=0.05):
            sock = key.fileobj
            try:
                chunk = sock.recv(512)
            except ConnectionResetError:
                chunk = b""
            if chunk:
                received[sock] += chunk
                continue
            first = received.pop(sock).decode(errors="replace").split("\r\n")[0][:9] or "(EOF, no reply)"
            replies[first] = replies.get(first, 0) + 1
            sel.unregister(sock)
            sock.close()
            open_ -= 1
        if time.monotonic() >= next_sample:
            peak = max(peak, rss_kib(pid))
            next_sample += 0.05
    return peak, time.monotonic() - start, replies


def send_one(port):
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rwb")
    codes = []

    def reply():
        while True:
            line = f.readline()
            if not line:
                return None
            if line[3:4] != b"-":
                return int(line[:3])

    codes.append(reply())
    for line in ["EHLO bench.test", "MAIL FROM:<a@example.test>", "RCPT TO:<b@dest.test>", "DATA"]:
        f.write(line.encode() + b"\r\n")
        f.flush()
        codes.append(reply())
    f.write(b"Subject: after the idle clients\r\n\r\nhello\r\n.\r\nQUIT\r\n")
    f.flush()
    codes.append(reply())
    s.close()
    return codes[-1] == 250


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/postern")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--timeout", type=int, default=5, help="limits.command_timeout, seconds")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--settle", type=float, default=31, help="seconds before the RSS after")
    args = ap.parse_args()
    args.bin = os.path.abspath(args.bin)  # the daemon runs in the temp directory
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard) if hard != resource.RLIM_INFINITY else want, hard))
    tmp = tempfile.mkdtemp(prefix="postern-idle-")
    relay = free_port()
    max_connections = max(1000, args.connections)
    # The daemon needs a descriptor per connection too (raised above; inherited).
    daemon, log = start_daemon(args.bin, tmp, relay, f"""
[relay]
networks = ["127.0.0.1/32"]
[limits]
command_timeout = "{args.timeout}s"
max_connections = {max_connections}
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
""", env={"RUST_LOG": "warn"})
    rounds = []
    try:
        wait_listening(daemon, relay, log.name)
        if not send_one(relay):
            sys.exit("a message before the run was not accepted")
        time.sleep(1)
        for _ in range(args.rounds):
            before = rss_kib(daemon.pid)
            t0 = time.monotonic()
            socks = open_idle(relay, args.connections)
            opened = time.monotonic() - t0
            with_open = rss_kib(daemon.pid)
            peak, closing, replies = wait_closed(socks, daemon.pid, args.timeout + 60)
            ok = send_one(relay)
            time.sleep(args.settle)
            after = rss_kib(daemon.pid)
            rounds.append((before, with_open, peak, after, opened, opened + closing, replies, ok))
    finally:
        daemon.terminate()
        daemon.wait()
    mib = lambda k: k / 1024
    arena = os.environ.get("MALLOC_ARENA_MAX")
    print(
        f"{args.connections} idle connections from {min(254, args.connections)} addresses, command_timeout {args.timeout} s, "
        f"{args.bin}{f', MALLOC_ARENA_MAX={arena}' if arena else ''}, {os.cpu_count()} CPUs"
    )
    for i, (before, with_open, peak, after, opened, closed, replies, ok) in enumerate(rounds, 1):
        print(
            f"round {i}: RSS before {mib(before):.1f} MiB, with all open {mib(with_open):.1f} MiB "
            f"(peak {mib(peak):.1f}), after the timeouts {mib(after):.1f} MiB; "
            f"opened in {opened:.2f} s, all closed {closed:.2f} s after the first connect; "
            f"replies {replies}; message afterwards {'accepted' if ok else 'NOT ACCEPTED'}"
        )
    print(f"(temp dir {tmp})")


if __name__ == "__main__":
    main()

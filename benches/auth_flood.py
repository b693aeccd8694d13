#!/usr/bin/env python3
"""AUTH flood: daemon memory and a legitimate client's latency while hundreds of connections
guess passwords.

    benches/auth_flood.py [--bin target/debug/postern] [--connections 300] [--seconds 20]

Starts `postern serve` on loopback in a temporary directory with the shipped limits (only
`relay.networks` narrowed to 127.0.0.1/32, so the guessers are outside clients). Then:

- CONNECTIONS guessers, spread over the source addresses 127.0.1.1-127.0.1.254, each in a loop:
  connect to the submission port, EHLO, STARTTLS, EHLO, then AUTH PLAIN with wrong passwords
  until the server closes the connection; reconnect at once, whatever the reply.
- Every 2 s, from 127.0.0.1: one message with STARTTLS + AUTH (right password) on the
  submission port, and one plain relay submission; each timed from connect to the 250.
- The daemon's VmRSS (/proc/PID/status) is sampled every 100 ms.

Prints the RSS before, the peak during the flood, and the slowest and median legitimate
submissions. Target (issue 13): peak under 150 MiB, every legitimate message under 1 s.
Only loopback addresses are used. Not a test: run it by hand, once.
"""

import argparse
import asyncio
import base64
import os
import re
import ssl
import statistics
import subprocess
import sys
import tempfile
import time

PASSWORD = "the right password"


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, reply, rss_kib, start_daemon, wait_listening  # noqa: E402


async def command(reader, writer, line):
    writer.write(line.encode() + b"\r\n")
    await writer.drain()
    return await reply(reader)


async def starttls(reader, writer, tls):
    await command(reader, writer, "EHLO bench.test")
    if await command(reader, writer, "STARTTLS") != 220:
        return False
    await writer.start_tls(tls, server_hostname="localhost")
    return await command(reader, writer, "EHLO bench.test") == 250


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def guesser(i, port, tls, stop, counts):
    source = f"127.0.1.{i % 254 + 1}"
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
        except OSError:
            await asyncio.sleep(0.05)
            continue
        try:
            if await reply(reader) != 220 or not await starttls(reader, writer, tls):
                counts["refused"] += 1
                continue
            while not stop.is_set():
                code = await command(reader, writer, f"AUTH PLAIN {plain('app', f'guess{i}')}")
                counts[code] = counts.get(code, 0) + 1
                if code != 535:
                    break
        except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
            counts["errors"] += 1
        finally:
            writer.close()


async def legit(port, tls, auth):
    """One message from 127.0.0.1; returns seconds from connect to 250, or None on failure."""
    start = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.1", 0))
    try:
        if await reply(reader) != 220:
            return None
        if auth:
            if not await starttls(reader, writer, tls):
                return None
            if await command(reader, writer, f"AUTH PLAIN {plain('app', PASSWORD)}") != 235:
                return None
        else:
            await command(reader, writer, "EHLO bench.test")
        for line, want in [("MAIL FROM:<a@example.test>", 250), ("RCPT TO:<b@dest.test>", 250), ("DATA", 354)]:
            if await command(reader, writer, line) != want:
                return None
        code = await command(reader, writer, "Subject: legit\r\n\r\nhello\r\n.")
        await command(reader, writer, "QUIT")
        return time.monotonic() - start if code == 250 else None
    finally:
        writer.close()


async def flood(args, pid, ports, tls):
    relay, submission = ports
    stop = asyncio.Event()
    counts = {"refused": 0, "errors": 0}
    samples = []

    async def sample():
        while not stop.is_set():
            samples.append(rss_kib(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    guessers = [asyncio.create_task(guesser(i, submission, tls, stop, counts)) for i in range(args.connections)]
    timings = {"auth": [], "relay": []}
    failures = 0
    end = time.monotonic() + args.seconds
    await asyncio.sleep(2)
    while time.monotonic() < end:
        for kind, port in (("auth", submission), ("relay", relay)):
            t = await asyncio.wait_for(legit(port, tls, kind == "auth"), 30)
            if t is None:
                failures += 1
            else:
                timings[kind].append(t)
        await asyncio.sleep(2)
    stop.set()
    await asyncio.wait(guessers, timeout=10)
    sampler.cancel()
    return samples, timings, failures, counts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/debug/postern")
    ap.add_argument("--connections", type=int, default=300)
    ap.add_argument("--seconds", type=int, default=20)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="postern-authflood-")
    hashed = subprocess.run([args.bin, "account", "hash"], input=PASSWORD + "\n", capture_output=True, text=True, check=True).stdout.strip()
    relay, submission = free_port(), free_port()
    daemon, log = start_daemon(args.bin, tmp, relay, f"""
[[listener]]
addr = "127.0.0.1:{submission}"
mode = "submission"
[relay]
networks = ["127.0.0.1/32"]
[dns]
nameservers = ["127.0.0.1:9"]
timeout = "1s"
[[account]]
username = "app"
password_hash = "{hashed}"
""", env={"RUST_LOG": "warn"})
    try:
        wait_listening(daemon, submission, log.name)
        time.sleep(0.5)
        before = rss_kib(daemon.pid)
        tls = ssl.create_default_context()
        tls.check_hostname = False
        tls.verify_mode = ssl.CERT_NONE
        samples, timings, failures, counts = asyncio.run(flood(args, daemon.pid, (relay, submission), tls))
        after = rss_kib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait()
    mib = lambda k: k / 1024
    print(f"guessers: {args.connections} connections from 254 addresses for {args.seconds} s")
    print(f"AUTH replies seen by guessers: {dict(sorted((str(k), v) for k, v in counts.items()))}")
    print(f"RSS: before {mib(before):.1f} MiB, peak {mib(max(samples)):.1f} MiB, after {mib(after):.1f} MiB")
    for kind, ts in timings.items():
        if ts:
            print(f"legitimate {kind:5}: {len(ts)} messages, median {statistics.median(ts)*1000:.0f} ms, slowest {max(ts)*1000:.0f} ms")
    print(f"legitimate failures: {failures}")
    ok = max(samples) < 150 * 1024 and failures == 0 and all(max(ts) < 1 for ts in timings.values() if ts)
    print("target met" if ok else "TARGET MISSED")
    print(f"(temp dir {tmp})")


if __name__ == "__main__":
    main()

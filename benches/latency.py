#!/usr/bin/env python3
"""Latency of the durable store: time from a client's end of data to Postern's `250`, at a
steady rate (issue 14's figure: p99 at or under 2 ms at 200 msg/s).

    benches/latency.py [--bin target/release/postern] [--rate 200] [--seconds 20]
                       [--connections 10] [--size 4096]

Starts `postern serve` on loopback in a temporary directory (shipped limits, relay listener,
a smarthost) and a minimal SMTP sink in this script that takes everything, so that the daemon
also delivers what it accepts, as in production. Then RATE messages a second for SECONDS
seconds, spread over CONNECTIONS client connections kept open (one transaction after another
on each), SIZE bytes each. For every message the clock runs from the write of the final
`.` CRLF to the `250` (the spool's group commit and fdatasync are inside it). Prints the count
and p50, p90, p99 and the slowest, in milliseconds. Only loopback addresses are used. The
`250` only comes once the message is on disk, so the figure depends on the disk: report the
filesystem with it.
"""

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import free_port, reply, start_daemon, wait_listening  # noqa: E402


async def sink_session(reader, writer):
    """Takes every message: the smarthost the daemon delivers to."""
    try:
        await sink_conversation(reader, writer)
    except (asyncio.CancelledError, ConnectionError):
        pass  # the run is over, or the daemon went away


async def sink_conversation(reader, writer):
    writer.write(b"220 sink ESMTP\r\n")
    in_data = False
    while True:
        line = await reader.readline()
        if not line:
            break
        if in_data:
            if line == b".\r\n":
                in_data = False
                writer.write(b"250 2.0.0 taken\r\n")
            continue
        verb = line[:4].upper()
        if verb == b"DATA":
            in_data = True
            writer.write(b"354 go on\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 bye\r\n")
            break
        elif verb == b"EHLO":
            writer.write(b"250-sink\r\n250 PIPELINING\r\n")
        else:
            writer.write(b"250 ok\r\n")
        await writer.drain()
    writer.close()


async def client(port, queue, body, timings):
    """One connection: takes due messages off the queue and times each end of data."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await reply(reader)
    writer.write(b"EHLO bench.test\r\n")
    await reply(reader)
    while True:
        due = await queue.get()
        if due is None:
            break
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        for line in (b"MAIL FROM:<bench@example.test>", b"RCPT TO:<r@dest.test>", b"DATA"):
            writer.write(line + b"\r\n")
            await writer.drain()
            await reply(reader)
        writer.write(body)
        await writer.drain()
        start = time.monotonic()
        writer.write(b".\r\n")
        await writer.drain()
        code = await reply(reader)
        elapsed = time.monotonic() - start
        if code != 250:
            sys.exit(f"end of data answered {code}")
        timings.append(elapsed)
    writer.write(b"QUIT\r\n")
    await writer.drain()
    writer.close()


async def load(args, port):
    line = b"x" * 76 + b"\r\n"
    body = b"Subject: latency\r\n\r\n" + line * max(1, args.size // len(line))
    queue = asyncio.Queue()
    start = time.monotonic() + 0.5
    total = args.rate * args.seconds
    for i in range(total):
        queue.put_nowait(start + i / args.rate)
    for _ in range(args.connections):
        queue.put_nowait(None)
    timings = []
    await asyncio.gather(*(client(port, queue, body, timings) for _ in range(args.connections)))
    return timings


async def run(args, relay, sink_port):
    sink = await asyncio.start_server(sink_session, "127.0.0.1", sink_port)
    timings = await load(args, relay)
    sink.close()
    return timings


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default="target/release/postern")
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--connections", type=int, default=10)
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="postern-latency-")
    relay, sink_port = free_port(), free_port()
    daemon, log = start_daemon(args.bin, tmp, relay, f"""
[relay]
networks = ["127.0.0.1/32"]
[delivery]
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
""")
    try:
        wait_listening(daemon, relay, log.name)
        timings = asyncio.run(run(args, relay, sink_port))
    finally:
        daemon.terminate()
        daemon.wait()
    ms = sorted(t * 1000 for t in timings)
    pct = lambda p: ms[min(len(ms) - 1, int(p / 100 * len(ms)))]
    fs = subprocess.run(["df", "-T", tmp], capture_output=True, text=True).stdout.split("\n")[1].split()[1]
    print(f"{len(ms)} messages of {args.size} bytes at {args.rate}/s over {args.connections} connections, data on {fs}")
    print(f"end of data to 250: p50 {statistics.median(ms):.2f} ms, p90 {pct(90):.2f} ms, p99 {pct(99):.2f} ms, slowest {ms[-1]:.2f} ms")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

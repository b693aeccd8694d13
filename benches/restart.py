#!/usr/bin/env python3
"""Restart over a big queue: how long `postern serve` takes to listen, and how much memory it
holds, with MESSAGES messages already in the spool (issue #10: 1,000,000 in at most 10 s and
200 MiB).

    benches/restart.py [--bin target/release/postern] [--fill target/release/deps/spool_fill-*]
                       [--messages 1000000] [--size 4096] [--deferred] [--cold] [--after 10]
                       [--dir DIR]

Builds the spool with the `spool_fill` bench program (`cargo bench --bench spool_fill --no-run`
builds it; its path is found under target/release/deps when --fill is not given), unless DIR
already holds one from an earlier run with the same figures. Then starts the daemon over it and
prints:

- the time from exec to the relay listener accepting a connection (polled every 5 ms);
- VmRSS at that moment, and the peak (VmHWM) AFTER seconds later, while the daemon works
  through the queue. Delivery goes to a smarthost on a closed loopback port, so every attempt
  fails at once and is deferred: the queue's working set is under full load, and nothing
  leaves the machine.

--deferred gives every message the state record of one failed attempt (a queue after an
outage); --cold drops the page cache before the start (root only), as after a reboot. Only
loopback addresses are used. Not a test: run it by hand.
"""

import argparse
import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from benchlib import free_port, rss_kib, status_kib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find_fill(given):
    if given:
        return given
    found = [p for p in glob.glob(f"{ROOT}/target/release/deps/spool_fill-*") if os.access(p, os.X_OK) and not p.endswith(".d")]
    if not found:
        sys.exit("restart.py: spool_fill not built (cargo bench --bench spool_fill --no-run)")
    return max(found, key=os.path.getmtime)


def fill(args, data):
    stamp = os.path.join(data, "filled")
    want = f"{args.messages} {args.size} {args.deferred}"
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(f"spool already filled in {data}: {want}")
        return
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data, mode=0o700)
    cmd = [find_fill(args.fill), "--data-dir", data, "--messages", str(args.messages), "--size", str(args.size)]
    if args.deferred:
        cmd.append("--deferred")
    subprocess.run(cmd, check=True)
    with open(stamp, "w") as f:
        f.write(want)


def write_config(path, data, relay, closed, extra):
    with open(path, "w") as f:
        f.write(f"""[server]
hostname = "bench.postern.test"
data_dir = "{data}"
[[listener]]
addr = "127.0.0.1:{relay}"
mode = "relay"
[relay]
networks = ["127.0.0.0/8"]
[delivery]
smarthost = "127.0.0.1:{closed}"
tls = "none"
{extra}
""")


def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.05):
            return True
    except OSError:
        return False


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bin", default=f"{ROOT}/target/release/postern")
    p.add_argument("--fill")
    p.add_argument("--messages", type=int, default=1_000_000)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--deferred", action="store_true")
    p.add_argument("--cold", action="store_true")
    p.add_argument("--after", type=float, default=10)
    p.add_argument("--dir")
    p.add_argument("--extra", default="", help="lines added to [delivery] of the daemon's config")
    args = p.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="postern-restart-", dir=f"{ROOT}/target")
    data = os.path.join(work, "data")
    fill(args, data)
    relay, closed = free_port(), free_port()
    config = os.path.join(work, "config.toml")
    write_config(config, data, relay, closed, args.extra)
    if args.cold:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    log = open(os.path.join(work, "log"), "w")
    start = time.monotonic()
    daemon = subprocess.Popen([args.bin, "serve", "--config", config], stdout=log, stderr=log)
    try:
        while not listening(relay):
            if daemon.poll() is not None:
                sys.exit(f"restart.py: the daemon exited ({daemon.returncode}); see {work}/log")
            if time.monotonic() - start > 600:
                sys.exit("restart.py: not listening after 600 s")
            time.sleep(0.005)
        took = time.monotonic() - start
        rss = rss_kib(daemon.pid)
        time.sleep(args.after)
        peak, after = status_kib(daemon.pid, "VmHWM"), rss_kib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
        # The daemon has worked on the queue: the next run fills it afresh.
        os.remove(os.path.join(data, "filled"))
    kind = "deferred" if args.deferred else "fresh"
    print(f"restart over {args.messages} {kind} messages of {args.size} B ({'cold' if args.cold else 'warm'} cache): "
          f"listening after {took:.2f} s, RSS {rss / 1024:.0f} MiB then; "
          f"{args.after:.0f} s later RSS {after / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB")
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

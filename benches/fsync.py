#!/usr/bin/env python3
"""What a group commit's fdatasync costs, appending to a growing file against overwriting one
whose blocks were zeroed ahead (as the spool does with its spare segments, src/spool/spare.rs).

    benches/fsync.py [--dir /tmp] [--syncs 600] [--record 4400] [--batch 5] [--rounds 2]

Each round, for each kind of file: BATCH records of RECORD random bytes are written with one
pwrite at the end of what was written so far, then fdatasync, SYNCS times. Prints per sync: the
wall time, this process's CPU (user + system, from getrusage) and its voluntary context switches
(each is a sleep in the kernel waiting for the disk). The zeroed file is written and synced
whole before the clock starts, as the spare is before it becomes a segment. The files go in DIR
(use the filesystem the spool is on) and are removed.
"""

import argparse
import os
import resource
import time


def run(directory, zeroed, syncs, record, batch):
    path = os.path.join(directory, f"postern-fsync-bench-{os.getpid()}-{int(zeroed)}")
    fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_RDWR, 0o600)
    try:
        if zeroed:
            chunk = b"\0" * (1 << 20)
            for _ in range(syncs * batch * record // len(chunk) + 1):
                os.write(fd, chunk)
            os.fsync(fd)
        data = os.urandom(record * batch)
        wall0, use0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        for i in range(syncs):
            os.pwrite(fd, data, i * len(data))
            os.fdatasync(fd)
        wall1, use1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    finally:
        os.close(fd)
        os.unlink(path)
    cpu = (use1.ru_utime - use0.ru_utime) + (use1.ru_stime - use0.ru_stime)
    sleeps = use1.ru_nvcsw - use0.ru_nvcsw
    kind = "zeroed ahead" if zeroed else "growing"
    print(f"{kind:13} {syncs} syncs: wall {(wall1 - wall0) / syncs * 1e6:4.0f} us/sync, "
          f"cpu {cpu / syncs * 1e6:4.0f} us/sync, sleeps {sleeps / syncs:.1f}/sync")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--syncs", type=int, default=600)
    ap.add_argument("--record", type=int, default=4400)
    ap.add_argument("--batch", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    for _ in range(args.rounds):
        for zeroed in (False, True):
            run(args.dir, zeroed, args.syncs, args.record, args.batch)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Verifies every DKIM-Signature of a message with dkimpy, a verifier independent of Postern's
signer. Key records are served from a JSON file instead of DNS.

Usage: dkim_verify.py RECORDS.json < message
RECORDS.json maps "selector._domainkey.domain." to the TXT value.
Prints JSON: {"results": [true|false, ...], "domains": [...]}.
"""
import json
import sys

import dkim


def main():
    records = json.load(open(sys.argv[1]))
    message = sys.stdin.buffer.read()

    def dnsfunc(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        value = records.get(name) or records.get(name.rstrip(".") + ".")
        return value.encode() if value else None

    d = dkim.DKIM(message)
    count = sum(1 for (k, _) in d.headers if k.lower() == b"dkim-signature")
    results, domains = [], []
    for i in range(count):
        try:
            ok = d.verify(idx=i, dnsfunc=dnsfunc)
        except dkim.DKIMException as e:
            print(f"signature {i}: {e}", file=sys.stderr)
            ok = False
        results.append(bool(ok))
        domains.append(d.domain.decode() if d.domain else None)
    print(json.dumps({"results": results, "domains": domains}))


if __name__ == "__main__":
    main()

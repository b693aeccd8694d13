#!/usr/bin/env python3
"""Reads a delivery status notification on stdin with Python's email package (a parser
independent of Postern) and prints what it found as JSON."""
import json
import sys
from email import message_from_bytes, policy


def main():
    msg = message_from_bytes(sys.stdin.buffer.read(), policy=policy.default)
    out = {
        "content_type": msg.get_content_type(),
        "report_type": msg.get_param("report-type"),
        "to": str(msg["To"]),
        "subject": str(msg["Subject"]),
        "auto_submitted": str(msg["Auto-Submitted"]),
        "defects": [type(d).__name__ for d in msg.defects],
        "parts": [],
        "recipients": [],
        "per_message": {},
        "original_headers": "",
    }
    for part in msg.iter_parts():
        ctype = part.get_content_type()
        out["parts"].append(ctype)
        if ctype == "message/delivery-status":
            blocks = part.get_payload()
            out["per_message"] = {k.lower(): str(v) for k, v in blocks[0].items()}
            for block in blocks[1:]:
                out["recipients"].append({k.lower(): str(v) for k, v in block.items()})
        elif ctype == "text/rfc822-headers":
            out["original_headers"] = part.get_payload()
    print(json.dumps(out))


if __name__ == "__main__":
    main()

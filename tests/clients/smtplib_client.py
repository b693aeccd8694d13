#!/usr/bin/env python3
"""Sends one message to Postern with Python's smtplib, an SMTP client independent of ours.

Usage: smtplib_client.py MODE PORT CAFILE MARKER [USER PASSWORD]
MODE: plain | starttls | ssl | utf8
Prints the server's reply to the end of data (code and text) on success; exits 1 on failure.
"""
import smtplib
import ssl
import sys
from email.message import EmailMessage


def main():
    mode, port, cafile, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    user, password = (sys.argv[5], sys.argv[6]) if len(sys.argv) > 6 else (None, None)
    ctx = ssl.create_default_context(cafile=cafile)
    msg = EmailMessage()
    msg["Subject"] = "smtplib " + mode
    msg["From"] = "py-sender@example.test"
    if mode == "utf8":
        msg["To"] = "empfänger@bücher.test"
        msg.set_content("Grüße " + marker + "\n", cte="8bit")
    else:
        msg["To"] = "py-rcpt@dest.test"
        msg.set_content("hello " + marker + "\n.leading dot\n")

    if mode == "ssl":
        # "localhost" so that the certificate's name checks out (smtplib verifies against host).
        client = smtplib.SMTP_SSL("localhost", port, context=ctx, timeout=10)
    else:
        client = smtplib.SMTP("localhost", port, timeout=10)
    with client:
        client.ehlo("python.test")
        if mode == "starttls":
            client.starttls(context=ctx)
            client.ehlo("python.test")
        if user:
            client.login(user, password)
        # send_message adds SMTPUTF8 and BODY=8BITMIME itself for international addresses.
        options = []
        refused = client.send_message(msg, mail_options=options)
        if refused:
            print("refused:", refused)
            return 1
        print("250 accepted")
    return 0


if __name__ == "__main__":
    sys.exit(main())

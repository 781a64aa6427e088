"""A real SMTP server (aiosmtpd) on loopback for the mail tests.

Usage: smtp_server.py PORT OUT_DIR
Every accepted message is parsed as a mail client would (Python's email package) and written
to OUT_DIR/NNNN.json: envelope recipients, headers, the text and HTML parts, attachment names.
Recipients whose local part is "reject" are refused with 550 (permanent). Prints "ready" when
listening; runs until killed.
"""
import email
import email.policy
import json
import os
import sys
import time

from aiosmtpd.controller import Controller


class Handler:
    def __init__(self, out):
        self.out = out
        self.n = 0

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address.split("@")[0] == "reject":
            return "550 5.1.1 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        parts = {"text": None, "html": None, "attachments": []}
        for part in msg.walk():
            if part.is_multipart():
                continue
            if part.get_filename():
                parts["attachments"].append(
                    {"name": part.get_filename(), "bytes": len(part.get_payload(decode=True))}
                )
            elif part.get_content_type() == "text/plain":
                parts["text"] = part.get_content()
            elif part.get_content_type() == "text/html":
                parts["html"] = part.get_content()
        record = {
            "rcpt": envelope.rcpt_tos,
            "from": str(msg["From"]),
            "to": str(msg["To"]),
            "subject": str(msg["Subject"]),
            "message_id": str(msg["Message-ID"]),
            "content_type": msg.get_content_type(),
            **parts,
        }
        self.n += 1
        tmp = os.path.join(self.out, f".{self.n:04d}.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f)
        os.rename(tmp, os.path.join(self.out, f"{self.n:04d}-{os.getpid()}.json"))
        return "250 Message accepted"


def main():
    port, out = int(sys.argv[1]), sys.argv[2]
    os.makedirs(out, exist_ok=True)
    controller = Controller(Handler(out), hostname="127.0.0.1", port=port)
    controller.start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        controller.stop()


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A small client of Ferry's control socket (docs/control.md), as an orchestrator would
use it: migrate one guest and follow its progress, and cancel another's migration.

    python3 examples/ferry_control.py \\
        --migrate /tmp/a.sock 127.0.0.1:7701 --cancel /tmp/b.sock 127.0.0.1:7702 \\
        --transport tcp --insecure

Requests are one JSON object per line; answers are JSON lines too. A `migrate` request
streams `progress` events and ends with a `report`. Only the standard library is used.
"""

import argparse
import json
import socket
import sys
import threading
import time


class Guest:
    """One guest process, reached through its control socket."""

    def __init__(self, path):
        self.path = path

    def _lines(self, request):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(self.path)
            s.sendall((json.dumps(request) + "\n").encode())
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        yield json.loads(line)

    def request(self, request):
        """Sends one request and returns its last answer."""
        last = None
        for last in self._lines(request):
            pass
        return last

    def status(self):
        return self.request({"op": "status"})

    def cancel(self):
        return self.request({"op": "cancel"})

    def set(self, max_bandwidth=None, downtime=None):
        return self.request(
            {"op": "set", "max_bandwidth": max_bandwidth, "downtime": downtime}
        )

    def migrate(self, to, args, on_progress=None):
        """Migrates the guest to `to` with migration `args` (any field left out takes
        the command line's default); returns the report."""
        for event in self._lines({"op": "migrate", "to": to, "args": args}):
            if event.get("event") == "progress" and on_progress:
                on_progress(event["progress"])
            elif event.get("event") == "report":
                return event["report"]
            elif event.get("event") == "error":
                raise RuntimeError(event.get("message"))
        raise RuntimeError("the guest closed the socket without a report")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--migrate", nargs=2, metavar=("SOCKET", "ADDR"), required=True)
    p.add_argument("--cancel", nargs=2, metavar=("SOCKET", "ADDR"), required=True)
    p.add_argument("--transport", default="tls")
    p.add_argument("--insecure", action="store_true")
    a = p.parse_args()
    peer = {"transport": a.transport, "insecure": a.insecure}

    # The migration to cancel: slow on purpose, in a thread of its own.
    victim = Guest(a.cancel[0])
    outcome = {}

    def slow():
        try:
            outcome["report"] = victim.migrate(
                a.cancel[1], {"peer": peer, "max_bandwidth": "20Mbit"}
            )
        except RuntimeError as e:
            outcome["error"] = str(e)

    t = threading.Thread(target=slow)
    t.start()
    deadline = time.time() + 20
    while (victim.status() or {}).get("state") != "migrating":
        if time.time() > deadline:
            sys.exit("the migration to cancel never started")
        time.sleep(0.05)
    time.sleep(0.5)
    live = victim.status()["migration"]
    print(f"cancelling {a.cancel[0]}: {live['phase']} round {live['round']}, "
          f"{live['bytes_on_wire']} bytes sent")
    answer = victim.cancel()
    print(f"  cancel: {answer.get('event')}: {answer.get('message')}")

    # The migration to follow.
    phases = []

    def on_progress(r):
        if r.get("event") == "round-done":
            phases.append(r["phase"])
            print(f"  {a.migrate[0]}: round {r['index']} {r['phase']}: "
                  f"{r['sent']} units, {r['bytes']} bytes, {r['ms']:.1f} ms")

    report = Guest(a.migrate[0]).migrate(a.migrate[1], {"peer": peer}, on_progress)
    print(f"migrated {a.migrate[0]}: ok={report['ok']} verified={report['verified']} "
          f"downtime {report['downtime_ms']:.1f} ms")
    t.join(60)
    cancelled = outcome.get("report", {})
    print(f"cancelled {a.cancel[0]}: cancelled={cancelled.get('cancelled')} "
          f"source_resumed={cancelled.get('source_resumed')}")
    ok = (
        report["ok"]
        and report["verified"]
        and "memory" in phases
        and cancelled.get("cancelled") is True
        and cancelled.get("source_resumed") is True
        and victim.status()["state"] == "running"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()

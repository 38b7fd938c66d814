"""What the benchmark scripts share: a minimal synchronous QMP client.

Imported by scripts/bench_checkpoint.py and scripts/bench_peers.py (which run
from this directory, so it is on their import path).
"""

import json
import socket


class Qmp:
    """One command at a time over a QMP Unix socket; events are kept in
    `events` until `wait_event` consumes them."""

    def __init__(self, path, timeout=60):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        self.events = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise RuntimeError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QMP socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def cmd(self, name, args=None, check=True):
        """The command's `return`; with check=False, an error reply is
        returned whole instead of raised."""
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                if check:
                    raise RuntimeError(f"{name}: {reply['error'].get('desc')}")
                return reply
            return reply.get("return")

    def wait_event(self, pred):
        """The first event (kept or still to come) for which pred is true;
        it and the events before it are consumed."""
        while True:
            for i, e in enumerate(self.events):
                if pred(e):
                    del self.events[: i + 1]
                    return e
            self.events.append(self._read())

    def close(self):
        self.sock.close()

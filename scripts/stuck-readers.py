#!/usr/bin/env python3
"""What subscribers that never read pin in ssed's memory.

Starts an `ssed` (heartbeats and budget off, a long write timeout),
publishes EVENTS events of SIZE bytes to one topic, then opens N
connections with a 4 KiB receive window that resume from an unknown id
(`Last-Event-ID: junk`: a reset notice, then the whole history) and never
read. Reports the server's peak RSS growth (VmHWM, reset first) per stuck
stream. The server is stopped by PID at the end; the run is bounded.

    python3 scripts/stuck-readers.py [--server BIN] [--streams N]
                                     [--events M] [--size BYTES]

Defaults: target/release/ssed, 50 streams, 300 events of 64,000 bytes
(19 MB of history).
"""

import argparse
import socket
import subprocess
import sys
import tempfile
import time


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise SystemExit(f"stuck-readers: no {field} in /proc/{pid}/status")


def listening(log_path, deadline):
    while time.time() < deadline:
        with open(log_path) as f:
            for line in f:
                if "listening on " in line:
                    host, port = line.split("listening on ")[1].split()[0].rsplit(":", 1)
                    return host, int(port)
        time.sleep(0.05)
    raise SystemExit("stuck-readers: the server did not start")


def publish(addr, topic, body, count):
    s = socket.create_connection(addr, timeout=10)
    head = (
        f"POST /publish/{topic} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    for _ in range(count):
        s.sendall(head + body)
        answer = b""
        while not (b"\r\n\r\n" in answer and answer.endswith(b"}")):
            chunk = s.recv(4096)
            if not chunk:
                raise SystemExit("stuck-readers: the server closed the publisher")
            answer += chunk
        if not answer.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"stuck-readers: publish refused: {answer[:200]!r}")
    s.close()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--server", default="target/release/ssed")
    p.add_argument("--streams", type=int, default=50)
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--size", type=int, default=64_000)
    a = p.parse_args()

    work = tempfile.mkdtemp(prefix="ssed-stuck-")
    config = f"{work}/ssed.toml"
    with open(config, "w") as f:
        f.write(
            'listen = "127.0.0.1:0"\nheartbeat = "0"\nretry = "0"\n'
            'max_execution_time = "0"\nwrite_timeout = "60s"\n'
        )
    log = open(f"{work}/server.log", "w")
    server = subprocess.Popen(
        [a.server, "--config", config], stderr=log, stdin=subprocess.DEVNULL
    )
    socks = []
    try:
        addr = listening(f"{work}/server.log", time.time() + 10)
        publish(addr, "big", b"x" * a.size, a.events)
        time.sleep(0.5)
        before = status_kib(server.pid, "VmRSS")
        with open(f"/proc/{server.pid}/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS: the peak from here on
        request = (
            "GET /events/big HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Accept: text/event-stream\r\nLast-Event-ID: junk\r\n\r\n"
        ).encode()
        for _ in range(a.streams):
            c = socket.socket()
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            c.connect(addr)
            c.sendall(request)
            socks.append(c)
        time.sleep(3)  # every stream writes until its client's window is full
        peak = status_kib(server.pid, "VmHWM") - before
        now = status_kib(server.pid, "VmRSS") - before
        print(
            f"{a.server}: {a.streams} stuck subscribers resuming {a.events} x "
            f"{a.size} B: peak RSS +{peak} KiB ({peak / a.streams:.1f} KiB per "
            f"stream), now +{now} KiB"
        )
    finally:
        for c in socks:
            c.close()
        server.kill()
        server.wait()
        log.close()


if __name__ == "__main__":
    sys.exit(main())

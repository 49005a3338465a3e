#!/usr/bin/env python3
"""Time from connecting to a stream's response head, for N subscribes in a row.

    python3 scripts/subscribe-latency.py PORT [N] [LAST_EVENT_ID]

Against an ssed already listening on 127.0.0.1:PORT (for instance
`target/static/ssed --config c.toml --listen 127.0.0.1:18600`, with or
without `[redis]`). Each subscribe opens a connection, asks for
/events/latN (20 topics in turn), reads up to the end of the head and
closes. With SSED_SUBSCRIBE_TOKEN set, it goes as a Bearer token (a JWT,
say). Prints p50, p90 and p99 in microseconds. Bounded by N (default
1000); stops by itself.
"""
import os
import socket
import sys
import time


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    port = int(sys.argv[1])
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    last = sys.argv[3] if len(sys.argv) > 3 else None
    token = os.environ.get("SSED_SUBSCRIBE_TOKEN")
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        head = f"GET /events/lat{i % 20} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
        if last:
            head += f"Last-Event-ID: {last}\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        s.sendall((head + "\r\n").encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            d = s.recv(4096)
            if not d:
                break
            buf += d
        times.append((time.perf_counter() - t0) * 1e6)
        s.close()
    times.sort()
    print(f"subscribes {n}: p50 {times[n // 2]:.0f} us, p90 {times[int(n * 0.9)]:.0f} us, "
          f"p99 {times[int(n * 0.99)]:.0f} us")


if __name__ == "__main__":
    main()

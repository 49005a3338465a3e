#!/usr/bin/env python3
"""Holds N idle HTTPS event streams against one server, for
scripts/idle-memory.sh --https (`ssed loadtest` opens http:// only so far).

    python3 scripts/tls-hold.py HOST:PORT PATH N SECONDS CAFILE [TOKEN]

Opens N streams (at most 200 handshakes at a time), each a TLS connection
verified against CAFILE as `localhost`, reads each response head, then
reads whatever comes (heartbeats) until SECONDS have passed since the
start; prints how many were held and how many failed, and exits. Bounded:
every connection is closed at the end, and the run stops by itself.
"""
import asyncio
import resource
import ssl
import sys
import time


async def hold(host, port, path, ctx, token, until, gate, stats):
    async with gate:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=ctx, server_hostname="localhost"), 10)
            auth = f"Authorization: Bearer {token}\r\n" if token else ""
            writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n"
                         f"Accept: text/event-stream\r\n{auth}\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except Exception as e:  # noqa: BLE001 - counted and reported
            stats["failed"] += 1
            stats["why"] = repr(e)
            return
    if not head.startswith(b"HTTP/1.1 200"):
        stats["failed"] += 1
        stats["why"] = head.split(b"\r\n")[0].decode(errors="replace")
        writer.close()
        return
    stats["held"] += 1
    try:
        while time.monotonic() < until:
            left = until - time.monotonic()
            try:
                if not await asyncio.wait_for(reader.read(4096), max(left, 0.01)):
                    stats["dropped"] += 1
                    break
            except asyncio.TimeoutError:
                break
    finally:
        writer.close()


async def main():
    addr, path, n, seconds, cafile = sys.argv[1:6]
    token = sys.argv[6] if len(sys.argv) > 6 else ""
    host, port = addr.rsplit(":", 1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    ctx = ssl.create_default_context(cafile=cafile)
    until = time.monotonic() + float(seconds)
    gate = asyncio.Semaphore(200)
    stats = {"held": 0, "failed": 0, "dropped": 0, "why": ""}
    await asyncio.gather(*(hold(host, int(port), path, ctx, token, until, gate, stats)
                           for _ in range(int(n))))
    print(f'{{"held":{stats["held"]},"failed":{stats["failed"]},"dropped":{stats["dropped"]}}}')
    if stats["why"]:
        print(f"last failure: {stats['why']}", file=sys.stderr)


asyncio.run(main())

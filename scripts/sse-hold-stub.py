# A minimal asyncio SSE endpoint that answers every request with an event
# stream head and holds it open: something for `ssed loadtest` to hold more
# streams against than one ssed can take on a small machine.
#
#     python3 scripts/sse-hold-stub.py PORT SECONDS
#     ssed loadtest --url http://127.0.0.1:PORT/events/x --connections 19000 --ramp 5000/s --duration 5s --json
#
# Loopback only; it raises its own descriptor limit to the hard limit and
# exits after SECONDS.
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
async def handle(r, w):
    try:
        await r.readuntil(b"\r\n\r\n")
        w.write(HEAD); await w.drain()
        await r.read()  # until the client closes
    except Exception:
        pass
    finally:
        w.close()
async def main():
    srv = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]), backlog=4096)
    async with srv:
        await asyncio.sleep(float(sys.argv[2]))
asyncio.run(main())

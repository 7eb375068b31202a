"""A loopback HTTP/1.1 server for benchmarks: fixed added latency per request, keep-alive, asyncio.

    python -m bench.latency_server --count 2000 --bad-fraction 0.1 --latency 0.02

Prints ``PORT <n>`` once listening. Serves ``/img/<i>.jpg`` (distinct seeded JPEGs) and, for a
``bad_fraction`` of the indices, one of four failures: 404, an HTML page as image/jpeg, a
truncated JPEG, an empty body. ``/urls.csv`` lists every URL with a label.
"""

from __future__ import annotations

import argparse
import asyncio
import io

import numpy as np
from PIL import Image

BAD_KINDS = ("missing", "html", "truncated", "empty")


def build(count: int, bad_fraction: float, seed: int = 0) -> dict[str, tuple[int, bytes, str]]:
    rng = np.random.default_rng(seed)
    bad_every = round(1 / bad_fraction) if bad_fraction else 0
    routes: dict[str, tuple[int, bytes, str]] = {}
    for i in range(count):
        side = int(rng.integers(96, 192))
        pixels = rng.integers(0, 256, size=(side, side * 4 // 3, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=85)
        data = buffer.getvalue()
        path = f"/img/{i}.jpg"
        if bad_every and i % bad_every == bad_every - 1:
            kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
            path = f"/bad/{kind}/{i}.jpg"
            if kind == "missing":
                continue
            data = {"html": b"<!DOCTYPE html><html>gone</html>", "truncated": data[: len(data) // 2],
                    "empty": b""}[kind]
        routes[path] = (200, data, "image/jpeg")
    return routes


def url_list(count: int, bad_fraction: float) -> list[tuple[str, str]]:
    bad_every = round(1 / bad_fraction) if bad_fraction else 0
    rows = []
    for i in range(count):
        path = f"/img/{i}.jpg"
        if bad_every and i % bad_every == bad_every - 1:
            path = f"/bad/{BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]}/{i}.jpg"
        rows.append((path, f"class{i % 4}"))
    return rows


async def serve(routes: dict[str, tuple[int, bytes, str]], latency: float, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                target = line.split(b" ")[1].decode()
                while await reader.readline() not in (b"\r\n", b"\n", b""):
                    pass  # headers: not needed
                await asyncio.sleep(latency)
                status, body, ctype = routes.get(target, (404, b"not found", "text/plain"))
                reason = "OK" if status == 200 else "Not Found"
                head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n\r\n"
                writer.write(head.encode() + body)
                await writer.drain()
        except (ConnectionError, IndexError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    print(f"PORT {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--bad-fraction", type=float, default=0.1)
    parser.add_argument("--latency", type=float, default=0.02)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    asyncio.run(serve(build(args.count, args.bad_fraction), args.latency, args.port))


if __name__ == "__main__":
    main()

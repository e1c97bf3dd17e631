"""A TCP proxy that holds every chunk it forwards for a fixed delay, in order: the benchmark's
database "across a network" (``billing-module bench --mysql-delay-ms``), where each round trip
costs what it costs in production and not the few microseconds of the loopback.

    python -m billing_module.tools.delay_proxy --target 127.0.0.1:3306 --delay-ms 0.5

prints ``listening on HOST:PORT`` once it accepts connections. asyncio's timers wake with
about a millisecond's granularity, so a hop takes at least that long whatever the delay asked;
the benchmark reports the round trip it measured through the proxy.
"""
from __future__ import annotations

import argparse
import asyncio
import time


async def _forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy ``reader`` to ``writer``, each chunk sent ``delay`` seconds after it arrived."""
    held: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            due, data = await held.get()
            if not data:
                break
            if due > time.monotonic():
                await asyncio.sleep(due - time.monotonic())
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(65536):
            held.put_nowait((time.monotonic() + delay, data))
    finally:
        held.put_nowait((time.monotonic() + delay, b""))
        await sender


async def serve(target_host: str, target_port: int, delay: float, port: int = 0) -> asyncio.Server:
    async def connection(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(target_host, target_port)
        await asyncio.gather(_forward(client_reader, server_writer, delay),
                             _forward(server_reader, client_writer, delay), return_exceptions=True)
    return await asyncio.start_server(connection, "127.0.0.1", port)


async def _main(args: argparse.Namespace) -> None:
    host, _, port = args.target.rpartition(":")
    server = await serve(host or "127.0.0.1", int(port), args.delay_ms / 1000, args.port)
    bound = server.sockets[0].getsockname()
    print(f"listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m billing_module.tools.delay_proxy")
    p.add_argument("--target", required=True, help="HOST:PORT to forward to")
    p.add_argument("--delay-ms", type=float, required=True, help="each chunk's delay, one way")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0: any free one)")
    asyncio.run(_main(p.parse_args(argv)))


if __name__ == "__main__":
    main()

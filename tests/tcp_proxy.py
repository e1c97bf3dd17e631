"""A TCP proxy on 127.0.0.1 that can be frozen: a network partition that drops packets, for tests.

    proxy = await TcpProxy("127.0.0.1", 3306).start()   # clients connect to proxy.address
    proxy.freeze()                  # nothing passes either way; no connection breaks (no RST, no FIN)
    proxy.thaw()                    # what was held goes on, as TCP retransmits once a partition heals
    proxy.freeze_after(b"\\x03COMMIT")   # the next client chunk holding this passes, then it freezes
    await proxy.close()

Two proxies in front of one MariaDB look like two nodes to the module, so failover can be tested
without a cluster. While frozen, new connections are accepted (the kernel of a stopped server does
that too) and get no byte. A client that gives up while frozen and closes its side has the server's
side closed at once: the server rolls back what it has not committed, as it would once it notices
the dead peer; one server behind two proxies would otherwise keep the row locks of the abandoned
transaction and block the other "node".
"""
import asyncio


class TcpProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self.connections = 0          # accepted so far
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._trigger: bytes | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def frozen(self) -> bool:
        return not self._flowing.is_set()

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._trigger = None
        self._flowing.set()

    def freeze_after(self, pattern: bytes) -> None:
        """Let the next chunk from a client that contains ``pattern`` through, then freeze: the
        server gets the statement and answers, the client never hears the answer."""
        self._trigger = pattern

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(client_w)
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        self._writers.add(server_w)
        up: asyncio.Queue = asyncio.Queue()
        down: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(c) for c in (
            self._read(client_r, up, on_eof=server_w), self._forward(up, server_w, upstream=True),
            self._read(server_r, down), self._forward(down, client_w, upstream=False))]
        self._tasks.update(tasks)
        try:
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            self._tasks.difference_update(tasks)
            for w in (client_w, server_w):
                w.close()
                self._writers.discard(w)

    async def _read(self, reader: asyncio.StreamReader, queue: asyncio.Queue,
                    on_eof: asyncio.StreamWriter | None = None) -> None:
        try:
            while data := await reader.read(65536):
                queue.put_nowait(data)
        except OSError:
            pass
        finally:
            if on_eof is not None and self.frozen:
                on_eof.close()      # the client gave up during the partition: the server learns it now
            queue.put_nowait(None)

    async def _forward(self, queue: asyncio.Queue, writer: asyncio.StreamWriter, upstream: bool) -> None:
        try:
            while (data := await queue.get()) is not None:
                await self._flowing.wait()
                if writer.is_closing():
                    return
                writer.write(data)
                await writer.drain()
                if upstream and self._trigger is not None and self._trigger in data:
                    self._trigger = None
                    self.freeze()
        except OSError:
            pass
        finally:
            if not self.frozen:
                writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in list(self._writers):
            w.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

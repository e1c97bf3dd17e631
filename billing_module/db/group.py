"""Group commit: concurrent small write requests share one database transaction.

Requests that arrive while a group is being written wait and go into the next group together;
every request learns its result only after its group has committed. One commit (one fsync on
MySQL, one WAL append on SQLite) then serves many requests, and a ``batch`` function can write
the whole group with a few multi-row statements instead of a few statements per request.

Two ways to run a group of several requests:
- ``batch(tx, items) -> [(result, error)]``, the fast path. It may raise ``Fallback`` when the
  group needs per-request treatment (a refusal); the transaction then rolls back and the group
  runs the careful way. A duplicate key does the same: the batch need not look its keys up
  first, the unique indexes find a repeated request, and the careful way gives that request
  its own answer.
- ``single(tx, item) -> result``, each request in its own SAVEPOINT, so one request's failure
  rolls back only that request.
A request alone in its group runs ``single`` in the transaction itself.

Work must be safe to run again: when the database aborts a transaction (deadlock, lock timeout)
or a debit assumed to pass did not (``Tx.assumes``), the group is run again from the start.
"""
import asyncio
import logging
from typing import Any

from ..errors import DatabaseUnavailable
from . import dialect as dialects
from .database import AssumptionRefuted

log = logging.getLogger("billing_module.db")


class Fallback(Exception):
    """Raised by a batch function: run this group request by request instead."""


class GroupCommit:
    def __init__(self, db, single, batch=None, max_group=64):
        self.db = db
        self.single, self.batch = single, batch
        self.max_group = max_group
        self._queue = []
        self._flushing = None
        self._loop = None

    async def run(self, item):
        """Run ``item`` in the next group; returns its result once the group has committed."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:                # a new event loop (tests): start afresh
            self._loop, self._queue, self._flushing = loop, [], None
        fut = loop.create_future()
        # a caller that went away (cancelled) no longer reads its future: read it here, so an
        # error nobody awaits is not reported as "never retrieved"
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._queue.append((item, fut))
        if self._flushing is None or self._flushing.done():
            self._flushing = loop.create_task(self._flush())
        # Awaited as it is, not shielded: a cancelled caller cancels only its future; the group
        # is written by the flushing task all the same, which skips a future already done (a
        # shield costs a second future and one more turn of the loop per request).
        return await fut

    async def _flush(self):
        while self._queue:
            group, self._queue = self._queue[:self.max_group], self._queue[self.max_group:]
            items = [item for item, _ in group]
            try:
                outcomes = await self.write(items)
            except Exception as e:           # the group could not commit: every request fails with it
                outcomes = [(None, e)] * len(group)
            for (_, fut), (result, error) in zip(group, outcomes, strict=False):
                if fut.done():
                    continue
                if error is not None:
                    fut.set_exception(error)
                else:
                    fut.set_result(result)

    async def write(self, items):
        """Write ``items`` as one group now, the way a queued group is written (for a caller
        that holds a batch already): ``[(result, error)]`` in order, once committed."""
        if len(items) == 1:
            try:
                return [(await self.db.run(lambda tx: self.single(tx, items[0])), None)]
            except Exception as e:
                return [(None, e)]
        if self.batch is not None:
            try:
                return await self.db.run(lambda tx: self.batch(tx, items))
            except Fallback:
                pass
            except Exception as e:
                if not dialects.is_unique_violation(e):
                    raise
        return await self.db.run(lambda tx: self._each(tx, items))

    async def _each(self, tx, items):
        outcomes: list[tuple[Any, Exception | None]] = []
        for item in items:
            await tx.savepoint("bm_group")
            try:
                result = await self.single(tx, item)
                await tx.execute("release savepoint bm_group", later=True)
                await tx.flush()      # this request's own writes fail here, not at the next one's
            except Exception as e:
                if dialects.is_retryable(e) or isinstance(e, (DatabaseUnavailable, AssumptionRefuted)):
                    # the database aborted the whole transaction, its node failed, or an
                    # assumption failed: the group runs again as a whole
                    raise
                await tx.rollback_to("bm_group")
                outcomes.append((None, e))
                continue
            outcomes.append((result, None))
        return outcomes

"""The quota of a subscription: which subscription covers a use, and the race-safe way to spend it.

The quota row is locked (``select ... for update``; SQLite's writer lock) before its remaining
quota is read, and decremented by one conditional UPDATE whose row count is checked, in the same
transaction as the ledger entry and the usage log row."""
from .. import clock
from ..db.database import Tx
from ..errors import Conflict
from .views import Row

# The active subscription matching a use at ${at}$: by product, or (for LLM events) through an
# enabled 'llm' binding of the event's model id, or of its model name when the event has no id.
# {when} is the time condition: the period covers ${at}$ (covering), or it ended by ${at}$ and the
# subscription renews (due). A subscription with quota left is preferred, then the one ending first.
_MATCH_SQL = (
    "select s.id, s.version, s.product_id, s.quantity_unit, r.id as product_resource_id, r.resource_ref_id "
    "from product_subscription s left join product_resource r on r.product_id = s.product_id "
    "and r.resource_type = 'llm' and r.enabled = '1' and (r.resource_ref_id = ${llm}$ or (${llm}$ is null "
    "and r.resource_ref_id in (select m.id from llmage_cache m where m.name = ${mname}$))) "
    "where s.customer_id = ${c}$ and s.status = 'active' and {when} "
    "and (s.product_id = ${pid}$ or r.id is not null) "
    "order by case when s.used_quantity < s.included_quantity then 0 else 1 end, s.period_end, s.id")
_COVERING_SQL = _MATCH_SQL.replace("{when}", "s.period_start <= ${at}$ and s.period_end > ${at}$")
_DUE_SQL = _MATCH_SQL.replace("{when}", "s.period_end <= ${at}$ and s.auto_renew = '1'")


async def covering(tx: Tx, customer_id: str, at: str, product_id: str | None = None, llmid: str | None = None,
                   model_name: str | None = None, current: bool = False) -> Row | None:
    """``current``: read the latest committed rows (a locking read), for a use that found its
    subscription due: a concurrent use may have just renewed it, which a MySQL snapshot would miss."""
    return await tx.one(_COVERING_SQL + (tx.for_update() if current else ""),
                        {"c": customer_id, "at": at, "pid": product_id, "llm": llmid, "mname": model_name})


async def due(tx: Tx, customer_id: str, at: str, product_id: str | None = None, llmid: str | None = None,
              model_name: str | None = None) -> Row | None:
    """An auto-renewing subscription that would cover the use but whose period ended by ``at``: the
    use renews it first (no gap between the period end and the renewal sweep)."""
    return await tx.one(_DUE_SQL, {"c": customer_id, "at": at, "pid": product_id, "llm": llmid,
                                   "mname": model_name})


async def lock(tx: Tx, sub_id: str, at: str) -> Row | None:
    """The subscription's quota row, locked until the transaction ends; None if it stopped covering."""
    return await tx.one("select id, included_quantity, used_quantity from product_subscription "
                        "where id = ${s}$ and status = 'active' and period_start <= ${at}$ and period_end > ${at}$"
                        + tx.for_update(), {"s": sub_id, "at": at})


async def take(tx: Tx, sub_id: str, q: int) -> None:
    # the condition keeps the quota exact even without the lock; the row count proves it held
    n = await tx.execute("update product_subscription set used_quantity = used_quantity + ${q}$, "
                         "updated_at = ${now}$ where id = ${s}$ and status = 'active' "
                         "and used_quantity + ${q}$ <= included_quantity",
                         {"q": q, "s": sub_id, "now": clock.now_text()})
    if n != 1:
        raise Conflict("the subscription's quota changed during the use; send it again")


async def give_back(tx: Tx, sub_id: str, q: int) -> None:
    """Return ``q`` units a reservation took (the accountant refused the event's charge)."""
    await tx.execute("update product_subscription set used_quantity = used_quantity - ${q}$, "
                     "updated_at = ${now}$ where id = ${s}$ and used_quantity >= ${q}$",
                     {"q": q, "s": sub_id, "now": clock.now_text()})


def split(locked: Row | None, q: int) -> tuple[int, int]:
    """(included part, overage part) of ``q`` against the locked quota row."""
    if locked is None:
        return 0, q
    included = min(q, max(0, int(locked.included_quantity) - int(locked.used_quantity)))
    return included, q - included

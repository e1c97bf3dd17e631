"""LLM models (``llmage_cache``): model -> pricing program (``ppid``). A model whose program
is not in the pricing cache is still taken (the centre may send the program later) but
reported, because every quote for it fails with no_pricing until then."""
from typing import Any

from .base import EntitySync

_MAX_WARNINGS = 20
_CHUNK = 500


class LlmageSync(EntitySync):
    entity = "llmage"

    async def after_apply(self, tx, items):
        ids = [str(i["id"]) for i in items if isinstance(i, dict) and i.get("ppid")]
        missing = []
        for start in range(0, len(ids), _CHUNK):
            ns: dict[str, Any] = {}
            where = tx.in_list(ids[start:start + _CHUNK], ns)
            missing += await tx.select(
                "select m.id, m.ppid from llmage_cache m left join pricing_cache p on p.id = m.ppid "
                f"where m.id in {where} and p.id is null order by m.id", ns)
        warnings = [f"model {r.id}: pricing program {r.ppid} is not in the pricing cache "
                    "(its quotes fail until the program is synced)" for r in missing[:_MAX_WARNINGS]]
        if len(missing) > _MAX_WARNINGS:
            warnings.append(f"... and {len(missing) - _MAX_WARNINGS} more models without a pricing program")
        return warnings

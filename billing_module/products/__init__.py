"""Products: resource bindings, suppliers, subscriptions with quota, and the consumption engine.

A product sells a resource (an LLM model, an upstream API, a service) by a quantity unit
(``token``, ``call``, ``second``, ...). A customer either subscribes to it (a package price per
period buys ``included_quantity`` units) or uses it pay-as-you-go at the per-unit price.

One module per concept, one facade over them:

  catalogue.py      products and their resource bindings
  suppliers.py      suppliers of a bound resource, routing, supplier cost
  subscriptions.py  subscribe, cancel, renew or expire; what a quota has left
  quota.py          the covering subscription and the race-safe quota spend
  consumption.py    product_use: quota first, the rest charged; one usage log row (UsageRow)
  hook.py           accounting's quota hook for LLM events
  values.py, views.py  units, value rules and reply shapes
  manager.py        ProductManager, the facade; its reports are reports.py's product source
"""
from .hook import QuotaResult
from .manager import STATS_GROUPS, ProductManager
from .values import BILLING_MODES, NotSubscribed, QuotaExceeded, add_months
from .views import COST_FIELDS

__all__ = ["BILLING_MODES", "COST_FIELDS", "STATS_GROUPS", "NotSubscribed", "ProductManager", "QuotaExceeded",
           "QuotaResult", "add_months"]

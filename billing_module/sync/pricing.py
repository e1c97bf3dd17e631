"""Pricing programs (``pricing_cache``): what the pricing engine computes prices from.

Catalog.apply compiles every program of a page (``Program.from_payload``), so a program the
engine cannot use fails the whole page and nothing of it is applied. A program in another
currency than the deployment's is refused too: its amounts would be charged to balances
kept in ``currency`` as if they were the same unit.
"""
from .base import EntitySync, PageError


class PricingSync(EntitySync):
    entity = "pricing"

    def validate(self, items):
        ours = self.config.currency
        for item in items:
            if not isinstance(item, dict):
                continue
            currency = item.get("currency")
            if isinstance(currency, str) and currency.strip() and currency.strip().upper() != ours:
                raise PageError(f"pricing program {str(item.get('id'))[:32]}: priced in {currency.strip()}, "
                                f"but this deployment bills in {ours}")

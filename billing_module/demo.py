"""Demo data for ``billing-module serve --demo``: a few customers with balances, pricing for a few
models, and an admin API key to try the API with. Seeding is idempotent (fixed request ids)."""
from .money import to_micro

DEMO_PROGRAM = {
    "id": "demo-pp-chat", "name": "Demo chat pricing", "currency": "CNY",
    "versions": [{
        "id": "demo-ppt-1", "enabled_date": "2026-01-01", "expired_date": "9999-12-31",
        "pricing_data": {
            "pricings": [
                {"price_factors": "input_tokens", "unit_prices": "2.1", "cost_prices": "1.4", "unit": "M",
                 "filters": [{"model": "demo-chat"}],
                 "tiers": [{"above_input_tokens": 128000, "unit_prices": "4.2", "cost_prices": "2.8"}]},
                {"price_factors": "output_tokens", "unit_prices": "8.4", "cost_prices": "5.6", "unit": "M",
                 "filters": [{"model": "demo-chat"}]},
                {"price_factors": "cached_tokens", "unit_prices": "0.42", "cost_prices": "0.2", "unit": "M",
                 "filters": [{"model": "demo-chat"}]},
                {"price_factors": "quantity", "quantity_unit": "image", "unit_prices": "0.2", "cost_prices": "0.12",
                 "unit": "image", "filters": [{"model": "demo-image"}]},
                {"price_factors": "quantity", "quantity_unit": "second", "unit_prices": "0.3", "cost_prices": "0.2",
                 "unit": "second", "filters": [{"model": "demo-video"}]},
            ],
        },
    }],
}
DEMO_MODELS = [
    {"id": "demo-llm-chat", "name": "demo-chat", "ppid": "demo-pp-chat", "ownerid": "0", "providerid": "demo-provider"},
    {"id": "demo-llm-image", "name": "demo-image", "ppid": "demo-pp-chat", "ownerid": "0",
     "providerid": "demo-provider"},
    {"id": "demo-llm-video", "name": "demo-video", "ppid": "demo-pp-chat", "ownerid": "0",
     "providerid": "demo-provider"},
]
DEMO_ORGS = [
    {"id": "demo-acme", "kind": "org", "name": "Acme Robotics", "org_type": "customer", "status": "active"},
    {"id": "demo-globex", "kind": "org", "name": "Globex", "org_type": "customer", "status": "active",
     "discount": "0.9"},
    {"id": "demo-initech", "kind": "org", "name": "Initech", "org_type": "customer", "status": "active"},
    {"id": "demo-user-1", "kind": "user", "name": "alice", "org_id": "demo-acme", "status": "active"},
]
DEMO_RECHARGES = [("demo-acme", "100"), ("demo-globex", "50"), ("demo-initech", "5")]


async def seed_demo(core):
    await core.catalog.put("pricing", [DEMO_PROGRAM])
    await core.catalog.put("llmage", DEMO_MODELS)
    await core.catalog.put("users", DEMO_ORGS)
    for customer, amount in DEMO_RECHARGES:
        await core.ledger.recharge(customer, to_micro(amount), f"demo-recharge-{customer}", operator="demo")
    products = getattr(core, "products", None)
    if products is not None and hasattr(products, "seed_demo"):
        await products.seed_demo()
    core.demo_admin_key, _ = await core.apikeys.create("admin", name="demo admin key")

"""An alert survives a SIGKILL between the commit that raised it and its delivery: the real server
process, a real receiver on 127.0.0.1 that is down until the server has been killed."""
import asyncio
import hashlib
import hmac
import json
import os
import secrets
import socket

import aiohttp
from aiohttp import web

from billing_module.config import load_config
from billing_module.core import BillingCore
from billing_module.money import to_micro
from billing_module.tools.crashtest import Server
from tests.test_crash import _env_for

SECRET = "crash-webhook-secret-0123456789"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _wait(condition, what, seconds=60):
    for _ in range(int(seconds * 10)):
        if await condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(what)


async def test_an_alert_committed_before_a_sigkill_is_delivered_once_after_the_restart(tmp_path, db_desc):
    data_dir, receiver_port = str(tmp_path / "server"), _free_port()
    os.makedirs(data_dir)
    env = _env_for(db_desc)
    env.update(BILLING_ALERTS_WEBHOOK_URL=f"http://127.0.0.1:{receiver_port}/hook",
               BILLING_ALERTS_WEBHOOK_SECRET=SECRET,
               BILLING_ALERTS_LOW_BALANCE_AMOUNT="100", BILLING_ALERTS_DELIVERY_INTERVAL_SECONDS="0.2",
               BILLING_ALERTS_RETRY_BASE_SECONDS="1", BILLING_ALERTS_RETRY_MAX_SECONDS="1",
               BILLING_ALERTS_MAX_ATTEMPTS="1000", BILLING_SERVER_LOG_FILE="server.log")
    customer = f"kill-{secrets.token_hex(4)}"
    core = BillingCore(config=load_config(environ=env, overrides={"server": {"data_dir": data_dir}}), data_dir=data_dir)
    try:
        await core.create_schema()
        await core.ledger.recharge(customer, to_micro("150"), f"{customer}-start")
        key, _ = await core.apikeys.create("admin", name="alert crash test")
    finally:
        await core.close()
    headers = {"Authorization": f"Bearer {key}"}
    accepted = []

    async def hook(request):
        accepted.append((dict(request.headers), await request.read()))
        return web.Response(status=200)

    async with aiohttp.ClientSession() as session:
        async def alerts():
            async with session.get(f"{server.url}/alerts.dspy", params={"customer_id": customer},
                                   headers=headers) as r:
                return (await r.json())["rows"]

        server = Server(data_dir, env)
        await server.start(session)
        try:
            async with session.post(f"{server.url}/adjust.dspy", headers=headers,
                                    json={"customer_id": customer, "amount": "-60", "request_id": f"{customer}-1",
                                          "reason": "crosses the line"}) as r:
                assert r.status == 200, await r.text()

            async def tried():   # committed, and the receiver (down) has been tried: not delivered
                rows = await alerts()
                return rows and rows[0]["deliveries"][0]["attempts"] >= 1
            await _wait(tried, "the delivery was never attempted")
        finally:
            server.kill()
        [alert] = await alerts_after_kill(core_env=(env, data_dir), customer=customer)
        assert alert["status"] == "pending"

        app = web.Application()
        app.router.add_post("/hook", hook)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
        server = Server(data_dir, env)
        try:
            await server.start(session)

            async def delivered():
                rows = await alerts()
                return rows and rows[0]["status"] == "delivered"
            await _wait(delivered, "the alert was not delivered after the restart")
            await asyncio.sleep(1.5)     # a second delivery would arrive within this
        finally:
            server.stop()
            await runner.cleanup()
    assert len(accepted) == 1
    sent_headers, body = accepted[0]
    assert json.loads(body)["id"] == alert["id"] and json.loads(body)["customer_id"] == customer
    expected = hmac.new(SECRET.encode(), sent_headers["X-Billing-Timestamp"].encode() + b"." + body,
                        hashlib.sha256).hexdigest()
    assert hmac.compare_digest(expected, sent_headers["X-Billing-Signature"])


async def alerts_after_kill(core_env, customer):
    """Read the alerts straight from the database while no server runs."""
    env, data_dir = core_env
    core = BillingCore(config=load_config(environ=env, overrides={"server": {"data_dir": data_dir}}), data_dir=data_dir)
    try:
        return (await core.alerts.search(customer_id=customer))["rows"]
    finally:
        await core.close()

"""Property-based fuzzing of every HTTP endpoint (issue 7, item 3), on SQLite and on MariaDB.

Every endpoint is found at test time (``wwwroot/api/*.dspy``), so one added later is fuzzed
too. Every request generated here is INVALID by construction: a required field dropped, a
field with a malformed value (wrong type, negative, huge, NaN / infinite as JSON numbers and
as strings, too many decimal places, too long, SQL / HTML / spreadsheet-formula payloads,
characters an id may not hold, invalid UTF-8), a body that is not what its content type says,
or a method the endpoint does not accept. So the property is the same for all of them:

* the reply is a 4xx with ``{"success": false, "code": <non-empty>, "message"}``, never a 5xx;
* nothing is written: every table of ``load_models()`` holds exactly the rows it held before
  (whole rows compared, not only counts), so no partial write hides behind a 4xx.

The generated usage events fail validation (400) before pricing, so none of them is stored
as a failed accounting event (the documented write of a business refusal).

Example budget: ``BILLING_FUZZ_EXAMPLES`` (default 120, for the parameter fuzz; the body fuzz
gets a third of it). The default run is derandomized (the same examples every run, so CI is
stable); setting the variable also randomizes, for a long run by command:

    BILLING_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py
"""
import importlib
import json
import os
import pkgutil
import string
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import billing_module.api as api_pkg
from billing_module.api import HANDLERS
from billing_module.db.schema import load_models
from billing_module.resources import resource_dir
from tests.helpers import seed_pricing, usage

WWWROOT = str(resource_dir("wwwroot"))

# every handler module registers its endpoints when imported; the fuzz reaches all of them
# (test_every_dspy_endpoint_is_served checks that a real server registers them too)
for _m in pkgutil.iter_modules(api_pkg.__path__):
    importlib.import_module(f"{api_pkg.__name__}.{_m.name}")

ENDPOINTS = sorted(p.stem for p in (Path(WWWROOT) / "api").glob("*.dspy"))
ALL_METHODS = ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")   # HEAD replies carry no body to check

_LONG_RUN = os.environ.get("BILLING_FUZZ_EXAMPLES", "").strip()
EXAMPLES = int(_LONG_RUN) if _LONG_RUN else 120
settings.register_profile(
    "billing-fuzz", max_examples=EXAMPLES, deadline=None, database=None, derandomize=not _LONG_RUN,
    print_blob=True, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large, HealthCheck.filter_too_much])
FUZZ = settings.get_profile("billing-fuzz")


# --- what each endpoint reads ---------------------------------------------------------------------
class F:
    """A field an endpoint reads. kind: ident, money, int, count, quantity, ucost, text, choice,
    date, flag, model, unit, attributes, events (a batch's list)."""

    def __init__(self, name, kind, required=False, **opt):
        self.name, self.kind, self.required, self.opt = name, kind, required, opt

    def __repr__(self):
        return f"F({self.name}:{self.kind})"


class Base:
    """A request an endpoint accepts (or refuses for a business reason only), and the fields
    whose malformed values it must refuse. Values "@x" are ids seeded at setup."""

    def __init__(self, params, fields, cross=()):
        self.params, self.fields, self.cross = params, fields, tuple(cross)


PAGING = [F("page", "int", minimum=1, maximum=10**9), F("rows", "int", minimum=1, maximum=500)]


def event_fields(request_required=True):
    return [F("request_id", "ident", request_required, max_len=64), F("customer_id", "ident", True),
            F("user_id", "ident"), F("llmid", "ident"), F("product_id", "ident"), F("transno", "ident", max_len=64),
            F("model_name", "model", True), F("input_tokens", "count"), F("output_tokens", "count"),
            F("cached_tokens", "count"), F("characters", "count"), F("calls", "count"),
            F("web_search_calls", "count"), F("quantity", "quantity"), F("unit", "unit"), F("use_time", "date"),
            F("attributes", "attributes"), F("key_id", "ident")]


EVENT = dict(usage("fz-ev-1", user_id="u-1"))
EVENT_CROSS = ("cached_above_input", "quantity_without_unit")


def _usage_report(paging=True):
    # the other source's filters are ignored, not refused (issue 14: a page that shows both sources
    # sends the filters of both), so they are not malformed values here
    paging = PAGING if paging else []    # the export streams every row: no paging
    return [Base({}, [F("source", "choice", choices=("accounting", "product")), F("customer_id", "ident"),
                      F("user_id", "ident"), F("product_id", "ident"), F("start_date", "date"), F("end_date", "date"),
                      F("model", "text", max_len=128), F("status", "choice", choices=("accounted", "pending", "failed",
                                                                                         "all")),
                      *paging],      # the product source's filters are ignored here (issue 14)
                 cross=("dates_reversed",)),
            Base({"source": "product"}, [F("customer_id", "ident"), F("supplier_org_id", "ident"),
                                         F("billing_mode", "choice", choices=("1", "2", "3")),
                                         *paging])]    # model / status: ignored for this source


SPEC = {
    "health": [], "pricing": [], "sync_status": [], "metrics": [],        # nothing to malform: wrong methods only
    "balance": [Base({"customer_id": "cust-1"}, [F("customer_id", "ident", True)])],
    "recharge": [Base({"customer_id": "cust-1", "amount": "5", "request_id": "fz-r-1", "note": "n"},
                      [F("customer_id", "ident", True), F("amount", "money", True, sign="positive"),
                       F("request_id", "ident", True, max_len=64), F("note", "text", max_len=255)])],
    "adjust": [Base({"customer_id": "cust-1", "amount": "-1", "request_id": "fz-a-1", "reason": "fix"},
                    [F("customer_id", "ident", True), F("amount", "money", True, sign="nonzero"),
                     F("request_id", "ident", True, max_len=64), F("reason", "text", True, max_len=255)])],
    "refund": [Base({"customer_id": "cust-1", "amount": "1", "request_id": "fz-f-1", "reason": "oops"},
                    [F("customer_id", "ident", True), F("amount", "money", True, sign="positive"),
                     F("request_id", "ident", True, max_len=64), F("reason", "text", True, max_len=255),
                     F("record_id", "ident")])],
    "account_update": [Base({"customer_id": "cust-1", "credit_limit": "2"},
                            [F("customer_id", "ident", True), F("credit_limit", "money", True, sign="nonneg"),
                             F("status", "choice", choices=("active", "suspended"))])],
    "balances": [Base({}, [F("customer_id", "ident"), F("status", "choice", choices=("active", "suspended", "arrears")),
                           *PAGING])],
    "transactions": [Base({"customer_id": "cust-1"}, [F("customer_id", "ident"), F("entry_type", "ident"), *PAGING])],
    "authorize": [
        Base({"customer_id": "cust-1", "amount": "0.5", "request_id": "fz-h-9", "ttl_seconds": "60"},
             [F("customer_id", "ident", True), F("amount", "money", sign="positive"),
              F("request_id", "ident", True, max_len=64), F("ttl_seconds", "int", minimum=1, maximum=86400),
              F("note", "text", max_len=255)]),
        Base(dict(EVENT, request_id="fz-h-8"), event_fields() + [F("ttl_seconds", "int", minimum=1, maximum=86400)],
             cross=EVENT_CROSS)],
    "settle": [Base({"request_id": "fz-hold-1", "amount": "0.25"},
                    [F("request_id", "ident", True, max_len=64), F("hold_id", "ident"),
                     F("amount", "money", True, sign="nonneg")])],
    "release": [Base({"request_id": "fz-hold-1"}, [F("request_id", "ident", True, max_len=64), F("hold_id", "ident")])],
    "accounting": [Base(EVENT, event_fields(), cross=EVENT_CROSS)],
    "accounting_batch": [Base({"events": [dict(EVENT, request_id="fz-b-1")], "mode": "now"},
                              [F("events", "events", True), F("mode", "choice", choices=("now", "queue"))])],
    "accounting_submit": [Base(EVENT, event_fields(), cross=EVENT_CROSS)],
    "quote": [Base(EVENT, event_fields(request_required=False), cross=EVENT_CROSS)],
    "users": [Base({}, [F("kind", "choice", choices=("user", "org")), F("org_id", "ident"),
                        F("name", "text", max_len=128), *PAGING])],
    "failed_accounting_list": [Base({}, [F("customer_id", "ident"), F("user_id", "ident"), F("llmid", "ident"),
                                         F("handled", "flag"), F("retry_state", "choice",
                                                                 choices=("waiting", "exhausted", "resolved")),
                                         F("start_date", "date"), F("end_date", "date"), *PAGING])],
    "failed_accounting_retry": [Base({"id": "@failed"}, [F("id", "ident", True)])],
    "failed_accounting_handle": [Base({"id": "@failed", "note": "seen"},
                                      [F("id", "ident", True), F("note", "text", True, max_len=2000)])],
    "sync_run": [Base({}, [F("entity", "choice", choices=("users", "pricing", "llmage", "uapi")), F("full", "flag")])],
    "usage_list": _usage_report(),
    "usage_export": _usage_report(paging=False),
    "statements": [Base({"customer_id": "cust-1", "month": "2026-11"}, [F("customer_id", "ident", True),
                                                                        F("month", "month")]),
                   Base({"customer_id": "cust-1"}, [F("customer_id", "ident", True), *PAGING])],
    "customer_keys": [Base({"customer_id": "cust-1"}, [F("customer_id", "ident", True)])],
    "alerts": [Base({}, [F("customer_id", "ident"), F("status", "choice", choices=("pending", "delivered", "failed")),
                         F("type", "choice", choices=("low_balance", "budget_80", "budget_100", "failed_exhausted",
                                                      "sync_failing")), *PAGING])],
    "alert_webhook": [Base({"customer_id": "cust-1"}, [F("customer_id", "ident", True)])],
    "alert_webhook_set": [Base({"customer_id": "cust-1", "url": "http://127.0.0.1:9/hook",
                                "secret": "fuzz-webhook-secret-0123"},
                               [F("customer_id", "ident", True), F("low_balance_amount", "money", sign="nonneg"),
                                F("low_balance_percent", "int", minimum=1, maximum=100),
                                F("remove", "choice", choices=("webhook", "low_balance", "all"))])],
    "alert_redeliver": [Base({"delivery_id": "fz-missing"}, [F("delivery_id", "ident"), F("id", "ident")])],
    "customer_key_create": [Base({"customer_id": "cust-1", "name": "fz"}, [F("customer_id", "ident", True),
                                                                          F("name", "text", max_len=64)])],
    "customer_key_revoke": [Base({"customer_id": "cust-1", "key_id": "fz-missing"},
                                 [F("customer_id", "ident", True), F("key_id", "ident", True)])],
    "statement_export": [Base({"id": "fz-missing"}, [F("id", "ident", True),
                                                      F("format", "choice", choices=("csv", "html", "pdf"))])],
    "usage_stats": [Base({}, [F("group_by", "choice", choices=("day", "model", "user", "customer", "total")),
                              F("source", "choice", choices=("accounting", "product")), F("customer_id", "ident"),
                              F("start_date", "date"), F("end_date", "date"), F("status", "choice",
                                                                                choices=("accounted", "pending",
                                                                                         "failed", "all")),
                              F("page", "int", minimum=1, maximum=10**9), F("rows", "int", minimum=1, maximum=1000)],
                         cross=("dates_reversed",))],
    "product_save": [Base({"code": "fz-new", "product_name": "Fuzz", "quantity_unit": "call", "list_price": "1"},
                          [F("code", "ident", True, max_len=64), F("product_name", "text", True, max_len=128),
                           F("quantity_unit", "ident", True), F("product_id", "ident"),
                           F("product_type", "choice", choices=("llm_model", "api", "bundle")),
                           F("status", "choice", choices=("active", "disabled")), F("currency", "ident", max_len=8),
                           F("org_id", "ident"), F("list_price", "money", sign="nonneg", truthy=True),
                           F("included_quantity", "quantity", truthy=True),
                           F("period_months", "count", minimum=1, maximum=120), F("overage_price", "money", sign="nonneg"),
                           F("price_per", "count", minimum=1, maximum=10**12), F("description", "text", max_len=500)])],
    "products": [Base({}, [F("status", "choice", choices=("active", "disabled")),
                           F("resource_type", "choice", choices=("llm", "uapi", "service")),
                           F("resource_ref_id", "ident"), *PAGING])],
    "product": [Base({"product_id": "@product"}, [F("product_id", "ident", True)])],
    "product_bind": [Base({"product_id": "@product", "resource_type": "llm", "resource_ref_id": "llm-flat"},
                          [F("product_id", "ident", True), F("resource_type", "choice", True,
                                                              choices=("llm", "uapi", "service")),
                           F("resource_ref_id", "ident", True), F("resource_name", "text", max_len=128)])],
    "product_unbind": [Base({"product_resource_id": "@binding"}, [F("product_resource_id", "ident", True)]),
                       Base({"product_id": "@product", "resource_type": "llm", "resource_ref_id": "llm-a"},
                            [F("product_id", "ident", True), F("resource_type", "choice", True,
                                                                choices=("llm", "uapi", "service")),
                             F("resource_ref_id", "ident", True)])],
    "product_bindings": [Base({}, [F("product_id", "ident"), F("resource_type", "choice", choices=("llm", "uapi",
                                                                                                  "service")),
                                   F("resource_ref_id", "ident"), F("include_disabled", "flag")])],
    "product_supplier_add": [Base({"product_resource_id": "@binding", "supplier_org_id": "sup-2", "unit_cost": "0.002"},
                                  [F("product_resource_id", "ident", True), F("supplier_org_id", "ident", True),
                                   F("unit_cost", "ucost", True), F("priority", "count", minimum=0, maximum=10**6),
                                   F("weight", "count", minimum=0, maximum=10**6),
                                   F("supplier_name", "text", max_len=128)])],
    "product_supplier_update": [Base({"supplier_id": "@supplier", "priority": "5"},
                                     [F("supplier_id", "ident", True), F("priority", "count", True, minimum=0,
                                                                         maximum=10**6),
                                      F("unit_cost", "ucost"), F("weight", "count", minimum=0, maximum=10**6),
                                      F("enabled", "flag"), F("supplier_name", "text", max_len=128)])],
    "product_supplier_disable": [Base({"supplier_id": "@supplier"}, [F("supplier_id", "ident", True)])],
    "product_suppliers": [Base({}, [F("product_resource_id", "ident"), F("product_id", "ident")])],
    "product_subscribe": [Base({"customer_id": "cust-2", "product_id": "@product", "request_id": "fz-sub-9"},
                               [F("customer_id", "ident", True), F("product_id", "ident", True),
                                F("request_id", "ident", True, max_len=60), F("user_id", "ident"),
                                F("auto_renew", "flag"), F("included_quantity", "quantity"),
                                F("package_price", "money", sign="nonneg"),
                                F("period_months", "count", minimum=1, maximum=120)])],
    "product_subscription_cancel": [Base({"subscription_id": "@subscription"},
                                         [F("subscription_id", "ident", True), F("at_period_end", "flag"),
                                          F("reason", "text", max_len=255)])],
    "product_subscription_resume": [Base({"subscription_id": "@subscription"}, [F("subscription_id", "ident", True)])],
    "product_subscriptions": [Base({}, [F("customer_id", "ident"), F("product_id", "ident"),
                                        F("status", "choice", choices=("active", "cancelled", "expired")), *PAGING])],
    "budget_set": [Base({"scope": "org", "customer_id": "cust-1", "period": "day", "limit": "100"},
                        [F("scope", "choice", True, choices=("org", "user", "key")), F("customer_id", "ident", True),
                         F("user_id", "ident"), F("key_id", "ident"),
                         F("period", "choice", True, choices=("day", "week", "month")),
                         F("limit", "money", sign="nonneg")])],
    "budgets": [Base({}, [F("customer_id", "ident"), F("scope", "choice", choices=("org", "user", "key")),
                          *PAGING])],
    "product_quota": [Base({"customer_id": "cust-1", "product_id": "@product"},
                           [F("customer_id", "ident", True), F("product_id", "ident", True)])],
    "product_use": [Base({"customer_id": "cust-1", "user_id": "u-1", "product_id": "@product", "amount": "1",
                          "source_ref_table": "jobs", "source_ref_id": "fz-job-9"},
                         [F("customer_id", "ident", True), F("user_id", "ident", True), F("product_id", "ident", True),
                          F("amount", "quantity", True, positive=True), F("unit", "ident"),
                          F("source_ref_table", "ident", True, max_len=64), F("source_ref_id", "ident", True),
                          F("product_resource_id", "ident")])],
    "product_usage_list": [Base({}, [F("customer_id", "ident"), F("product_id", "ident"), F("start", "date"),
                                     F("end", "date"), F("subscription_id", "ident"),
                                     F("billing_mode", "choice", choices=("1", "2", "3")),
                                     F("supplier_org_id", "ident"), *PAGING])],
    "product_overage": [Base({}, [F("customer_id", "ident"), F("product_id", "ident"), F("start", "date"),
                                  F("end", "date"), *PAGING])],
    "product_stats": [Base({}, [F("group_by", "choice", choices=("product", "supplier", "customer", "day")),
                                F("start", "date"), F("end", "date"), F("customer_id", "ident"),
                                F("product_id", "ident"), F("supplier_org_id", "ident")])],
}


def methods_of(name):
    spec = HANDLERS.get(name)
    return tuple(spec[1]) if spec else ("GET", "POST")


def is_open(name):
    spec = HANDLERS.get(name)
    return bool(spec and spec[2])


def is_admin_only(name):
    spec = HANDLERS.get(name)
    return bool(spec and spec[3])


def write_method(name):
    return "POST" if "POST" in methods_of(name) else methods_of(name)[0]


# --- malformed values ------------------------------------------------------------------------------
# a value is (form, payload): "str" travels in any transport, "bytes" only percent-encoded in a
# form body or a query, "json" (a Python value) and "raw" (JSON text) only in a JSON body.
ID_CHARS = string.ascii_letters + string.digits + "_.:@-"
INJECTIONS = [
    "x' or 1=1 --", "'; drop table ledger_entry; --", "1; select sleep(5)", "\" or \"\"=\"", "cust-1' --",
    "<script>alert(1)</script>", "<img src=x onerror=alert(1)>", "</td><b>x", "=HYPERLINK(\"http://evil/\",\"x\")",
    "=1+1", "+cmd|' /C calc'!A0", "@SUM(1+1)*cmd|' /C calc'!A0", "-2+3+cmd|' /C calc'!A0", "${7*7}", "{{7*7}}",
    "../../etc/passwd", "%00", "a\x00b", "\u202ecust", "cust\u200b", "😀", "名字", "a b", "\r\n", "cust-1\n", "\ncust-1",
    "cust-1\t", "${c}$", "$[c]$",
]
NUMBER_JUNK = ["NaN", "nan", "-NaN", "Infinity", "-Infinity", "inf", "-inf", "1e3", "1E-2", "1e999", "1_000", ".5",
               "5.", "0x1A", "1,5", "1.2.3", "++1", "--1", "+-1", "１", "١", "one", " ", "\t", "5 5", "1/2",
               "9" * 400, "0." + "0" * 300 + "1"]
RAW_NUMBERS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1e-999", "1.5", "-0.0", "1E400",
               "123456789012345678901234567890", "-123456789012345678901234567890", "0.1e1"]
BAD_DATES = ["2026-13-01", "2026-02-30", "2026-00-10", "not a date", "yesterday", "2026/01/01", "01-01-2026",
             "2026-01-01T25:00:00", "2026-01-01 12:61", "9999-99-99", "20261301", "2026-01-01x", "x" * 41, "0",
             "1' or '1'='1", "<script>", "=NOW()", "2026-1-1"]
BAD_FLAGS = ["maybe", "2", "-1", "on", "off", "y", "n", "tru", "1.0", "null", "none", "<b>", "=1", "1 1"]


def _s(strategy):
    return strategy.map(lambda v: ("str", v))


def _j(strategy):
    return strategy.map(lambda v: ("json", v))


def _raw(strategy):
    return strategy.map(lambda v: ("raw", v))


def _bytes_with_invalid_utf8():
    return st.tuples(st.text(ID_CHARS, max_size=8), st.sampled_from([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\x80",
                                                                      b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]),
                     st.text(ID_CHARS, max_size=8)).map(lambda t: ("bytes", t[0].encode() + t[1] + t[2].encode()))


_JSON_CONTAINERS = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=4), st.integers(),
                                                                                   max_size=2))
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


def _long_text(min_len, alphabet=None):
    # past the limit; a very long string now and then (bodies only: see _fits)
    # no white space: a handler may strip it, and a stripped value could fit again
    alphabet = alphabet if alphabet is not None else st.characters(min_codepoint=33, max_codepoint=0x2FFF,
                                         blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"))
    return st.one_of(st.integers(min_len, min_len + 40), st.sampled_from([5000, 70000])).flatmap(
        lambda n: st.builds(lambda c, k=n: (c * k)[:k], st.text(alphabet, min_size=1, max_size=3)))


def bad_values(f):
    """A strategy of malformed values for field ``f``: every one of them must be refused."""
    k, o = f.kind, f.opt
    if k == "ident":
        max_len = o.get("max_len", 32)
        bad_char = st.characters(blacklist_characters=ID_CHARS, blacklist_categories=("Cs",))
        return st.one_of(
            _s(st.sampled_from(INJECTIONS)),
            _s(st.builds(lambda a, c, b: a + c + b, st.text(ID_CHARS, max_size=6), bad_char, st.text(ID_CHARS, max_size=6))),
            _s(_long_text(max_len + 1, st.sampled_from(ID_CHARS))),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS)))
    if k == "money":
        sign = o.get("sign")
        bad_sign = {"positive": ["0", "-1", "-0.000001", "0.000000", "-0", "-12.5"],
                    "nonneg": ["-1", "-0.000001", "-12.5", "-1000000000000"],
                    "nonzero": ["0", "0.000000", "-0", "+0.0"]}[sign]
        json_sign = {"positive": [0, -1, -10**12], "nonneg": [-1, -10**12], "nonzero": [0]}[sign]
        values = st.one_of(
            _s(st.sampled_from(NUMBER_JUNK + INJECTIONS + bad_sign + ["0.0000001", "1.1234567", "1000000000001",
                                                                      "-1000000000001", "1000000000000.000001"])),
            _s(st.builds(lambda a, b: f"{a}.{b:07d}", st.integers(0, 10**6), st.integers(1, 10**7 - 1)).filter(
                lambda v: not v.endswith("0"))),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS, st.sampled_from(json_sign),
                         st.integers(10**12 + 1, 10**30), st.integers(-10**30, -10**12 - 1))),
            _raw(st.sampled_from(RAW_NUMBERS)))
        return values.filter(_truthy) if o.get("truthy") else values
    if k == "int":
        lo, hi = o["minimum"], o["maximum"]
        return st.one_of(
            _s(st.sampled_from(["abc", "1.5", "1e3", "NaN", "inf", "0x10", "--1", "1/2", "9" * 19, "9" * 400,
                                str(lo - 1), str(lo - 1000), str(hi + 1), str(10**18), "-" + "9" * 30] + INJECTIONS)),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats().filter(lambda v: not (v == v and abs(v) != float("inf") and v == int(v)
                                                           and lo <= v <= hi)),
                         st.booleans(), _JSON_CONTAINERS, st.integers(hi + 1, 10**30), st.integers(-10**30, lo - 1))),
            _raw(st.sampled_from(["NaN", "Infinity", "1e999", "-1e999", "1.5"])))
    if k == "count":
        lo, hi = o.get("minimum", 0), o.get("maximum", 10**15)
        values = st.one_of(
            _s(st.sampled_from(["-1", "1.0", "1e3", "abc", "NaN", " ", "0x1", "+1", "1,000", "١", "１", str(hi + 1),
                                "9" * 30, "-0.5"] + ([str(lo - 1)] if lo > 0 else []) + INJECTIONS)),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS, st.integers(-10**30, lo - 1),
                         st.integers(hi + 1, 10**30))),
            _raw(st.sampled_from(RAW_NUMBERS)))
        return values
    if k == "quantity":
        positive = o.get("positive")
        values = st.one_of(
            _s(st.sampled_from(["-1", "-0.5", "1e3", "NaN", "Infinity", "abc", ".5", "1.23456", "100000000000",
                                "1_0", " ", "0x10"] + (["0", "0.0000", "-0"] if positive else []) + INJECTIONS)),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(allow_nan=True, allow_infinity=True).filter(
                lambda v: not (v == v and abs(v) < 1e11 and v >= 0 and len(repr(v).split(".")[-1]) <= 4
                               and "e" not in repr(v) and not (positive and v == 0))),
                st.booleans().filter(lambda v: v or not o.get("truthy")), _JSON_CONTAINERS,
                st.integers(-10**30, -1), st.integers(10**11, 10**30))),
            _raw(st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "-1"])))
        return values.filter(_truthy) if o.get("truthy") else values
    if k == "ucost":
        return st.one_of(
            _s(st.sampled_from(["-1", "1e-3", "NaN", "0.123456789", "100000000000", "abc", " ", ".5"] + INJECTIONS)),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS, st.integers(-10**30, -1))),
            _raw(st.sampled_from(RAW_NUMBERS)))
    if k == "month":
        return st.one_of(
            _s(st.sampled_from(["2026-13", "2026-00", "2026-1", "26-11", "1999-12", "9999-01", "2026-11-01", "2026/11",
                                " 2026-11", "2026-11\n", "２０２６-11"] + INJECTIONS)),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS)))
    if k == "text":
        max_len = o["max_len"]
        return st.one_of(
            _s(_long_text(max_len + 1)),
            _s(st.builds(lambda a, b: a + "\x00" + b, st.text(ID_CHARS, max_size=5), st.text(ID_CHARS, max_size=5))),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS)))
    if k == "choice":
        choices = o["choices"]
        return st.one_of(
            _s(st.one_of(st.sampled_from(INJECTIONS), _TEXT,
                         st.sampled_from([c.upper() for c in choices] + [" " + c for c in choices] + [c + "\n" for c in choices]))
               .filter(lambda v: v not in choices and v != "")),
            _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS,
                         st.integers().filter(lambda v: str(v) not in choices))))
    if k == "date":
        return st.one_of(_s(st.sampled_from(BAD_DATES + INJECTIONS)), _bytes_with_invalid_utf8(),
                         _j(st.one_of(st.floats(), st.booleans(), _JSON_CONTAINERS)))
    if k == "flag":
        return st.one_of(_s(st.sampled_from(BAD_FLAGS + INJECTIONS).filter(lambda v: v.strip().lower() not in (
            "1", "0", "true", "false", "yes", "no", ""))), _bytes_with_invalid_utf8(),
            _j(st.one_of(st.floats(), _JSON_CONTAINERS, st.integers().filter(lambda v: v not in (0, 1)))))
    if k == "model":
        return st.one_of(_s(_long_text(129)), _j(st.one_of(st.integers(), st.floats(), st.booleans(), _JSON_CONTAINERS)))
    if k == "unit":
        return _j(st.one_of(st.integers(), st.floats(), st.booleans(), _JSON_CONTAINERS))
    if k == "attributes":
        return st.one_of(_s(_TEXT.filter(bool)), _j(st.one_of(st.integers(), st.floats(), st.booleans(),
                                                              st.lists(st.integers(), max_size=3))))
    if k == "events":     # anything but a JSON list of events (a bad event in a list is that event's refusal)
        return st.one_of(_s(_TEXT), _j(st.one_of(st.integers(), st.floats(), st.booleans(), st.just([]),
                                                 st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))))
    raise AssertionError(f"no malformed values for kind {k}")


def _truthy(value):
    form, v = value
    return form != "json" or bool(v)


def _fits(value, transport):
    form, v = value
    if form in ("json", "raw"):
        return transport == "json"
    if form == "bytes":
        return transport in ("form", "query")
    # aiohttp's parser refuses a request line past 8190 bytes itself (plain text, before the app)
    # (a query carries up to three malformed values next to the base ones)
    return transport != "query" or len(urllib.parse.quote(v)) < 2000


# --- requests ---------------------------------------------------------------------------------------
@st.composite
def invalid_requests(draw):
    """(endpoint, method, transport, params, mutations): at least one field malformed."""
    name = draw(st.sampled_from(sorted(n for n in SPEC if SPEC[n] and n in ENDPOINTS)))
    base = draw(st.sampled_from(SPEC[name]))
    method = draw(st.sampled_from(methods_of(name)))
    transport = "query" if method == "GET" else draw(st.sampled_from(["json", "form", "query"]))
    params = {k: (("str", str(v)) if transport != "json" else ("json", v)) for k, v in base.params.items()}
    present = [f for f in base.fields if f.required and f.name in base.params]
    options = [("drop", f) for f in present] + [("bad", f) for f in base.fields] + [("cross", c) for c in base.cross]
    n = draw(st.integers(1, 3))
    mutations = []
    for op, target in draw(st.lists(st.sampled_from(options), min_size=1, max_size=n,
                                    unique_by=lambda o: o[1] if isinstance(o[1], str) else o[1].name)):
        if op == "drop":
            params.pop(target.name, None)
            mutations.append(("drop", target.name))
        elif op == "bad":
            value = draw(bad_values(target).filter(lambda v: _fits(v, transport)))
            params[target.name] = value
            mutations.append(("bad", target.name, value))
        else:
            mutations.append(("cross", target))
            _cross(target, params, transport)
    return name, method, transport, params, mutations


def _cross(what, params, transport):
    wrap = (lambda v: ("json", v)) if transport == "json" else (lambda v: ("str", str(v)))
    if what == "cached_above_input":
        params["input_tokens"], params["cached_tokens"] = wrap(10), wrap(11)
    elif what == "quantity_without_unit":
        params["quantity"] = wrap("2.5")
        params.pop("unit", None)
    elif what == "dates_reversed":
        params["start_date"], params["end_date"] = wrap("2026-02-01"), wrap("2026-01-01")


def _resolve(v, ids):
    return ids.get(v[1:], v) if isinstance(v, str) and v.startswith("@") else v


def encode_query(params):
    parts = []
    for k, (form, v) in params.items():
        data = v if form == "bytes" else str(v).encode("utf-8")
        parts.append(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote_from_bytes(data, safe='')}")
    return "&".join(parts)


def encode_json(params):
    body, raws = {}, {}
    for i, (k, (form, v)) in enumerate(params.items()):
        if form == "raw":
            raws[f"__raw_{i}__"] = v
            body[k] = f"__raw_{i}__"
        else:
            body[k] = v
    text = json.dumps(body, allow_nan=True)      # NaN / Infinity as JSON numbers too
    for marker, token in raws.items():
        text = text.replace(json.dumps(marker), token)
    return text.encode("utf-8")


async def send(http, method, name, transport, params, ids, key=None, headers=None, body=None, query=None):
    """One request; returns (status, parsed JSON or None, text)."""
    params = {k: (form, _resolve(v, ids)) for k, (form, v) in params.items()}
    url = f"/billing_module/api/{name}.dspy"
    hdrs = {"Authorization": f"Bearer {key if key is not None else http.admin_key}"} if key != "" else {}
    hdrs.update(headers or {})
    if body is None:
        if transport == "query":
            query = encode_query(params)
        elif transport == "json":
            body = encode_json(params)
            hdrs.setdefault("Content-Type", "application/json")
        elif transport == "form":
            body = encode_query(params).encode("ascii")
            hdrs.setdefault("Content-Type", "application/x-www-form-urlencoded")
    if query:
        url += "?" + query
    r = await http.client.request(method, url, data=body, headers=hdrs)
    text = await r.text(errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return r.status, parsed, text


def refusal_problem(status, parsed, text):
    """None when the reply is a proper refusal: 4xx with success false and a code."""
    if not 400 <= status < 500:
        return f"status {status}: {text[:300]}"
    if not isinstance(parsed, dict) or parsed.get("success") is not False or not isinstance(parsed.get("code"), str) \
            or not parsed["code"] or "message" not in parsed:
        return f"status {status} without {{success: false, code, message}}: {text[:300]}"
    return None


# --- state: everything the database holds --------------------------------------------------------------
async def snapshot(core):
    """Every row of every table (api_key.last_used_at aside: reading with a key may touch it)."""
    state = {}
    async with core.db.read() as tx:
        for table in sorted(load_models()):
            rows = await tx.select(f"select * from {table}")
            state[table] = sorted(json.dumps({k: v for k, v in dict(r).items() if k != "last_used_at"},
                                             sort_keys=True, default=str) for r in rows)
    return state


def diff(before, after):
    out = []
    for table in before:
        gone = set(before[table]) - set(after[table])
        new = set(after[table]) - set(before[table])
        if gone or new:
            out.append(f"{table}: {len(before[table])} -> {len(after[table])} rows; new/changed {sorted(new)[:2]}; "
                       f"gone/changed {sorted(gone)[:2]}")
    return out


async def _ok(http, path, **json_body):
    status, body = await http.post(f"api/{path}.dspy", http.admin_key, json=json_body)
    return body if status == 200 and body.get("success") else None


async def seed(http):
    """A small world for the fuzz: priced models, two funded customers, an open hold, a failed
    usage event, a product with a binding, a supplier and a subscription. Returns the ids."""
    core = http.core
    await seed_pricing(core)
    await core.catalog.put("users", [{"id": "cust-1", "kind": "org", "name": "Acme"},
                                     {"id": "cust-2", "kind": "org", "name": "Globex"},
                                     {"id": "u-1", "kind": "user", "name": "alice", "org_id": "cust-1"}])
    assert await _ok(http, "recharge", customer_id="cust-1", amount="10", request_id="fz-top-1")
    assert await _ok(http, "recharge", customer_id="cust-2", amount="10", request_id="fz-top-2")
    assert await _ok(http, "authorize", customer_id="cust-1", amount="1", request_id="fz-hold-1")
    status, _ = await http.post("api/accounting.dspy", http.admin_key, json=usage("fz-failed-1", model="no-price"))
    assert status == 404
    failed = (await core.failures.search(customer_id="cust-1"))["rows"]
    ids = {"failed": failed[0]["id"] if failed else "fz-missing"}
    # the product side is optional here: a missing id still makes every request refused
    product = await _ok(http, "product_save", code="fz-prod", product_name="Fuzz product", quantity_unit="call",
                        list_price="1", included_quantity="10", overage_price="0.01")
    ids["product"] = (product or {}).get("product_id") or (product or {}).get("id") or "fz-missing"
    binding = await _ok(http, "product_bind", product_id=ids["product"], resource_type="llm", resource_ref_id="llm-a")
    ids["binding"] = (binding or {}).get("product_resource_id") or (binding or {}).get("id") or "fz-missing"
    supplier = await _ok(http, "product_supplier_add", product_resource_id=ids["binding"], supplier_org_id="sup-1",
                         unit_cost="0.001")
    ids["supplier"] = (supplier or {}).get("supplier_id") or (supplier or {}).get("id") or "fz-missing"
    sub = await _ok(http, "product_subscribe", customer_id="cust-1", product_id=ids["product"], request_id="fz-sub-1")
    ids["subscription"] = (sub or {}).get("subscription_id") or (sub or {}).get("id") or "fz-missing"
    return ids


class World(tuple):
    def __repr__(self):
        return "world"


@pytest.fixture
async def world(http):
    return World((http, await seed(http)))


def short(value, limit=400):
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


async def refused(http, what, *args, **kw):
    """Send one request; assert a proper refusal and that the database did not change."""
    before = await snapshot(http.core)
    status, parsed, text = await send(http, *args, **kw)
    problem = refusal_problem(status, parsed, text)
    assert problem is None, f"{what}: {problem}"
    changes = diff(before, await snapshot(http.core))
    assert not changes, f"{what}: a refused request wrote: {changes}"


# --- the tests -----------------------------------------------------------------------------------------
def test_every_dspy_endpoint_is_served():
    """In a fresh process (nothing imported but what a server imports), ``handle`` knows every
    ``wwwroot/api/*.dspy``: none answers 404 ``no API named ...``."""
    code = (
        "import asyncio, json, sys, types\n"
        "from billing_module.api import handle\n"
        "async def main(names):\n"
        "    missing = []\n"
        "    for n in names:\n"
        "        r = await handle(None, types.SimpleNamespace(method='TRACE'), {}, n)\n"
        "        if r.status == 404: missing.append(n)\n"
        "    print(json.dumps(missing))\n"
        "asyncio.run(main(json.loads(sys.argv[1])))\n")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(ENDPOINTS)], capture_output=True, text=True,
                         timeout=120, cwd=str(Path(api_pkg.__file__).parents[2]))
    assert out.returncode == 0, out.stderr[-2000:]
    missing = json.loads(out.stdout.strip().splitlines()[-1])
    assert missing == [], f"these .dspy endpoints answer 404 'no API named' on a server: {missing}"


def test_every_endpoint_has_a_fuzz_spec():
    """A new endpoint is fuzzed for methods and bodies at once; its fields need a SPEC entry."""
    assert sorted(set(ENDPOINTS) - set(SPEC)) == []
    assert sorted(set(SPEC) - set(ENDPOINTS)) == [], "SPEC names endpoints that no longer exist"


async def test_wrong_methods_and_callers_are_refused(world):
    """Every endpoint, every method it does not accept, and (unless open) no key, a wrong key,
    a malformed Authorization header and a customer key on admin endpoints: a 4xx with a code,
    nothing written, even when the request would otherwise be valid."""
    http, ids = world
    customer_key, _ = await http.core.apikeys.create("customer", customer_id="cust-2")
    failures = []

    async def attempt(what, method, name, params, **kw):
        try:
            await refused(http, f"{method} {name} ({what})", method, name, "json" if method != "GET" else "query",
                          params, ids, **kw)
        except AssertionError as e:
            failures.append(str(e).splitlines()[0])

    for name in ENDPOINTS:
        bases = SPEC.get(name) or [Base({}, [])]
        params = {k: ("json", v) for k, v in bases[0].params.items()}
        for method in ALL_METHODS:
            if method not in methods_of(name):
                await attempt("wrong method", method, name, params)
        if is_open(name):
            continue
        method = write_method(name)
        await attempt("no key", method, name, params, key="")
        await attempt("unknown key", method, name, params, key="bk_not-a-key")
        await attempt("basic auth", method, name, params, key="", headers={"Authorization": "Basic YWRtaW46YWRtaW4="})
        await attempt("empty bearer", method, name, params, key="", headers={"Authorization": "Bearer "})
        if is_admin_only(name) or bases[0].params.get("customer_id") == "cust-1" or name in (
                "settle", "release", "product_subscription_cancel", "product_subscription_resume"):
            # cust-2's key: admin endpoints, and cust-1's customer, hold and subscription
            await attempt("another customer's key", method, name, params, key=customer_key)
    assert failures == [], "\n".join(failures)


@FUZZ
@given(req=invalid_requests())
async def test_fuzz_invalid_params(world, req):
    http, ids = world
    name, method, transport, params, mutations = req
    what = f"{method} {name} via {transport}: {short(mutations)}"
    note(what)
    await refused(http, what, method, name, transport, params, ids)


# bodies that are not what their content type says; each loses or garbles the required fields
def _base_json(name):
    return json.dumps(SPEC[name][0].params).encode()


def malformed_bodies(name):
    base = SPEC[name][0].params
    first = next(f.name for f in SPEC[name][0].fields if f.required and f.name in base)
    form_bad = "&".join(f"{k}={urllib.parse.quote(str(v))}" for k, v in base.items() if k != first).encode()
    form_bad = (form_bad + b"&" if form_bad else b"") + first.encode() + b"=\xff\xfe" + b"x"
    json_bad = _base_json(name).replace(json.dumps(base[first]).encode(), b'"\xff\xfe"', 1)
    return {
        "not JSON": (b"{bad json", "application/json", {}),
        "truncated JSON": (_base_json(name)[:-1], "application/json", {}),
        "JSON array": (b"[1, 2, 3]", "application/json", {}),
        "JSON array of the object": (b"[" + _base_json(name) + b"]", "application/json", {}),
        "JSON string": (b'"customer_id=cust-1"', "application/json", {}),
        "JSON number": (b"5", "application/json", {}),
        "JSON null": (b"null", "application/json", {}),
        "JSON true": (b"true", "application/json", {}),
        "JSON with a BOM": (b"\xef\xbb\xbf" + b'{"a": 1}', "application/json", {}),
        "invalid UTF-8 in JSON": (json_bad, "application/json", {}),
        "UTF-16 JSON": (json.dumps({"a": 1}).encode("utf-16"), "application/json", {}),
        "invalid UTF-8 in a form body": (form_bad, "application/x-www-form-urlencoded", {}),
        "unknown charset": (b"a=1", "application/x-www-form-urlencoded; charset=nope", {}),
        "gzip that is not": (b"not gzip", "application/json", {"Content-Encoding": "gzip"}),
        "multipart without boundary": (b"--x\r\n", "multipart/form-data", {}),
        "multipart with invalid UTF-8": (b"--b\r\nContent-Disposition: form-data; name=\"" + first.encode()
                                         + b"\"\r\n\r\n\xff\xfe\r\n--b--\r\n", "multipart/form-data; boundary=b", {}),
        "XML": (b"<a>1</a>", "application/xml", {}),
    }


BODY_ENDPOINTS = sorted(n for n in SPEC if SPEC[n] and "POST" in methods_of(n)
                        and any(f.required and f.name in SPEC[n][0].params for f in SPEC[n][0].fields))


async def test_malformed_bodies_are_refused(world):
    """Every POST endpoint with a required field, every malformed body kind: a 4xx with a code."""
    http, ids = world
    failures = []
    for name in BODY_ENDPOINTS:
        for what, (body, ctype, extra) in malformed_bodies(name).items():
            try:
                await refused(http, f"POST {name} ({what})", "POST", name, None, {}, ids, body=body,
                              headers={"Content-Type": ctype, **extra})
            except AssertionError as e:
                failures.append(str(e).splitlines()[0])
    assert failures == [], f"{len(failures)} refusals went wrong:\n" + "\n".join(failures)


_CTYPES = ["application/json", "application/x-www-form-urlencoded", "text/plain", "application/octet-stream",
           "multipart/form-data; boundary=zz", "application/json; charset=utf-8", "application/json; charset=latin-1"]


@settings(FUZZ, max_examples=max(20, EXAMPLES // 3))
@given(name=st.sampled_from(BODY_ENDPOINTS), body=st.one_of(
    st.binary(max_size=300), st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"\xff" * 10, b"{\"a\": \"\xff\"}", b"a=\xff&b=%FF", b"[]", b"{}", b"\x00" * 5])),
       ctype=st.sampled_from(_CTYPES))
async def test_fuzz_bad_bodies(world, name, body, ctype):
    """Random bytes under a content type: none of them carries the endpoint's required fields."""
    http, ids = world
    what = f"POST {name} {ctype} {short(body)}"
    note(what)
    await refused(http, what, "POST", name, None, {}, ids, body=body, headers={"Content-Type": ctype})


# --- what the fuzz found, pinned ------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [
    ("recharge", {"customer_id": "cust-1\n", "amount": "5", "request_id": "fz-nl-1"}),
    ("recharge", {"customer_id": "cust-1", "amount": "5", "request_id": "fz-nl-2\n"}),
    ("account_update", {"customer_id": "cust-9\n", "credit_limit": "100"}),
    ("authorize", {"customer_id": "cust-1", "amount": "1", "request_id": "fz-nl-3\n"}),
])
async def test_an_id_with_a_trailing_newline_is_refused(world, name, params):
    """An id holds letters, digits and _ . : @ - only; "cust-1\\n" is not "cust-1" and must be
    refused, not stored as a new customer / key (found by test_fuzz_invalid_params)."""
    http, ids = world
    await refused(http, f"POST {name} {params}", "POST", name, "json", {k: ("json", v) for k, v in params.items()},
                  ids)


# --- every path under the module, not only the API: no 5xx (issue 12 item 12) --------------------------
MODULE_PAGES = sorted(str(p.relative_to(WWWROOT)) for p in Path(WWWROOT).rglob("*")
                      if p.is_file() and p.parts[len(Path(WWWROOT).parts)] != "api")
MISSING_PAGES = ["nope.ui", "nope.dspy", "sync/nope.dspy", "login_x.dspy", "loginx", "appcodes/nope.dspy",
                 "missing.css", "bricks/x.js", "appcodes/", "sync/", "api/", "appcodes/%2e%2e/nope.ui"]
_CRUD_FIELDS = ("id", "name", "hierarchy_flg", "parentid", "k", "v", "page", "rows", "sort", "_webbricks_")


@st.composite
def module_requests(draw):
    """A request to a page, a generated CRUD endpoint, the sync export or a missing file, with
    any method, hostile parameter values, as query, form or JSON, from this site or another."""
    path = draw(st.sampled_from(MODULE_PAGES + MISSING_PAGES))
    method = draw(st.sampled_from(("GET", "POST", "POST", "PUT", "DELETE")))
    fields = draw(st.dictionaries(st.sampled_from(_CRUD_FIELDS),
                                  st.one_of(st.text(max_size=40), st.sampled_from(["victim", "NaN", "null", "", "x" * 40,
                                                                                   "1; drop table appcodes", "-1",
                                                                                   "99999999999999999999", "[1]"])),
                                  max_size=5))
    transport = draw(st.sampled_from(("query", "form", "json", "garbage")))
    origin = draw(st.sampled_from(("own", "evil", "none")))
    return path, method, fields, transport, origin


async def _module_request(http, path, method, fields, transport, origin):
    url = f"/billing_module/{path}"
    headers = {"own": {"Origin": str(http.client.make_url("/")).rstrip("/")},
               "evil": {"Origin": "https://evil.example"}, "none": {}}[origin]
    body = None
    if transport == "query" and fields:
        url += "?" + urllib.parse.urlencode(fields)
    elif transport == "form":
        body = urllib.parse.urlencode(fields).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif transport == "json":
        body = json.dumps(fields).encode()
        headers["Content-Type"] = "application/json"
    elif transport == "garbage":
        body, headers["Content-Type"] = b"\xff\xfe{[", "application/json"
    r = await http.client.request(method, url, data=body, headers=headers)
    return r.status, await r.text(errors="replace")


@FUZZ
@given(req=module_requests())
async def test_fuzz_pages_crud_and_missing_paths_never_5xx(world, req):
    """Logged in as the admin (the CRUD endpoints and pages need the session): whatever the path,
    method, parameters or origin, the answer is never a 5xx."""
    http, _ = world
    r = await http.client.post("/billing_module/login.dspy", data={"username": "admin", "password": http.core.admin_password},
                               headers={"Origin": str(http.client.make_url("/")).rstrip("/")})
    assert r.status == 200
    note(short(req))
    status, text = await _module_request(http, *req)
    assert status < 500, f"{short(req)} -> {status}: {text[:300]}"


async def test_every_page_and_crud_endpoint_answers_without_5xx(world):
    """Each file under the module once per method, no parameters, logged in and not."""
    http, _ = world
    problems = []
    for logged_in in (False, True):
        if logged_in:
            await http.client.post("/billing_module/login.dspy",
                                   data={"username": "admin", "password": http.core.admin_password},
                                   headers={"Origin": str(http.client.make_url("/")).rstrip("/")})
        for path in MODULE_PAGES + MISSING_PAGES:
            for method in ("GET", "POST", "DELETE"):
                status, text = await _module_request(http, path, method, {}, "form", "own")
                if status >= 500:
                    problems.append(f"{method} {path} (logged in: {logged_in}) -> {status}: {text[:200]}")
    assert problems == [], "\n".join(problems)

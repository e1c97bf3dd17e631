"""Provider usage objects taken as sent (issue 17): the one table in provider_usage.py, read on
usage objects shaped as each provider documents them, then priced to the micro-unit."""
import datetime
import json

import pytest

from billing_module.accounting import parse_event
from billing_module.errors import InvalidParam
from billing_module.pricing import Usage, price_usage
from billing_module.provider_usage import MAPPINGS, merged_event, usage_factors
from tests.helpers import seed_pricing, units, usage
from tests.test_usage_factors import program

# OpenAI prompt caching guide (platform.openai.com/docs/guides/prompt-caching), "usage" of a chat
# completion with a cache hit: prompt_tokens include the cached tokens.
OPENAI_CHAT_CACHED = {
    "prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
    "prompt_tokens_details": {"cached_tokens": 1920},
    "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0,
                                  "rejected_prediction_tokens": 0},
}
# OpenAI API reference, chat completion object (platform.openai.com/docs/api-reference/chat/object),
# usage with every detail field; the counts of an audio (gpt-4o-audio) reply with reasoning are ours.
OPENAI_CHAT_AUDIO = {
    "prompt_tokens": 1200, "completion_tokens": 900, "total_tokens": 2100,
    "prompt_tokens_details": {"cached_tokens": 200, "audio_tokens": 700},
    "completion_tokens_details": {"reasoning_tokens": 100, "audio_tokens": 600,
                                  "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0},
}
# OpenAI reasoning guide (platform.openai.com/docs/guides/reasoning), Responses API usage.
OPENAI_RESPONSES = {
    "input_tokens": 75, "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 1186, "output_tokens_details": {"reasoning_tokens": 1024}, "total_tokens": 1261,
}
# Anthropic Messages API reference (docs.anthropic.com/en/api/messages), "usage" with prompt caching
# (docs.anthropic.com/en/docs/build-with-claude/prompt-caching): input_tokens exclude the cache reads
# and writes; cache_creation breaks the writes down by TTL.
ANTHROPIC_CACHED = {
    "input_tokens": 50, "cache_read_input_tokens": 1800, "cache_creation_input_tokens": 556,
    "cache_creation": {"ephemeral_5m_input_tokens": 456, "ephemeral_1h_input_tokens": 100},
    "output_tokens": 503, "service_tier": "standard",
    "server_tool_use": {"web_search_requests": 2},
}
# Anthropic before the TTL breakdown: every write is a 5-minute write.
ANTHROPIC_PLAIN = {"input_tokens": 2095, "cache_creation_input_tokens": 20000, "cache_read_input_tokens": 0,
                   "output_tokens": 503}
# Gemini API context caching guide (ai.google.dev/gemini-api/docs/caching), usageMetadata of a
# reply from cached content: promptTokenCount includes cachedContentTokenCount.
GEMINI_CACHED = {"usageMetadata": {"promptTokenCount": 696219, "cachedContentTokenCount": 696190,
                                   "candidatesTokenCount": 214, "totalTokenCount": 696433}}
# Gemini API reference, UsageMetadata (ai.google.dev/api/generate-content#UsageMetadata), a thinking
# model with an image and audio in the prompt: thoughtsTokenCount is not in candidatesTokenCount.
GEMINI_THINKING = {
    "promptTokenCount": 1858, "candidatesTokenCount": 150, "thoughtsTokenCount": 920, "totalTokenCount": 2928,
    "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}, {"modality": "IMAGE", "tokenCount": 1290},
                            {"modality": "AUDIO", "tokenCount": 558}],
}


@pytest.mark.parametrize("usage_format, usage_object, factors", [
    ("openai", OPENAI_CHAT_CACHED, {"input_tokens": 2006, "output_tokens": 300, "cached_tokens": 1920}),
    ("openai_chat", OPENAI_CHAT_AUDIO, {"input_tokens": 1200, "output_tokens": 900, "cached_tokens": 200,
                                        "audio_input_tokens": 700, "reasoning_tokens": 100,
                                        "audio_output_tokens": 600}),
    ("openai", OPENAI_RESPONSES, {"input_tokens": 75, "output_tokens": 1186, "reasoning_tokens": 1024}),
    ("openai_responses", OPENAI_RESPONSES, {"input_tokens": 75, "output_tokens": 1186, "reasoning_tokens": 1024}),
    # input 50 + reads 1800 + writes 456 + 100 = 2406
    ("anthropic", ANTHROPIC_CACHED, {"input_tokens": 2406, "output_tokens": 503, "cached_tokens": 1800,
                                     "cache_write_tokens": 456, "cache_write_1h_tokens": 100,
                                     "web_search_calls": 2}),
    ("anthropic", ANTHROPIC_PLAIN, {"input_tokens": 22095, "output_tokens": 503, "cache_write_tokens": 20000}),
    ("gemini", GEMINI_CACHED, {"input_tokens": 696219, "output_tokens": 214, "cached_tokens": 696190}),
    # output 150 + thoughts 920 = 1070
    ("gemini", GEMINI_THINKING, {"input_tokens": 1858, "output_tokens": 1070, "reasoning_tokens": 920,
                                 "image_input_tokens": 1290, "audio_input_tokens": 558}),
])
def test_the_table_reads_each_documented_object(usage_format, usage_object, factors):
    assert usage_factors(usage_object, usage_format) == factors
    Usage.from_event({"model_name": "m", **factors})   # the parts fit in their wholes


def test_every_mapped_factor_is_a_pricing_factor():
    from billing_module.pricing import COUNT_FIELDS
    assert {f for table in MAPPINGS.values() for f in table} <= set(COUNT_FIELDS)


SONNET = program([
    {"price_factors": "input_tokens", "unit_prices": "3", "unit": "M"},
    {"price_factors": "output_tokens", "unit_prices": "15", "unit": "M"},
    {"price_factors": "cached_tokens", "unit_prices": "0.3", "unit": "M"},
    {"price_factors": "cache_write_tokens", "unit_prices": "3.75", "unit": "M"},
    {"price_factors": "cache_write_1h_tokens", "unit_prices": "6", "unit": "M"},
    {"price_factors": "web_search_calls", "unit_prices": "0.01"},
])


def test_anthropic_usage_priced_to_the_micro_unit():
    factors = usage_factors(ANTHROPIC_CACHED, "anthropic")
    r = price_usage(SONNET, Usage.from_event({"model_name": "m", **factors}), datetime.date(2026, 3, 1))
    assert {ln.factor: ln.amount for ln in r.lines} == {
        "input_tokens": 150,            # 2406 - 1800 - 456 - 100 = 50 x 3 / 1e6 = 0.00015
        "output_tokens": 7_545,         # 503 x 15 / 1e6 = 0.007545
        "cached_tokens": 540,           # 1800 x 0.3 / 1e6 = 0.00054
        "cache_write_tokens": 1_710,    # 456 x 3.75 / 1e6 = 0.00171
        "cache_write_1h_tokens": 600,   # 100 x 6 / 1e6 = 0.0006
        "web_search_calls": 20_000,     # 2 x 0.01
    }
    assert r.amount == 30_545


GPT = program([
    {"price_factors": "input_tokens", "unit_prices": "2.5", "unit": "M"},
    {"price_factors": "output_tokens", "unit_prices": "10", "unit": "M"},
    {"price_factors": "cached_tokens", "unit_prices": "1.25", "unit": "M"},
])


def test_openai_cached_usage_priced_to_the_micro_unit():
    factors = usage_factors(OPENAI_CHAT_CACHED, "openai")
    r = price_usage(GPT, Usage.from_event({"model_name": "m", **factors}), datetime.date(2026, 3, 1))
    # input 2006 - 1920 = 86 x 2.5 / 1e6 = 0.000215; output 300 x 10 / 1e6 = 0.003; cached 1920 x 1.25 / 1e6 = 0.0024
    assert [(ln.factor, ln.amount) for ln in r.lines] == [("input_tokens", 215), ("output_tokens", 3_000),
                                                          ("cached_tokens", 2_400)]


@pytest.mark.parametrize("event, message", [
    ({"usage": OPENAI_RESPONSES}, "usage_format: required with usage"),
    ({"usage": OPENAI_RESPONSES, "usage_format": "azure"}, "usage_format: required with usage, one of"),
    ({"usage_format": "openai"}, "usage_format: given without usage"),
    ({"usage": [1], "usage_format": "openai"}, "usage: must be an object"),
    ({"usage": "{not json", "usage_format": "openai"}, "usage: not valid JSON"),
    ({"usage": {"prompt_tokens": 1, "note": "x" * 9000}, "usage_format": "openai"}, "usage: longer than 8192"),
    ({"usage": {"prompt_tokens": -1}, "usage_format": "openai"}, "usage.prompt_tokens"),
    ({"usage": {"prompt_tokens": 1.5}, "usage_format": "openai"}, "usage.prompt_tokens"),
    ({"usage": {"promptTokenCount": 3, "promptTokensDetails": {"x": 1}}, "usage_format": "gemini"},
     "must be a list"),
    ({"usage": OPENAI_RESPONSES, "usage_format": "openai", "input_tokens": 75}, "send either usage or the factors"),
    ({"usage": OPENAI_RESPONSES, "usage_format": "openai", "prompt_tokens": 75}, "send either usage or the factors"),
    # reads cannot exceed the input they are part of
    ({"usage": {"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 11}}, "usage_format": "openai"},
     "cached_tokens: must not exceed input_tokens"),
])
def test_bad_usage_is_a_clear_invalid_param(event, message):
    with pytest.raises(InvalidParam, match=message):
        parse_event(bare("bad", **event))


def bare(request_id, **kw):
    """An event without factors of its own (they come from its usage object)."""
    return {k: v for k, v in usage(request_id).items() if not k.endswith("_tokens")} | kw


def test_usage_as_a_json_string_is_read_as_the_object():
    assert merged_event({"usage": json.dumps(OPENAI_RESPONSES), "usage_format": "openai"})["usage"] == OPENAI_RESPONSES


async def test_accounting_keeps_the_original_object_and_charges_its_factors(core):
    await seed_pricing(core)
    await core.ledger.recharge("cust-1", units("1"), "r1")
    event = bare("prov-1")
    posted = await core.accounting.post_usage(dict(event, usage=OPENAI_CHAT_CACHED, usage_format="openai"))
    # chat-a has no cached rule: all 2006 input at 2.0 / 1e6 = 0.004012; 300 output x 8.0 / 1e6 = 0.0024
    assert posted["amount"] == "0.006412"
    rec = await core.accounting.record(request_id="prov-1")
    payload = json.loads(rec["payload"])
    assert payload["usage"] == OPENAI_CHAT_CACHED and payload["usage_format"] == "openai"
    assert (int(rec["input_tokens"]), int(rec["cached_tokens"])) == (2006, 1920)
    # the queued path charges the same from the stored payload
    await core.accounting.submit_usage(dict(event, request_id="prov-2", usage=OPENAI_CHAT_CACHED,
                                            usage_format="openai"))
    await core.accounting.account_pending()
    assert int((await core.accounting.record(request_id="prov-2"))["amount"]) == 6_412


async def test_http_accounting_takes_the_provider_object_and_refuses_a_bad_one(http):
    await seed_pricing(http.core)
    await http.core.ledger.recharge("cust-1", units("1"), "r1")
    event = bare("http-1", usage=ANTHROPIC_PLAIN, usage_format="anthropic")
    status, body = await http.post("api/accounting.dspy", http.admin_key, json=event)
    # chat-a prices no cache writes: the 20,000 writes are unpriced, not billed as input
    assert (status, body["code"], body["unpriced_factors"]) == (404, "unpriced_factor", ["cache_write_tokens"])
    status, body = await http.post("api/accounting.dspy", http.admin_key,
                                   json=bare("http-2", usage=ANTHROPIC_PLAIN, usage_format="claude"))
    assert (status, body["code"]) == (400, "invalid_param") and "usage_format" in body["message"]
    status, body = await http.post("api/quote.dspy", http.admin_key,
                                   json=bare("q", usage=OPENAI_CHAT_CACHED, usage_format="openai"))
    assert (status, body["amount"]) == (200, "0.006412")
    assert (await http.core.ledger.balance("cust-1"))["balance"] == "1.000000"

"""The faster writers of stored and hashed JSON write exactly the text of the ``json.dumps`` forms
they replace: a stored record's ``price_lines``, ``payload_hash`` (the idempotency of every stored
request depends on it) and a plain API reply (the same values once parsed)."""
import hashlib
import json
from decimal import Decimal

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from billing_module import accounting, ids, jsontext
from billing_module.api.registry import reply
from billing_module.pricing import PriceLine, PriceResult


def old_hash(payload):
    """``payload_hash`` as it was written before orjson (the form of every stored hash)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# every character but the surrogates (which no UTF-8 text holds), the ASCII controls, quotes,
# backslash and the edges of the planes over-weighted
texts = st.text(st.one_of(st.characters(blacklist_categories=("Cs",)),
                          st.sampled_from('\x00\x01\x08\t\n\x0b\x0c\r\x1f "\\/\x7f\x80\u2028\u2029\ufeff\uffff'
                                          '\U00010000\U0010ffff')), max_size=20)
ints = st.one_of(st.integers(-2**63, 2**63 - 1), st.integers(-10**30, 10**30),
                 st.sampled_from([0, -1, 2**63 - 1, -2**63, 2**63, -2**63 - 1, 2**64]))
flat_values = st.one_of(texts, ints, st.none())
nested = st.recursive(st.one_of(flat_values, st.booleans(), st.floats(allow_nan=True, allow_infinity=True)),
                      lambda inner: st.one_of(st.lists(inner, max_size=4),
                                              st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(texts, flat_values, max_size=16))
def test_flat_payload_hash_is_json_dumps(payload):
    assert ids.payload_hash(payload) == old_hash(payload)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(texts, st.one_of(flat_values, nested), max_size=8))
def test_any_payload_hash_is_json_dumps(payload):
    assert ids.payload_hash(payload) == old_hash(payload)


def test_hash_of_other_values_is_json_dumps():
    """What the flat path must leave to json: a bool, a float, a Decimal (str()), an int key."""
    for payload in ({"a": True}, {"a": 1.5e-7}, {"a": Decimal("1.50")}, {1: "x"}, {"a": [1, {"b": None}]},
                    {"é": "ü", "\U00010000": "\uffff"}, {}):
        assert ids.payload_hash(payload) == old_hash(payload)


def test_lone_surrogate_still_refused_as_before():
    for payload in ({"a": "\ud800"}, {"a": {"b": "\udfff"}}):
        for hasher in (old_hash, ids.payload_hash):
            try:
                hasher(payload)
            except UnicodeEncodeError:
                continue
            raise AssertionError("a lone surrogate has no UTF-8 form")


def test_parsed_event_hash_unchanged():
    raw = {"request_id": "r-1", "customer_id": "c-1", "model_name": "模型-x", "input_tokens": 12, "output_tokens": 3,
           "use_time": "2026-01-02 03:04:05", "attributes": {"region": "北京", "ratio": 0.25, "n": [1, 2]}}
    for ev in (accounting.parse_event(raw), accounting.parse_event(dict(raw, attributes=None))):
        hashed = dict(ev.payload)
        assert ev.hash == old_hash(hashed)


lines = st.builds(PriceLine, texts, texts, st.one_of(texts, st.none()), texts,
                  st.integers(-10**18, 10**18), st.integers(-10**18, 10**18))


@settings(max_examples=300, deadline=None)
@given(st.lists(lines, max_size=4), st.lists(texts, max_size=3))
def test_price_lines_text_is_json_dumps(price_lines, unpriced):
    price = PriceResult(0, 0, 0, "1", "CNY", "p", "v", price_lines, tuple(unpriced))
    old = json.dumps([ln.to_dict() for ln in price.lines] + [{"factor": f, "unpriced": True} for f in price.unpriced])
    assert accounting._price_lines_json(price) == old


@settings(max_examples=100, deadline=None)
@given(st.lists(lines, max_size=4), st.lists(texts, max_size=3))
def test_view_from_stored_lines_is_the_prices(price_lines, unpriced):
    price = PriceResult(0, 0, 0, "1", "CNY", "p", "v", price_lines, tuple(unpriced))
    view = accounting.record_view({"id": "x", "amount": 5, "price_lines": accounting._price_lines_json(price)})
    assert view["lines"] == [ln.to_dict() for ln in price_lines] and view["unpriced_factors"] == unpriced


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(texts, st.one_of(flat_values, st.booleans(),
                                        st.recursive(flat_values, lambda inner: st.one_of(
                                            st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
                                            max_leaves=10)), max_size=8))
def test_plain_reply_parses_as_json_dumps(data):
    body = reply(data, plain=True).body
    assert json.loads(body) == json.loads(json.dumps(data, ensure_ascii=False, default=str))


def test_plain_reply_leaves_what_orjson_writes_otherwise_to_json():
    import datetime
    data = {"when": datetime.datetime(2026, 1, 2, 3, 4, 5), "big": 2**70, 3: "int key"}
    for value in data.items():
        one = dict([value])
        assert reply(one, plain=True).text == reply(one).text == json.dumps(one, ensure_ascii=False, default=str)
    assert orjson.loads(reply({"a": "é"}, plain=True).body) == {"a": "é"}
    assert reply({"a": 1}, plain=True).content_type == "application/json"


json_values = st.recursive(st.one_of(texts, ints, st.none(), st.booleans(),
                                     st.floats(allow_nan=True, allow_infinity=True)),
                           lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                   st.dictionaries(texts, inner, max_size=4)),
                           max_leaves=16)


def same(a, b):
    """Equal values of equal types all the way down (1 == 1.0 == True would hide a change); NaN is NaN."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


@settings(max_examples=500, deadline=None)
@given(json_values, st.booleans())
def test_loads_reads_what_json_reads(value, ascii_text):
    text = json.dumps(value, ensure_ascii=ascii_text)
    assert same(jsontext.loads(text), json.loads(text))
    assert same(jsontext.loads(text.encode("utf-8")), json.loads(text.encode("utf-8")))


def test_loads_of_texts_orjson_reads_otherwise():
    for text in ('{"n": 123456789012345678901234567890}', '{"n": -9223372036854775809}', '[18446744073709551616]',
                 '{"x": NaN, "y": -Infinity}', '[1e400]', '"\\ud800"', '{"a": 1, "a": 2}',
                 '{"s": "12345678901234567890"}'):
        assert same(jsontext.loads(text), json.loads(text)), text
    for bad in ('{"a": 1,}', "", "[1] x", "\ufeff[1]"):
        for loader in (json.loads, jsontext.loads):
            try:
                loader(bad)
            except ValueError:
                continue
            raise AssertionError(f"{bad!r} is not JSON")


def test_stored_payload_rebuilds_the_same_event():
    raw = {"request_id": "r-2", "customer_id": "c-1", "model_name": "m", "input_tokens": 7,
           "use_time": "2026-01-02 03:04:05",
           "attributes": {"big": 2**70, "f": 0.1, "neg": -2**63 - 1, "ü": ["é", None, True]}}
    ev = accounting.parse_event(raw)
    text = accounting._payload_text(ev.payload)
    assert text == json.dumps(ev.payload, ensure_ascii=False)
    assert same(jsontext.loads(text), json.loads(text))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(texts, nested, max_size=8))
def test_payload_text_is_json_dumps(payload):
    assert accounting._payload_text(payload) == json.dumps(payload, ensure_ascii=False)
    try:
        json.dumps({"x": object()})
    except TypeError as e:
        refused = str(e)
    try:
        accounting._payload_text({"x": object()})
    except TypeError as e:
        assert str(e) == refused
    else:
        raise AssertionError("an object json cannot write is refused")


"""JSON written and read by orjson where its text (or the values it reads) is provably what the
standard ``json`` module gives, and by ``json`` everywhere else: the stored hashes, payloads and
price lines of existing records stay byte for byte what they were (tests/test_canonical_json.py).
"""
import json
import re
from typing import Any

import orjson

# the canonical form: keys sorted, no spaces, text as UTF-8 (not \u escapes), anything else as str()
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode
_FLAT_TYPES = frozenset((str, int, type(None)))
# orjson reads an integer past 64 bits as a float, json as an int: text with such a run of digits
# (anywhere, a string's too) is read by json
_LONG_DIGITS = re.compile(r"[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(rb"[0-9]{19}")
_PLAIN_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS


def canonical(payload: Any) -> bytes:
    """``json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
    default=str)`` as UTF-8. A flat object (string, whole number or null values: an event
    without attributes or a provider object) is written by orjson, whose text for those is the
    same character for character; anything else, and what orjson refuses (a key that is not a
    string, a number past 64 bits, a lone surrogate, which then fails to encode as before), by
    json. The values' types are gathered in C: the check is per event on every path."""
    if type(payload) is dict and set(map(type, payload.values())) <= _FLAT_TYPES:
        try:
            return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return _canonical(payload).encode("utf-8")


def loads(text: str | bytes) -> Any:
    """``json.loads(text)``: the same values (floats are read correctly rounded by both; a key
    given twice keeps its last value in both). What orjson refuses (NaN, a number past a float's
    range, a lone surrogate) goes to json, which reads or refuses it as it always did; so does
    text that orjson read a float from and that has a long run of digits (an integer past 64
    bits, which orjson reads as a float). Text without floats, the usual event, is read once."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)
    if not _has_float(value):
        return value
    long_digits = _LONG_DIGITS.search(text) if isinstance(text, str) else _LONG_DIGITS_BYTES.search(text)
    return json.loads(text) if long_digits else value


def _has_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return True
    if kind is dict:
        return any(_has_float(v) for v in value.values() if type(v) in _NESTED)
    if kind is list:
        return any(_has_float(v) for v in value if type(v) in _NESTED)
    return False


_NESTED = (float, dict, list)


def plain(data: Any) -> bytes | None:
    """``data`` (plain data: strings, whole numbers, booleans, nulls, lists, objects) as UTF-8
    JSON text that parses to the same values as ``json.dumps(data)``'s, or None where orjson
    would not write what json does (a date, a dataclass, a number past 64 bits, a non-string key)."""
    try:
        return orjson.dumps(data, option=_PLAIN_OPTIONS)
    except orjson.JSONEncodeError:
        return None

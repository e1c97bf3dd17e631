import hashlib
import json
import uuid

import orjson


def new_id():
    """32 hex characters: fits the platform's str(32) id columns."""
    return uuid.uuid4().hex


# the canonical form: keys sorted, no spaces, text as UTF-8 (not \u escapes), anything else as str()
_canonical = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode
_FLAT_TYPES = (str, int, type(None))
_INT64 = 2**63


def payload_hash(payload):
    """sha256 of a canonical JSON form: the same request sent again hashes the same."""
    return hashlib.sha256(canonical_json(payload)).hexdigest()


def canonical_json(payload):
    """The canonical form as UTF-8 bytes. A flat object (string keys; string, whole number or
    null values: an event without attributes or a provider object) is written by orjson, whose
    text for those types is the same as ``json.dumps``'s (tests/test_canonical_json.py checks every
    character); anything else, and anything orjson refuses (a lone surrogate), by ``json``."""
    if type(payload) is dict and all(type(k) is str and type(v) in _FLAT_TYPES and
                                     (type(v) is not int or -_INT64 <= v < _INT64)
                                     for k, v in payload.items()):
        try:
            return orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)
        except orjson.JSONEncodeError:
            pass
    return _canonical(payload).encode("utf-8")

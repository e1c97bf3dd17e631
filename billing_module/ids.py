import hashlib
import json
import uuid


def new_id():
    """32 hex characters: fits the platform's str(32) id columns."""
    return uuid.uuid4().hex


def payload_hash(payload):
    """sha256 of a canonical JSON form: the same request sent again hashes the same."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

import hashlib
import uuid

from .jsontext import canonical


def new_id():
    """32 hex characters: fits the platform's str(32) id columns."""
    return uuid.uuid4().hex


def payload_hash(payload):
    """sha256 of a canonical JSON form: the same request sent again hashes the same."""
    return hashlib.sha256(canonical(payload)).hexdigest()

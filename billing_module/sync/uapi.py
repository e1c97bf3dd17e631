"""Upstream API definitions (``uapi_cache``): how a call to a provider is made. A definition
with an unknown HTTP method or stream mode cannot be called, so the page is refused."""
from .base import EntitySync, PageError

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")
STREAM_MODES = ("stream", "none", "async")


class UapiSync(EntitySync):
    entity = "uapi"

    def validate(self, items):
        for item in items:
            if not isinstance(item, dict):
                continue
            key = str(item.get("id"))[:32]
            path, method, stream = item.get("path"), item.get("httpmethod"), item.get("stream")
            if not isinstance(path, str) or not path.strip():
                raise PageError(f"uapi {key}: path is required")
            if not isinstance(method, str) or method.upper() not in METHODS:
                raise PageError(f"uapi {key}: httpmethod {str(method)[:16]!r} is not one of {', '.join(METHODS)}")
            if stream is not None and stream not in STREAM_MODES:
                raise PageError(f"uapi {key}: stream {str(stream)[:16]!r} is not one of {', '.join(STREAM_MODES)}")

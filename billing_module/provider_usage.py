"""A provider's usage object, as the provider sent it, read as this module's usage factors.

One table, ``MAPPINGS``: for each ``usage_format`` and each factor, the provider fields whose
sum is that factor. The providers disagree on what their input count
means, and the table is where that is settled once: OpenAI's ``prompt_tokens`` already include
the cached and audio tokens (this module's convention, see docs/pricing.md "Parts of input and
output"); Anthropic's ``input_tokens`` exclude cache reads and writes, so they are added back;
Gemini's ``candidatesTokenCount`` excludes the thinking tokens, which are billed as output.

A path is dotted keys; ``name[key=VALUE]`` picks the item of a list whose ``key`` is ``VALUE``
(Gemini's per-modality details). A missing field counts as 0; a present one must be a whole
number. The event stores the original object; the factors are derived from it.
"""
import json
from collections.abc import Mapping
from typing import Any

from .errors import InvalidParam
from .money import parse_count
from .pricing import ALIASES, COUNT_FIELDS

_OPENAI_CHAT: dict[str, tuple[str, ...]] = {
    "input_tokens": ("prompt_tokens",),
    "output_tokens": ("completion_tokens",),
    "cached_tokens": ("prompt_tokens_details.cached_tokens",),
    "audio_input_tokens": ("prompt_tokens_details.audio_tokens",),
    "reasoning_tokens": ("completion_tokens_details.reasoning_tokens",),
    "audio_output_tokens": ("completion_tokens_details.audio_tokens",),
}
_OPENAI_RESPONSES: dict[str, tuple[str, ...]] = {
    "input_tokens": ("input_tokens",),
    "output_tokens": ("output_tokens",),
    "cached_tokens": ("input_tokens_details.cached_tokens",),
    "reasoning_tokens": ("output_tokens_details.reasoning_tokens",),
}
# Anthropic's writes: the per-TTL breakdown when the reply has one, else the total (all 5-minute,
# the only kind before the breakdown existed). ``a|b`` reads the first of the fields present.
_WRITES_5M = "cache_creation.ephemeral_5m_input_tokens|cache_creation_input_tokens"
_WRITES_1H = "cache_creation.ephemeral_1h_input_tokens"
MAPPINGS: dict[str, dict[str, tuple[str, ...]]] = {
    "openai_chat": _OPENAI_CHAT,
    "openai_responses": _OPENAI_RESPONSES,
    "anthropic": {
        "input_tokens": ("input_tokens", "cache_read_input_tokens", _WRITES_5M, _WRITES_1H),
        "output_tokens": ("output_tokens",),
        "cached_tokens": ("cache_read_input_tokens",),
        "cache_write_tokens": (_WRITES_5M,),
        "cache_write_1h_tokens": (_WRITES_1H,),
        "web_search_calls": ("server_tool_use.web_search_requests",),
    },
    "gemini": {
        "input_tokens": ("promptTokenCount", "toolUsePromptTokenCount"),
        "output_tokens": ("candidatesTokenCount", "thoughtsTokenCount"),
        "cached_tokens": ("cachedContentTokenCount",),
        "audio_input_tokens": ("promptTokensDetails[modality=AUDIO].tokenCount",),
        "image_input_tokens": ("promptTokensDetails[modality=IMAGE].tokenCount",),
        "reasoning_tokens": ("thoughtsTokenCount",),
    },
}
FORMATS = ("openai",) + tuple(MAPPINGS)
# the object is stored with the event (a text column): a bound keeps the payload far below 64 KB
MAX_USAGE_CHARS = 8192


def merged_event(raw: Mapping) -> dict:
    """The event with its ``usage`` object read as factors (``usage_factors``), as a new dict (the
    caller's to change). An event sending both the object and a factor of its own is refused:
    which one to charge would be a guess. A ``usage`` sent as a JSON string (a form post) is read
    as the object it encodes."""
    usage, usage_format = raw.get("usage"), raw.get("usage_format")
    if usage is None:
        if usage_format is not None:
            raise InvalidParam("usage_format: given without usage")
        return dict(raw)
    if isinstance(usage, str):
        try:
            usage = json.loads(usage)
        except ValueError:
            raise InvalidParam("usage: not valid JSON") from None
    if isinstance(usage, Mapping) and len(json.dumps(usage, default=str)) > MAX_USAGE_CHARS:
        raise InvalidParam(f"usage: longer than {MAX_USAGE_CHARS} characters as JSON "
                           "(a provider's is well under 1,000)")
    factors = usage_factors(usage, usage_format)
    both = sorted(name for name in COUNT_FIELDS + tuple(ALIASES) if raw.get(name) is not None)
    if both:
        raise InvalidParam(f"{', '.join(both)}: send either usage or the factors, not both")
    return dict(raw, usage=usage, **factors)


def usage_factors(usage: object, usage_format: object) -> dict[str, int]:
    """The module's factors (only the non-zero ones) for a provider usage object."""
    if not isinstance(usage, Mapping):
        raise InvalidParam("usage: must be an object (the provider's usage as sent)")
    if not isinstance(usage_format, str) or usage_format not in FORMATS:
        raise InvalidParam(f"usage_format: required with usage, one of {', '.join(FORMATS)}")
    fmt = _resolve_format(usage_format, usage)
    fields: Mapping = usage
    if fmt == "gemini" and isinstance(usage.get("usageMetadata"), Mapping):
        fields = usage["usageMetadata"]   # the whole response's field, or the object itself
    factors: dict[str, int] = {}
    for factor, paths in MAPPINGS[fmt].items():
        total = sum(_count(fields, path) for path in paths)
        if total:
            factors[factor] = total
    return factors


def _resolve_format(usage_format: str, usage: Mapping) -> str:
    """``openai`` covers both OpenAI APIs: chat completions count ``prompt_tokens``, the
    responses API ``input_tokens``."""
    if usage_format != "openai":
        return usage_format
    return "openai_responses" if "input_tokens" in usage and "prompt_tokens" not in usage else "openai_chat"


def _count(usage: Mapping, paths: str) -> int:
    """The whole number at the first of the ``|``-separated paths present; 0 if none is."""
    for path in paths.split("|"):
        node = _lookup(usage, path)
        if node is not None:
            return parse_count(node, f"usage.{path}")
    return 0


def _lookup(usage: Mapping, path: str) -> Any:
    node: Any = usage
    for step in path.split("."):
        key, _, pick = step.partition("[")
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None and pick:
            node = _pick(node, pick.rstrip("]"), path)
        if node is None:
            return None
    return node


def _pick(items: object, selector: str, path: str) -> Any:
    if not isinstance(items, list):
        raise InvalidParam(f"usage.{path}: must be a list")
    field, _, value = selector.partition("=")
    found = [item for item in items if isinstance(item, Mapping) and item.get(field) == value]
    if len(found) > 1:
        raise InvalidParam(f"usage.{path}: {field} {value} listed twice")
    return found[0] if found else None

"""Pricing programs from the central platform, and pricing one usage event.

A program (see docs/pricing.md for the full format) has dated versions; each
version holds ``unit_values`` and a list of ``pricings`` rules. A program is
validated and compiled once by ``Program.from_payload`` (YAML parsed, prices
turned into Decimals, rules indexed by factor and model); ``price_usage`` then
only looks rules up and multiplies, so pricing a cached program is cheap.

Rounding rule (the only one, shared with money.py): each priced line is
computed exactly in Decimal, ``quantity * unit_price / unit_value`` (times the
discount for the sell amount), then rounded once, half-up (``ROUND_HALF_UP``,
.5 away from zero) to the micro-unit. Totals are sums of rounded lines.
A whole-number count at a price whose per-unit value is exact (every decimal
price per token, per K or per M) takes the same rule in integers (``_int_line``:
the price as an exact fraction, one half-up division); tests/test_pricing.py
proves the two paths equal.

Parts follow the OpenAI convention: ``input_tokens`` includes ``cached_tokens``,
the cache writes and the audio and image input tokens; ``output_tokens`` includes
``reasoning_tokens`` and the audio output tokens (``PARTS``). A part with a matching rule
is billed at its own price and taken out of its whole; a part without one is billed inside
its whole when it falls back (cached, reasoning) and is unpriced otherwise.
"""

import datetime as _dt
import functools
import json
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal, Inexact
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

import yaml

from billing_module.errors import InvalidParam, NoPricing
from billing_module.money import (
    CTX,
    MAX_MICRO,
    PLACES,
    decimal_places,
    from_micro,
    parse_count,
    parse_quantity,
)

# A part of a whole token count: (part, whole, falls back). A part priced by a rule of its own is
# taken out of its whole; a part with no rule that falls back stays inside its whole (billed at the
# whole's price, as providers do for cache reads and reasoning); one that does not is unpriced
# (a cache write or an audio token billed as a text token would undercharge).
PARTS = (
    ("cached_tokens", "input_tokens", True),
    ("cache_write_tokens", "input_tokens", False),
    ("cache_write_1h_tokens", "input_tokens", False),
    ("audio_input_tokens", "input_tokens", False),
    ("image_input_tokens", "input_tokens", False),
    ("reasoning_tokens", "output_tokens", True),
    ("audio_output_tokens", "output_tokens", False),
)
_PART_NAMES = frozenset(part for part, _, _ in PARTS)
_PARTS_OF = {whole: tuple(part for part, of, _ in PARTS if of == whole) for whole in ("input_tokens", "output_tokens")}


def _values_of(names: tuple[str, ...]) -> Callable[[Any], tuple]:
    """The values of the attributes ``names`` as a tuple, read in C (attrgetter gives a single
    attribute's value bare)."""
    if len(names) > 1:
        return operator.attrgetter(*names)
    return lambda obj: tuple(getattr(obj, name) for name in names)


def _items_of(positions: tuple[int, ...]) -> Callable[[Any], tuple]:
    """The items at ``positions`` as a tuple, read in C where there are several."""
    if len(positions) > 1:
        return operator.itemgetter(*positions)
    return lambda seq: tuple(seq[i] for i in positions)


# what every Usage checks: (whole, its parts, the whole's value, the parts' values)
_PART_CHECKS = tuple((whole, names, operator.attrgetter(whole), _values_of(names))
                     for whole, names in _PARTS_OF.items())

# Counts billed on their own line: characters, calls in the event, web-search calls.
COUNTS = ("characters", "calls", "web_search_calls")
# Every whole-number field of a usage event, in line order.
COUNT_FIELDS = ("input_tokens", "output_tokens") + tuple(part for part, _, _ in PARTS) + COUNTS
FACTORS = COUNT_FIELDS + ("quantity", "flat")
# Legacy platform names, in rules and on events.
ALIASES = {"prompt_tokens": "input_tokens", "completion_tokens": "output_tokens", "duration": "quantity"}
# The unit an alias implies: a "duration" rule is per second, a "duration" on an event is seconds.
ALIAS_UNITS = {"duration": "second"}
# Units every program knows; a program's own unit_values extend and override these.
DEFAULT_UNIT_VALUES = {
    "M": 1_000_000,
    "百万": 1_000_000,
    "K": 1_000,
    "千": 1_000,
    "万": 10_000,
    "万字": 10_000,
    "10k": 10_000,
    "token": 1,
    "秒": 1,
    "second": 1,
    "image": 1,
    "张": 1,
    "char": 1,
    "call": 1,
    "次": 1,
}
MAX_DISCOUNT = Decimal(10)
# Plans kept per version (one per model priced): past this, a model is priced by looking its rules up.
MAX_PLANS = 4096
# Days whose version a program remembers (Program.version_on).
MAX_DAYS = 1024

_ONE = Decimal(1)
# the discount of a customer without one: passed as this very object, it skips the discount step
NO_DISCOUNT = _ONE
_UNPLANNED = object()
_ZERO = Decimal(0)
_MICRO_EXP = Decimal(1).scaleb(-PLACES)
# What a line's unit_price is "per" when the rule names no unit.
_BASE_UNIT = {**{part: "token" for part, _, _ in PARTS}, "input_tokens": "token", "output_tokens": "token",
              "characters": "char", "calls": "call", "web_search_calls": "call", "flat": "call"}


# ---------------------------------------------------------------- usage ----


@dataclass(frozen=True, slots=True)
class Usage:
    model_name: str
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    quantity: Decimal = _ZERO
    unit: str | None = None
    attributes: dict = field(default_factory=dict)
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    audio_input_tokens: int = 0
    image_input_tokens: int = 0
    reasoning_tokens: int = 0
    audio_output_tokens: int = 0
    characters: int = 0
    calls: int = 0
    web_search_calls: int = 0

    def __post_init__(self):
        if not isinstance(self.quantity, Decimal):
            object.__setattr__(self, "quantity", parse_quantity(self.quantity, "quantity"))
        for whole, names, read_total, read_parts in _PART_CHECKS:
            total = read_total(self)
            if sum(read_parts(self)) > total:
                parts = [(part, getattr(self, part)) for part in names if getattr(self, part)]
                listed = " + ".join(part for part, _ in parts)
                got = ", ".join(f"{part}={n}" for part, n in parts)
                raise InvalidParam(f"{listed}: must not exceed {whole} ({whole} includes them), "
                                   f"got {got} > {whole}={total}")

    @classmethod
    def from_event(cls, event):
        """Build a Usage from an API event dict, validating every field."""
        if not isinstance(event, dict):
            raise InvalidParam("event: must be an object")
        event = _legacy_fields(event)
        model = event.get("model_name")
        if not isinstance(model, str) or not model.strip():
            raise InvalidParam("model_name: required, a non-empty string")
        # the counts given (the others are 0, the fields' default)
        counts = {name: parse_count(value, name) for name in COUNT_FIELDS if (value := event.get(name)) is not None}
        value = event.get("quantity")
        quantity = _ZERO if value is None else parse_quantity(value, "quantity")
        unit = event.get("unit")
        if unit is not None and not isinstance(unit, str):
            raise InvalidParam(f"unit: must be a string, got {type(unit).__name__}")
        unit = (unit or "").strip() or None
        if quantity and unit is None:
            raise InvalidParam("unit: required when quantity is given (e.g. second, image, char, call)")
        attributes = event.get("attributes")
        if attributes is None:
            attributes = {}
        elif not isinstance(attributes, dict):
            raise InvalidParam("attributes: must be an object")
        return cls(model, quantity=quantity, unit=unit, attributes=dict(attributes), **counts)


def _legacy_fields(event):
    """The event with its legacy factor names (``ALIASES``, as in rules) read as the factors they
    stand for: a count sent under an old name is priced or reported unpriced, never dropped.
    ``duration`` is a quantity of seconds. Both names with different values is an error."""
    if not any(event.get(alias) is not None for alias in ALIASES):
        return event
    event = dict(event)
    for alias, factor in ALIASES.items():
        value = event.pop(alias, None)
        if value is None:
            continue
        if event.get(factor) is not None and str(event[factor]) != str(value):
            raise InvalidParam(f"{alias}: the legacy name of {factor}, given with a different value")
        unit = ALIAS_UNITS.get(alias)
        if unit is not None:
            if (event.get("unit") or unit) != unit:
                raise InvalidParam(f"{alias}: a number of {unit}s; unit must be {unit}, got {event['unit']!r}")
            event["unit"] = unit
        event[factor] = value
    return event


# --------------------------------------------------------------- result ----


# A line and a result are named tuples, built in C on the hot path (``_new_line``,
# ``_new_result``: a dataclass's __init__ is a Python call, as long as the rest of a line).
class PriceLine(NamedTuple):
    factor: str
    quantity: str  # billed quantity, in base units (tokens, seconds, chars...)
    unit: str  # unit_price is per one of these (e.g. "M" = per million tokens)
    unit_price: str  # undiscounted price actually applied (tier included)
    amount: int  # micro-units, discounted, rounded
    cost: int  # micro-units, rounded, never discounted

    def to_dict(self):
        return {
            "factor": self.factor,
            "quantity": self.quantity,
            "unit": self.unit,
            "unit_price": self.unit_price,
            "amount": from_micro(self.amount),
            "cost": from_micro(self.cost),
        }

    def to_json(self) -> str:
        """``json.dumps(self.to_dict())`` character for character (the stored form of a line),
        without the dict: each string through the same C escaper ``json.dumps`` uses, the text
        around the quantity once per rule (``_line_frame``)."""
        head, middle = _line_frame(self.factor, self.unit, self.unit_price)
        return (f'{head}{json_text(self.quantity)}{middle}{from_micro(self.amount)}", '
                f'"cost": "{from_micro(self.cost)}"}}')


# ``_new_line((factor, quantity, ...))`` is ``PriceLine(factor, quantity, ...)`` without its
# Python ``__new__``: a C call
_new_line = functools.partial(tuple.__new__, PriceLine)


# a version has a few rules, each with a few (factor, unit, unit_price): the accountant writes
# thousands of lines a second from the same frames
@functools.lru_cache(maxsize=4096)
def _line_frame(factor: str, unit: str | None, unit_price: str) -> tuple[str, str]:
    """A stored line's text before its quantity, and from after it up to its amount."""
    return (f'{{"factor": {json_text(factor)}, "quantity": ',
            f', "unit": {json_text(unit)}, "unit_price": {json_text(unit_price)}, "amount": "')


def json_text(value: Any) -> str:
    """``json.dumps(value)`` of one value (default options), cheaply for a string."""
    return encode_basestring_ascii(value) if type(value) is str else json.dumps(value)


class PriceResult(NamedTuple):
    amount: int
    cost: int
    original_amount: int
    discount: str
    currency: str
    program_id: str
    version_id: str
    lines: list
    # Factors with a non-zero quantity that no rule priced (billed as 0).
    unpriced: tuple = ()

    def to_dict(self):
        return {
            "amount": from_micro(self.amount),
            "cost": from_micro(self.cost),
            "original_amount": from_micro(self.original_amount),
            "discount": self.discount,
            "currency": self.currency,
            "program_id": self.program_id,
            "version_id": self.version_id,
            "lines": [line.to_dict() for line in self.lines],
            "unpriced": list(self.unpriced),
        }


# ``_new_result((amount, ...))``: ``PriceResult(amount, ...)`` in C, every field given
_new_result = functools.partial(tuple.__new__, PriceResult)


# ---------------------------------------------------------- compiled form ----


@dataclass(frozen=True, slots=True)
class _Price:
    above: int  # tier threshold on input_tokens; -1 for the rule's own prices
    price_str: str  # unit price as configured, for display
    # Line amount in micro-units = quantity * sell [/ div]. sell and cost are
    # the price in micro-units per base unit (price * 1e6 / unit value) when
    # that division is exact; otherwise div keeps the unit value so that the
    # one inexact step happens after multiplying by the quantity, and a .5 tie
    # is never lost to an earlier rounding.
    sell: Decimal
    cost: Decimal | None  # None when the cost price is 0
    div: Decimal | None
    # sell and cost as exact fractions (numerator, denominator), for whole-number quantities
    # (_int_line); None when div is set (that one division stays in Decimal).
    sell_ratio: tuple[int, int] | None
    cost_ratio: tuple[int, int] | None


@dataclass(frozen=True, slots=True)
class Rule:
    index: int  # position in the version's pricings list
    factor: str  # canonical factor name
    quantity_unit: str | None  # event unit a "quantity" rule applies to
    unit: str  # what the price is per (display)
    base: _Price
    tiers: tuple  # of _Price, highest threshold first
    model: str | None  # the "model" filter, indexed separately
    filters: tuple  # other filters: ((key, value-as-string), ...)
    specificity: int  # number of filters, model included

    def prices_for(self, input_tokens):
        for tier in self.tiers:
            if input_tokens > tier.above:
                return tier
        return self.base

    def matches(self, attributes):
        for key, expected in self.filters:
            value = attributes.get(key)
            if value is None or _filter_str(value) != expected:
                return False
        return True


@dataclass(frozen=True, slots=True, eq=False)
class Version:
    id: str
    enabled_date: _dt.date  # inclusive
    expired_date: _dt.date | None  # exclusive; None = never expires
    rules: tuple
    # lookup key ("input_tokens", ..., ("quantity", event_unit), "flat") ->
    # (model -> rules that may apply to it, rules without a model filter);
    # each tuple is ordered most specific first, then by list position.
    index: dict = field(repr=False)
    # model -> its _Plan (None: its prices depend on the event's attributes), made on first use
    plans: dict = field(default_factory=dict, init=False, repr=False)

    def valid_on(self, day):
        return self.enabled_date <= day and (self.expired_date is None or day < self.expired_date)

    def match(self, key, model, attributes):
        """The winning rule for a lookup key, or None."""
        entry = self.index.get(key)
        if entry is None:
            return None
        for rule in entry[0].get(model, entry[1]):
            if not rule.filters or rule.matches(attributes):
                return rule
        return None

    def plan(self, model):
        """The model's _Plan, or None when an attribute filter can change its prices."""
        plan = self.plans.get(model, _UNPLANNED)
        if plan is _UNPLANNED:
            plan = _Plan.of(self, model)
            if len(self.plans) < MAX_PLANS:  # model names come from events: keep the memory bounded
                self.plans[model] = plan
        return plan

    def matches_any(self, model, attributes):
        return any((r.model is None or r.model == model) and r.matches(attributes) for r in self.rules)

    def describe(self, model_name):
        """Sell prices of the rules that can apply to ``model_name`` (for a price list; no costs)."""
        out = []
        for r in self.rules:
            if r.model is not None and r.model != model_name:
                continue
            item = {"factor": r.factor, "unit": r.unit, "unit_price": r.base.price_str}
            if r.quantity_unit is not None:
                item["quantity_unit"] = r.quantity_unit
            if r.filters:
                item["filters"] = dict(r.filters)
            if r.tiers:
                item["tiers"] = [{"above_input_tokens": t.above, "unit_price": t.price_str} for t in reversed(r.tiers)]
            out.append(item)
        return out


@dataclass(frozen=True, slots=True, eq=False)
class _Plan:
    """Every lookup ``price_usage`` makes for one model in one version, made once: the rule of
    each factor, in line order. Only for a model none of whose rules has a filter besides the
    model, so that no attribute of an event can change a lookup."""
    # The quantities of an event's whole-number factors, in line order: the two wholes, the parts
    # billed apart from their whole when present (those with a rule, and those without one that
    # do not fall back: see PARTS), the COUNTS. A part that falls back to its whole is not there.
    quantities: Callable[[Usage], tuple]
    parts_end: int  # the parts are quantities[2:parts_end]
    part_wholes: tuple  # ((position of a part, position of its whole), ...)
    # ((position, factor, rule, its price when that is fixed and exact: no tiers, a ratio), ...)
    # of the factors with a rule
    priced: tuple
    unpriced: tuple  # ((position, factor), ...) of the others
    unpriced_quantities: Callable[[Any], tuple]  # quantities -> theirs (read in C: mostly all 0)
    quantity: dict  # event unit -> rule
    flat: Rule | None
    any_rule: bool  # some rule applies to the model (Version.matches_any)

    @classmethod
    def of(cls, version, model):
        rules = [r for r in version.rules if r.model is None or r.model == model]
        if any(r.filters for r in rules):
            return None

        def rule(key):
            return version.match(key, model, {})
        wholes = ("input_tokens", "output_tokens")
        parts = [(part, whole) for part, whole, falls_back in PARTS if rule(part) is not None or not falls_back]
        factors = wholes + tuple(part for part, _ in parts) + COUNTS
        unpriced = tuple(i for i, factor in enumerate(factors) if rule(factor) is None)
        return cls(
            operator.attrgetter(*factors),
            2 + len(parts),
            tuple((2 + i, wholes.index(whole)) for i, (_, whole) in enumerate(parts)),
            tuple((i, factor, r, _fixed_price(r))
                  for i, factor in enumerate(factors) if (r := rule(factor)) is not None),
            tuple((i, factors[i]) for i in unpriced),
            _items_of(unpriced),
            {key[1]: rule(key) for key in version.index if isinstance(key, tuple)},
            rule("flat"),
            bool(rules),
        )


def _fixed_price(rule):
    """The one price of an untiered rule whose per-unit value is an exact fraction (``_int_line``
    prices a whole-number quantity at it), else None."""
    return rule.base if not rule.tiers and rule.base.sell_ratio is not None else None


@dataclass(frozen=True, slots=True, eq=False)
class Program:
    id: str
    name: str
    currency: str
    versions: tuple  # ordered by enabled_date, latest first (stable)
    # day -> the version valid on it, found once (events of a day share it)
    by_day: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_payload(cls, payload):
        """Validate and compile a whole program; InvalidParam names program, version and rule."""
        if not isinstance(payload, dict):
            raise InvalidParam("pricing program: must be an object")
        pid = _ident(payload.get("id"), "pricing program: id")
        where = f"pricing program {pid}"
        name = payload.get("name")
        if name is not None and not isinstance(name, str):
            raise InvalidParam(f"{where}: name must be a string")
        currency = payload.get("currency")
        if not isinstance(currency, str) or not currency.strip():
            raise InvalidParam(f"{where}: currency is required (e.g. CNY)")
        raw_versions = payload.get("versions")
        if not isinstance(raw_versions, list) or not raw_versions:
            raise InvalidParam(f"{where}: versions must be a non-empty list")
        versions = [_parse_version(raw, where, i) for i, raw in enumerate(raw_versions)]
        versions.sort(key=lambda v: v.enabled_date, reverse=True)
        return cls(pid, name or "", currency.strip(), tuple(versions))

    def version_on(self, day):
        """The version valid on ``day``; the latest enabled_date wins."""
        version = self.by_day.get(day)
        if version is not None:
            return version
        if isinstance(day, _dt.datetime):
            day = day.date()
        for version in self.versions:
            if version.valid_on(day):
                if len(self.by_day) >= MAX_DAYS:   # days come from events: keep the memory bounded
                    self.by_day.clear()
                self.by_day[day] = version
                return version
        raise NoPricing(f"no price valid on {day.isoformat()} for program {self.id}")


# -------------------------------------------------------------- pricing ----


def price_usage(program, usage, day, discount=_ONE, *, planned=True):
    """Price one usage event with the program version valid on ``day``. ``planned=False`` looks
    every rule up for the event (the reference the version's plans are tested against)."""
    version = program.version_on(day)
    plan = version.plan(usage.model_name) if planned else None
    if discount is _ONE:
        disc, disc_str = _ONE, "1"
    else:
        try:
            disc, disc_str = _discount(discount)
        except TypeError:  # unhashable: let the parser report it
            disc, disc_str = _discount.__wrapped__(discount)
    if plan is not None:
        lines, unpriced, original = _price_planned(plan, usage, disc)
        priced_any = plan.any_rule
    else:
        lines, unpriced, original = _price_by_rules(version, usage, disc)
        priced_any = lines or version.matches_any(usage.model_name, usage.attributes)
    if not lines and (unpriced or not priced_any):
        raise NoPricing(f"no pricing rule for model {usage.model_name} in program {program.id} version {version.id}")
    amount = cost = 0
    for line in lines:
        amount += line.amount
        cost += line.cost
    if amount > MAX_MICRO or cost > MAX_MICRO or original > MAX_MICRO:
        raise InvalidParam(f"usage: priced amount exceeds {from_micro(MAX_MICRO)} {program.currency}")
    return _new_result((
        amount, cost, original, disc_str, program.currency, program.id, version.id, lines, tuple(unpriced)
    ))


def _price_by_rules(version, usage, disc):
    """(lines, unpriced factors, undiscounted total) of ``usage``, every rule looked up."""
    model = usage.model_name
    attributes = usage.attributes
    input_tokens = usage.input_tokens
    lines: list[PriceLine] = []
    unpriced = []
    original = 0  # sum of undiscounted rounded lines

    # Parts first: each one priced on its own comes out of its whole (see PARTS).
    wholes = {"input_tokens": input_tokens, "output_tokens": usage.output_tokens}
    parts = []
    for factor, whole, falls_back in PARTS:
        qty = getattr(usage, factor)
        if not qty:
            continue
        rule = version.match(factor, model, attributes)
        if rule is None and falls_back:
            continue
        wholes[whole] -= qty
        parts.append((factor, qty, rule))
    # in line order: the wholes, the parts, the counts; a rule None is looked up (parts have theirs)
    for factor, qty, rule in [(f, q, None) for f, q in wholes.items()] + parts + \
            [(f, getattr(usage, f), None) for f in COUNTS]:
        if not qty:
            continue
        if rule is None and factor not in _PART_NAMES:
            rule = version.match(factor, model, attributes)
        if rule is None:
            unpriced.append(factor)
        else:
            original += _add_line(lines, rule, factor, qty, str(qty), input_tokens, disc)

    if usage.quantity:
        rule = version.match(("quantity", usage.unit), model, attributes)
        if rule is None:
            unpriced.append("quantity")
        else:
            qty_str = format(usage.quantity, "f")
            original += _add_line(lines, rule, "quantity", usage.quantity, qty_str, input_tokens, disc)

    rule = version.match("flat", model, attributes)
    if rule is not None:
        original += _add_line(lines, rule, "flat", 1, "1", input_tokens, disc)
    return lines, unpriced, original


def _price_planned(plan, usage, disc):
    """``_price_by_rules`` with the rules the plan looked up in advance."""
    input_tokens = usage.input_tokens
    lines: list[PriceLine] = []
    original = 0

    quantities = plan.quantities(usage)
    if any(quantities[2:plan.parts_end]):  # a part billed apart comes out of its whole
        quantities = list(quantities)
        for part, whole in plan.part_wholes:
            quantities[whole] -= quantities[part]
    for i, factor, rule, fixed in plan.priced:
        qty = quantities[i]
        if not qty:
            continue
        if fixed is not None and type(qty) is int:   # the usual line: a whole count at one exact price
            line_original, amount, cost = _int_line(fixed, qty, disc)
            lines.append(_new_line((factor, str(qty), rule.unit, fixed.price_str, amount, cost)))
            original += line_original
        else:
            original += _add_line(lines, rule, factor, qty, str(qty), input_tokens, disc)
    unpriced = []
    if any(plan.unpriced_quantities(quantities)):     # rare: a factor that no rule prices
        unpriced = [factor for i, factor in plan.unpriced if quantities[i]]

    if usage.quantity:
        rule = plan.quantity.get(usage.unit)
        if rule is None:
            unpriced.append("quantity")
        else:
            qty_str = format(usage.quantity, "f")
            original += _add_line(lines, rule, "quantity", usage.quantity, qty_str, input_tokens, disc)

    if plan.flat is not None:
        original += _add_line(lines, plan.flat, "flat", 1, "1", input_tokens, disc)
    return lines, unpriced, original


def _add_line(lines, rule, factor, qty, qty_str, input_tokens, disc):
    """Append the line for ``rule``; return its undiscounted rounded amount."""
    p = rule.prices_for(input_tokens) if rule.tiers else rule.base
    if p.sell_ratio is not None and type(qty) is int:
        original, amount, cost = _int_line(p, qty, disc)
    else:
        original, amount, cost = _decimal_line(p, qty, disc)
    lines.append(_new_line((factor, qty_str, rule.unit, p.price_str, amount, cost)))
    return original


def _decimal_line(p, qty, disc):
    """(undiscounted, discounted, cost) micro-units of ``qty`` at ``p``.

    Same rule as money.round_micro (half-up to the micro-unit), inlined on
    values already in micro-units.
    """
    raw = CTX.multiply(p.sell, qty)
    if p.div is not None:
        raw = CTX.divide(raw, p.div)
    original = int(raw.to_integral_value(ROUND_HALF_UP, CTX))
    if disc is _ONE:
        amount = original
    else:
        amount = int(CTX.multiply(raw, disc).to_integral_value(ROUND_HALF_UP, CTX))
    cost = 0
    if p.cost is not None:
        raw = CTX.multiply(p.cost, qty)
        if p.div is not None:
            raw = CTX.divide(raw, p.div)
        cost = int(raw.to_integral_value(ROUND_HALF_UP, CTX))
    return original, amount, cost


def _int_line(p, qty, disc):
    """``_decimal_line`` for a whole-number ``qty`` and a price without ``div``, in exact
    integers: quantity * numerator / denominator, rounded once, half-up (n + 1/2, floored;
    every value here is >= 0)."""
    num, den = p.sell_ratio
    raw = qty * num
    original = (2 * raw + den) // (2 * den)
    if disc is _ONE:
        amount = original
    else:
        disc_num, disc_den = _ratio(disc)
        den *= disc_den
        amount = (2 * raw * disc_num + den) // (2 * den)
    cost = 0
    if p.cost_ratio is not None:
        num, den = p.cost_ratio
        cost = (2 * qty * num + den) // (2 * den)
    return original, amount, cost


# A customer base uses few distinct discounts: each one's exact fraction, computed once.
_ratio = functools.lru_cache(maxsize=1024)(Decimal.as_integer_ratio)


# A customer base uses few distinct discounts. typed=True keeps True, 1 and
# Decimal(1) (equal and same hash) apart, so a bool is still refused.
@functools.lru_cache(maxsize=1024, typed=True)
def _discount(discount):
    """discount -> (Decimal multiplier, display string)."""
    if isinstance(discount, float):
        raise InvalidParam("discount: floating-point numbers are not accepted; use a decimal string such as \"0.9\"")
    d = parse_quantity(discount, "discount", places=None)
    if not _ZERO < d <= MAX_DISCOUNT:
        raise InvalidParam(f"discount: must be greater than 0 and at most {MAX_DISCOUNT}, got {discount}")
    if d == _ONE:  # 1 in any form: the lines skip the discount step (same result)
        return _ONE, "1"
    return d, format(d.normalize(CTX), "f")


# ----------------------------------------------------------- validation ----


def _filter_str(value):
    # YAML turns "true" into a bool and JSON clients send booleans: compare both as "true"/"false".
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _ident(value, what):
    if isinstance(value, bool) or not isinstance(value, (str, int)) or not str(value).strip():
        raise InvalidParam(f"{what} is required")
    return str(value).strip()


def _parse_date(value, where, name, required):
    if value is None or value == "":
        if required:
            raise InvalidParam(f"{where}: {name} is required (YYYY-MM-DD)")
        return None
    if isinstance(value, _dt.datetime):
        return value.date()
    if isinstance(value, _dt.date):
        return value
    if isinstance(value, str):
        try:
            return _dt.date.fromisoformat(value.strip())
        except ValueError:
            pass
    raise InvalidParam(f"{where}: {name} must be a date YYYY-MM-DD, got {value!r}")


def _parse_price(value, where, name):
    if value is None:
        raise InvalidParam(f"{where}: {name} is required")
    d = parse_quantity(value, f"{where}: {name}", places=None)
    if decimal_places(d) <= PLACES:
        text = format(d.quantize(_MICRO_EXP, context=CTX), "f")
    else:
        text = format(d.normalize(CTX), "f")
    return d, text


def _per_base_unit(price, divisor):
    """(price in micro-units per base unit, leftover divisor) - see _Price."""
    micro = price.scaleb(PLACES, CTX)
    if divisor is None:
        return micro, None
    exact = CTX.copy()
    exact.traps[Inexact] = True
    try:
        return exact.divide(micro, divisor), None
    except Inexact:
        return micro, divisor


def _parse_prices(raw, where, above, divisor):
    price, text = _parse_price(raw.get("unit_prices"), where, "unit_prices")
    cost_raw = raw.get("cost_prices")
    cost = _ZERO if cost_raw is None else _parse_price(cost_raw, where, "cost_prices")[0]
    sell, div = _per_base_unit(price, divisor)
    cost_micro, cost_div = _per_base_unit(cost, divisor) if cost else (None, None)
    if div is not None or cost_div is not None:
        # One divisor per price: if either division is inexact, keep both undivided.
        sell, div = price.scaleb(PLACES, CTX), divisor
        cost_micro = cost.scaleb(PLACES, CTX) if cost else None
    if div is not None:
        return _Price(above, text, sell, cost_micro, div, None, None)
    cost_ratio = None if cost_micro is None else cost_micro.as_integer_ratio()
    return _Price(above, text, sell, cost_micro, div, sell.as_integer_ratio(), cost_ratio)


def _parse_filters(raw, where):
    if raw is None:
        return {}
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        raise InvalidParam(f"{where}: filters must be a list of {{key: value}} mappings")
    pairs: dict[str, Any] = {}
    for item in raw:
        if not isinstance(item, dict) or not item:
            raise InvalidParam(f"{where}: each filter must be a {{key: value}} mapping, got {item!r}")
        for key, value in item.items():
            if not isinstance(key, str) or not key:
                raise InvalidParam(f"{where}: filter key must be a non-empty string, got {key!r}")
            if value is None or isinstance(value, (dict, list)):
                raise InvalidParam(f"{where}: filter {key} must be a plain value, got {value!r}")
            text = _filter_str(value)
            if pairs.get(key, text) != text:
                raise InvalidParam(f"{where}: conflicting filters for {key}: {pairs[key]!r} and {text!r}")
            pairs[key] = text
    return pairs


def _parse_rule(i, raw, units, where):
    where = f"{where}, pricings[{i}]"
    if not isinstance(raw, dict):
        raise InvalidParam(f"{where}: must be a mapping")
    name = raw.get("price_factors")
    if not isinstance(name, str) or not name.strip():
        raise InvalidParam(f"{where}: price_factors is required (one of {', '.join(FACTORS)})")
    name = name.strip()
    factor = ALIASES.get(name, name)
    if factor not in FACTORS:
        known = ", ".join(FACTORS + tuple(ALIASES))
        raise InvalidParam(f"{where}: unknown price factor {name!r} (expected one of {known})")
    where = f"{where} ({name})"

    quantity_unit = None
    if factor == "quantity":
        quantity_unit = raw.get("quantity_unit")
        implied = ALIAS_UNITS.get(name)
        if implied is not None:
            if quantity_unit not in (None, implied):
                raise InvalidParam(f"{where}: {name} rules are per {implied}, got quantity_unit {quantity_unit!r}")
            quantity_unit = implied
        if not isinstance(quantity_unit, str) or not quantity_unit.strip():
            raise InvalidParam(
                f"{where}: quantity_unit is required for quantity rules (e.g. second, image, char, call)")
        quantity_unit = quantity_unit.strip()

    unit = raw.get("unit")
    divisor = None
    if unit is None or unit == "":
        unit = quantity_unit or _BASE_UNIT[factor]
    else:
        if not isinstance(unit, str) or unit not in units:
            raise InvalidParam(f"{where}: unknown unit {unit!r} (known: {', '.join(sorted(units))})")
        if units[unit] != 1:
            divisor = units[unit]
    if factor == "flat" and divisor is not None:
        raise InvalidParam(f"{where}: flat rules are priced per call; unit {unit!r} is not 1")

    base = _parse_prices(raw, where, -1, divisor)

    tiers_raw = raw.get("tiers")
    tiers = []
    if tiers_raw is not None:
        if not isinstance(tiers_raw, list):
            raise InvalidParam(f"{where}: tiers must be a list")
        seen = set()
        for j, tier in enumerate(tiers_raw):
            tier_where = f"{where}, tiers[{j}]"
            if not isinstance(tier, dict):
                raise InvalidParam(f"{tier_where}: must be a mapping")
            if tier.get("above_input_tokens") is None:
                raise InvalidParam(f"{tier_where}: above_input_tokens is required")
            above = parse_count(tier["above_input_tokens"], f"{tier_where}: above_input_tokens")
            if above in seen:
                raise InvalidParam(f"{tier_where}: duplicate threshold above_input_tokens={above}")
            seen.add(above)
            tiers.append(_parse_prices(tier, tier_where, above, divisor))
        tiers.sort(key=lambda t: t.above, reverse=True)

    filters = _parse_filters(raw.get("filters"), where)
    specificity = len(filters)
    model = filters.pop("model", None)
    return Rule(i, factor, quantity_unit, unit, base, tuple(tiers), model, tuple(filters.items()), specificity)


def _build_index(rules):
    groups: dict[Any, list[Rule]] = {}
    for rule in rules:
        key = ("quantity", rule.quantity_unit) if rule.factor == "quantity" else rule.factor
        groups.setdefault(key, []).append(rule)
    index = {}
    for key, group in groups.items():
        group.sort(key=lambda r: (-r.specificity, r.index))
        generic = tuple(r for r in group if r.model is None)
        by_model = {
            model: tuple(r for r in group if r.model is None or r.model == model)
            for model in {r.model for r in group if r.model is not None}
        }
        index[key] = (by_model, generic)
    return index


def _parse_version(raw, where, i):
    if not isinstance(raw, dict):
        raise InvalidParam(f"{where}, versions[{i}]: must be a mapping")
    vid = _ident(raw.get("id"), f"{where}, versions[{i}]: id")
    where = f"{where}, version {vid}"
    enabled = _parse_date(raw.get("enabled_date"), where, "enabled_date", required=True)
    expired = _parse_date(raw.get("expired_date"), where, "expired_date", required=False)
    if expired is not None and expired <= enabled:
        raise InvalidParam(f"{where}: expired_date {expired} must be after enabled_date {enabled}")

    data = raw.get("pricing_data")
    if isinstance(data, str):
        try:
            data = yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise InvalidParam(f"{where}: pricing_data is not valid YAML: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise InvalidParam(f"{where}: pricing_data must be a mapping with unit_values and pricings")

    units: dict[str, Any] = dict(DEFAULT_UNIT_VALUES)
    raw_units = data.get("unit_values")
    if raw_units is not None:
        if not isinstance(raw_units, dict):
            raise InvalidParam(f"{where}: unit_values must be a mapping of unit name to number")
        for key, value in raw_units.items():
            if not isinstance(key, str) or not key:
                raise InvalidParam(f"{where}: unit_values key must be a non-empty string, got {key!r}")
            units[key] = _parse_price(value, where, f"unit_values[{key}]")[0]
            if not units[key]:
                raise InvalidParam(f"{where}: unit_values[{key}] must be greater than 0")
    units = {key: Decimal(value) for key, value in units.items()}

    pricings = data.get("pricings")
    if not isinstance(pricings, list) or not pricings:
        raise InvalidParam(f"{where}: pricings must be a non-empty list")
    rules = tuple(_parse_rule(j, rule, units, where) for j, rule in enumerate(pricings))
    return Version(vid, enabled, expired, rules, _build_index(rules))

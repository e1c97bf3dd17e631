"""Configuration: built-in defaults, then a YAML file, then ``BILLING_*`` environment variables.

Every key has a default, so the standalone server runs with no file at all. Each key can be
overridden from the environment as ``BILLING_<SECTION>_<KEY>`` (``BILLING_CURRENCY`` for the
top-level keys), e.g. ``BILLING_DATABASE_DRIVER=mysql`` or ``BILLING_ACCOUNTING_BATCH_SIZE=1000``.
A wrong value is a ``ConfigError`` naming the key, raised when the config is loaded.
"""
import copy
import os
import re
import zoneinfo

import yaml

from . import clock
from .errors import ConfigError, InvalidParam

# (default, validator) per key; the validator converts and checks one value.


def _positive_int(v):
    v = int(v)
    if v <= 0:
        raise ValueError("must be a positive integer")
    return v


def _non_negative_int(v):
    v = int(v)
    if v < 0:
        raise ValueError("must be zero or a positive integer")
    return v


def _positive_float(v):
    v = float(v)
    if not v > 0:
        raise ValueError("must be a positive number")
    return v


def _bool(v):
    if isinstance(v, bool):
        return v
    s = str(v).strip().lower()
    if s in ("1", "true", "yes", "on"):
        return True
    if s in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _str(v):
    return "" if v is None else str(v)


def _choice(*options):
    def check(v):
        v = str(v).strip().lower()
        if v not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return v
    return check


def _max_balance(v):
    # whole currency units, at most money.MAX_UNITS (1e12, i.e. 1e18 micro-units): a balance plus
    # one amount and a credit line then always stays inside a signed 64-bit integer
    from .money import MAX_UNITS
    v = int(str(v).strip())
    if not 0 < v <= MAX_UNITS:
        raise ValueError(f"must be a whole number of currency units between 1 and {MAX_UNITS}")
    return v


def _non_negative_float(v):
    v = float(v)
    if not v >= 0 or v == float("inf"):
        raise ValueError("must be zero or a positive number")
    return v


def _port(v):
    v = int(v)
    if not 0 <= v <= 65535:
        raise ValueError("must be a TCP port (0-65535)")
    return v


def _hosts(v):
    """Galera / replica nodes to fail over between: "h1:p1,h2:p2" or a YAML list; [] = host/port only."""
    items = v if isinstance(v, (list, tuple)) else str(v or "").split(",")
    hosts = []
    for item in (str(i).strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(f"{item!r} is not host:port")
        hosts.append(f"{host}:{int(port)}")
    return hosts


def _timezone(v):
    """An IANA time zone name (``Asia/Shanghai``); periods and their labels follow it."""
    name = str(v).strip()
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("must be an IANA time zone name such as UTC or Asia/Shanghai") from None
    return name


def _currency(v):
    v = str(v).strip().upper()
    if not (3 <= len(v) <= 8 and v.isalpha()):
        raise ValueError("must be a currency code such as CNY")
    return v


def _time(v):
    try:
        return clock.fmt(clock.parse(str(v), "time"))
    except InvalidParam:
        raise ValueError("must be a UTC date or time such as 2000-01-01") from None


def _size_table(v):
    """``{path: bytes}``: from YAML a mapping, from the environment ``/path=bytes,/other=bytes``."""
    if isinstance(v, str):
        pairs = [item.split("=", 1) for item in v.split(",") if item.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("must be path=bytes pairs separated by commas")
        v = {path.strip(): size for path, size in pairs}
    if not isinstance(v, dict):
        raise ValueError("must map URL paths to byte counts")
    table = {}
    for path, size in v.items():
        if not str(path).startswith("/"):
            raise ValueError(f"path {path!r} must start with /")
        table[str(path)] = _positive_int(size)
    return table


def _role_list(v):
    roles = [r.strip() for r in (v.split(",") if isinstance(v, str) else list(v or [])) if str(r).strip()]
    if not roles:
        raise ValueError("must name at least one role (orgtype.role)")
    return tuple(roles)


def _statement_prefix(v):
    v = str(v).strip()
    if not re.fullmatch(r"[A-Za-z0-9]{1,8}", v):
        raise ValueError("1 to 8 letters or digits")
    return v


def _webhook_url(v):
    """An http(s) URL, or empty (no deployment webhook); the one rule is validation.webhook_url."""
    from .validation import webhook_url
    try:
        return webhook_url(v, "url") or ""
    except InvalidParam as e:
        raise ValueError(e.message) from None


def _amount_text(v):
    """A decimal amount in currency units (``"100"``, ``"12.50"``), or empty (off)."""
    from .money import to_micro
    v = "" if v is None else str(v).strip()
    if v:
        try:
            if to_micro(v, "amount") < 0:
                raise ValueError("must not be negative")
        except InvalidParam as e:
            raise ValueError(e.message) from None
    return v


def _sync_path(v):
    v = str(v).strip()
    if not v.startswith("/") or "{entity}" not in v:
        raise ValueError("must start with / and contain {entity}")
    return v


SCHEMA = {
    "currency": ("CNY", _currency),
    "timezone": ("UTC", _timezone),      # subscription periods start at midnight of this zone
    "database": {
        "driver": ("sqlite", _choice("sqlite", "mysql")),
        "path": ("", _str),              # sqlite file; default <data_dir>/billing.db
        "host": ("127.0.0.1", _str),
        "port": (3306, _port),
        "hosts": ([], _hosts),           # "h1:p1,h2:p2,...": nodes tried in order; host/port when empty
        "user": ("root", _str),
        "password": ("", _str),
        "name": ("billing", _str),
        "pool_size": (10, _positive_int),
        "busy_timeout_ms": (10000, _positive_int),
        # MySQL: a statement or COMMIT the server has not answered in this time fails its node
        # (a stopped or cut-off node never breaks the connection); a lock wait ends before it
        "statement_timeout_seconds": (30.0, _positive_float),
    },
    "server": {
        "host": ("127.0.0.1", _str),
        "port": (9180, _port),
        "data_dir": ("billing-data", _str),
        "log_file": ("billing.log", _str),   # relative to data_dir
        "log_level": ("info", _choice("debug", "info", "warning", "error")),
        "admin_user": ("admin", _str),
        "admin_password": ("", _str),         # empty: generated at first start, stored in data_dir
        # request bodies above this are refused 413 before authentication and before buffering
        "max_body_bytes": (1024 * 1024, _positive_int),
        # per-path exceptions: the batch endpoint (1,000 events of up to ~2 KB each) by default
        "max_body_bytes_by_path": ({"/billing_module/api/accounting_batch.dspy": 4 * 1024 * 1024,
                                    "/billing_module/fast/accounting_batch": 4 * 1024 * 1024}, _size_table),
        # trust X-Forwarded-Host / X-Forwarded-Proto (same-origin checks, Secure cookie) only
        # when a reverse proxy in front of the server sets them
        "behind_proxy": (False, _bool),
        "session_lifetime_seconds": (8 * 3600, _positive_int),   # admin login session
        "login_max_failures": (5, _positive_int),      # per user name and per address, then 429
        "login_window_seconds": (900, _positive_int),  # failures older than this are forgotten
        "login_backoff_seconds": (30, _positive_int),  # first lock; doubles per further failure
        "login_backoff_max_seconds": (3600, _positive_int),
        "retry_after_seconds": (5, _positive_int),     # Retry-After of a 503 database_unavailable
        "bricks_dir": ("", _str),             # bricks build or source folder served at /bricks/
    },
    "auth": {
        "require_api_key": (True, _bool),     # standalone API needs a key; a host may use its own auth
        # a logged-in session is a caller when the host's session secret is not ahserver's default:
        # a platform role (host_admin_roles, shell-style patterns) reaches every customer, a
        # customer role (customer_roles) only the user's organisation (rbac's userorgid)
        "trust_host_session": (True, _bool),
        "host_admin_roles": (("owner.*", "reseller.*", "provider.admin"), _role_list),
        "customer_roles": (("customer.admin", "customer.user"), _role_list),
        "signature_window_seconds": (300, _positive_int),
        "secret_key": ("", _str),             # encrypts signing secrets; empty: generated in data_dir
        "nonce_purge_seconds": (300, _positive_int),   # how often seen nonces older than 2 windows go
    },
    "accounting": {
        "batch_size": (500, _positive_int),
        "batch_max_events": (1000, _positive_int),   # events per accounting_batch request
        "interval_seconds": (1.0, _positive_float),
        "claim_seconds": (60, _positive_int),
        "allow_arrears": (False, _bool),
        "max_retries": (5, _non_negative_int),
        "retry_base_seconds": (30, _positive_int),
        "retry_max_seconds": (3600, _positive_int),
        "background": (True, _bool),
        # the use_time an event may carry: from this UTC time to now + use_time_ahead_seconds
        "use_time_earliest": ("2000-01-01", _time),
        "use_time_ahead_seconds": (86400, _non_negative_int),
        # charge an event some of whose factors have no price (the reply lists them); false: the
        # event is stored as failed unpriced_factor and retried when the price appears
        "allow_partial_pricing": (False, _bool),
    },
    "holds": {
        "default_ttl_seconds": (600, _positive_int),
        "max_ttl_seconds": (86400, _positive_int),
        "sweep_interval_seconds": (30, _positive_float),
        # how far an admin may settle above the held amount, as a ratio of the hold (0.1: up to
        # 110 %); 0: never above the hold. A customer key never settles above the hold.
        "max_settle_over_hold_ratio": (0.0, _non_negative_float),
    },
    "ledger": {
        # the largest balance (and the most negative one), in currency units: a recharge, refund,
        # adjustment or charge whose result would leave it is refused (400 amount_out_of_range)
        "max_balance": (10**12, _max_balance),
    },
    "metrics": {
        # a scraper sending 'Authorization: Bearer <scrape_token>' may read /metrics without an
        # admin key; empty: admin keys only
        "scrape_token": ("", _str),
    },
    "alerts": {
        # signed JSON webhooks (docs/webhooks.md): the deployment's receiver gets every alert,
        # a customer's receiver (alert_webhook_set) that customer's
        "webhook_url": ("", _webhook_url),
        "webhook_secret": ("", _str),
        # low_balance when a balance falls below this (currency units); empty: only customers
        # with their own threshold are watched
        "low_balance_amount": ("", _amount_text),
        "delivery_interval_seconds": (5.0, _positive_float),
        "timeout_seconds": (10.0, _positive_float),
        "max_attempts": (10, _positive_int),            # then the delivery is 'failed' (redeliver by hand)
        "retry_base_seconds": (10, _positive_int),      # doubles per failed attempt
        "retry_max_seconds": (3600, _positive_int),
        "batch_size": (50, _positive_int),              # deliveries claimed per run of the job
    },
    "cache": {
        "size": (10000, _positive_int),
        "ttl_seconds": (300, _positive_float),
    },
    "sync": {
        "central_url": ("", _str),
        "app_key": ("", _str),
        "app_secret": ("", _str),
        "page_size": (500, _positive_int),
        "timeout_seconds": (10.0, _positive_float),
        "retries": (3, _non_negative_int),
        "interval_seconds": (300, _positive_int),
        "enabled": (False, _bool),
        # per-entity periodic interval; 0: interval_seconds
        "users_interval_seconds": (0, _non_negative_int),
        "pricing_interval_seconds": (0, _non_negative_int),
        "llmage_interval_seconds": (0, _non_negative_int),
        "uapi_interval_seconds": (0, _non_negative_int),
        "path": ("/billing_module/sync/{entity}.dspy", _sync_path),   # on central_url
        "retry_base_seconds": (0.5, _positive_float),     # HTTP retries inside one run (tenacity)
        "retry_max_seconds": (10.0, _positive_float),
        "failure_backoff_seconds": (30, _positive_int),   # next run after a failed one: doubles, capped by the interval
        "claim_seconds": (900, _positive_int),            # a 'pending' run older than this is taken over
        "max_page_bytes": (64 * 1024 * 1024, _positive_int),
        "verify_replies": (True, _bool),                  # the centre's replies must carry our signature
        "export_max_limit": (5000, _positive_int),        # largest page the export side serves
    },
    "statements": {
        # months begin at midnight in the deployment's ``timezone`` (statements.py); the number
        # is "<number_prefix>-<year>-<sequence>", unique per deployment and year
        "number_prefix": ("ST", _statement_prefix),
        # a month is closed this long after its end (a transaction that stamped its entry just
        # before the cut-off has committed by then), by a job that looks every interval
        "close_grace_seconds": (300, _non_negative_int),
        "close_interval_seconds": (600, _positive_int),
    },
}


class Config(dict):
    """Nested dict with attribute access: ``cfg.database.driver``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _defaults(schema):
    # a copy of a mutable default: a config changed at run time never changes the next one's
    return Config({k: _defaults(v) if isinstance(v, dict) else copy.copy(v[0]) for k, v in schema.items()})


def _apply(target, schema, values, where):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(values).__name__}")
    for key, value in values.items():
        name = f"{where}.{key}" if where else key
        if key not in schema:
            raise ConfigError(f"unknown config key '{name}'")
        spec = schema[key]
        if isinstance(spec, dict):
            _apply(target[key], spec, value, name)
        else:
            target[key] = _check(name, spec[1], value)


def _check(name, validator, value, source=""):
    try:
        return validator(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config key '{name}'{source} = {value!r}: {e}") from None


def _env_overrides(target, schema, environ, prefix="BILLING", where=""):
    for key, spec in schema.items():
        env_name = f"{prefix}_{key.upper()}"
        name = f"{where}.{key}" if where else key
        if isinstance(spec, dict):
            _env_overrides(target[key], spec, environ, env_name, name)
        elif env_name in environ:
            target[key] = _check(name, spec[1], environ[env_name], f" (from {env_name})")


def load_config(path=None, environ=None, overrides=None):
    """Defaults < YAML file < environment < ``overrides`` (a nested dict, e.g. from CLI flags)."""
    cfg = _defaults(SCHEMA)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                data = yaml.safe_load(f) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        _apply(cfg, SCHEMA, data, "")
    _env_overrides(cfg, SCHEMA, os.environ if environ is None else environ)
    if overrides:
        _apply(cfg, SCHEMA, overrides, "")
    if cfg.holds.default_ttl_seconds > cfg.holds.max_ttl_seconds:
        raise ConfigError("holds.default_ttl_seconds must not exceed holds.max_ttl_seconds")
    if cfg.alerts.webhook_url and len(cfg.alerts.webhook_secret) < 16:
        # receivers verify every alert with it: an empty or guessable secret signs nothing
        raise ConfigError("alerts.webhook_secret (BILLING_ALERTS_WEBHOOK_SECRET): at least 16 characters are "
                          "required with alerts.webhook_url")
    return cfg


def env_names(schema=SCHEMA, prefix="BILLING", where=""):
    """(environment variable, key, default) for every key: the README table is built from this."""
    out = []
    for key, spec in schema.items():
        name = f"{where}.{key}" if where else key
        env_name = f"{prefix}_{key.upper()}"
        if isinstance(spec, dict):
            out += env_names(spec, env_name, name)
        else:
            out.append((env_name, name, spec[0]))
    return out


def copy_config(cfg):
    return copy.deepcopy(cfg)

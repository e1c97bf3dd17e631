"""The one error type the module raises for anything a caller can act on.

Every caller-facing failure carries a stable ``code`` and an HTTP ``status``;
the API layer turns it into ``{"success": false, "code", "message"}``.
"""


class BillingError(Exception):
    status = 400
    code = "invalid_param"

    def __init__(self, message, code=None, status=None, **details):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.details = details

    def to_reply(self):
        reply = {"success": False, "code": self.code, "message": self.message}
        reply.update(self.details)
        return reply


class InvalidParam(BillingError):
    status, code = 400, "invalid_param"


class Unauthorized(BillingError):
    status, code = 401, "unauthorized"


class Forbidden(BillingError):
    status, code = 403, "forbidden"


class InsufficientBalance(BillingError):
    status, code = 402, "insufficient_balance"


class UnknownCustomer(BillingError):
    status, code = 404, "unknown_customer"


class NoPricing(BillingError):
    status, code = 404, "no_pricing"


class NotFound(BillingError):
    status, code = 404, "not_found"


class Conflict(BillingError):
    status, code = 409, "conflict"


class AccountSuspended(BillingError):
    status, code = 403, "account_suspended"


class AmountOutOfRange(BillingError):
    """A balance change whose result would leave the configured maximum or the 64-bit range."""
    status, code = 400, "amount_out_of_range"


class RefundExceedsCharges(BillingError):
    status, code = 400, "refund_exceeds_charges"


class ModelMismatch(BillingError):
    """``llmid`` and ``model_name`` name different models: which one to price is not ours to guess."""
    status, code = 400, "model_mismatch"


class CurrencyMismatch(BillingError):
    """The price list is in another currency than the customer's balance (no conversion)."""
    status, code = 409, "currency_mismatch"


class UnpricedFactor(BillingError):
    """Part of the event (a factor with a quantity) has no price: not charged half."""
    status, code = 404, "unpriced_factor"


class InvalidEvent(BillingError):
    """A stored event that can no longer be rebuilt (a row written around the API, an old format)."""
    status, code = 422, "invalid_event"


class ConfigError(Exception):
    """A wrong configuration value: raised at start, never at request time."""


class TooManyAttempts(BillingError):
    status, code = 429, "too_many_attempts"

    def __init__(self, message, retry_after_seconds):
        super().__init__(message, retry_after_seconds=retry_after_seconds)
        self.headers = {"Retry-After": str(retry_after_seconds)}


class DatabaseUnavailable(BillingError):
    """No database node could do the work now: none answered, the transaction kept colliding, or
    the connection broke during a COMMIT whose outcome is therefore unknown. The request may be
    sent again: the module's writes are idempotent by their request_id."""
    status, code = 503, "database_unavailable"

    def __init__(self, message="the database is not reachable; try again later", retry_after_seconds=5):
        super().__init__(message)
        self.headers = {"Retry-After": str(retry_after_seconds)}

"""billing_module: billing and accounting for ahserver + sqlor platforms."""
from .version import __version__


def load_billing_module(*args, **kwargs):
    from .init import load_billing_module as load
    return load(*args, **kwargs)


__all__ = ["__version__", "load_billing_module"]

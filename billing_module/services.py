"""Wires the services of the core together (one place that knows every service)."""


def build_services(core, db):
    pass


def background_jobs(core):
    return []


def register_functions(core, env):
    """ServerEnv names other modules call in-process (``ServerEnv().billing_*``)."""
    env.billing_health = core.health

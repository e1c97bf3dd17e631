"""What every ``billing-module`` subcommand shares: the ``--config`` / ``--data-dir`` options and
the configuration they select. Its own module so that ``cli`` and the subcommands defined elsewhere
(``sync/cli.py``, the tools) import it without importing each other."""
import argparse
import os

from .config import Config, load_config


def add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (default: $BILLING_CONFIG, else built-in defaults)")
    parser.add_argument("--data-dir", help="directory for the SQLite file, logs and secrets (server.data_dir)")


def load_from_args(args: argparse.Namespace) -> tuple[Config, str]:
    """(config, absolute data dir) for the options a subcommand was given."""
    overrides: dict = {}
    if getattr(args, "data_dir", None):
        overrides.setdefault("server", {})["data_dir"] = args.data_dir
    if getattr(args, "host", None):
        overrides.setdefault("server", {})["host"] = args.host
    if getattr(args, "bricks_dir", None):
        overrides.setdefault("server", {})["bricks_dir"] = os.path.abspath(args.bricks_dir)
    if getattr(args, "port", None) is not None:
        overrides.setdefault("server", {})["port"] = args.port
    cfg = load_config(getattr(args, "config", None) or os.environ.get("BILLING_CONFIG") or None, overrides=overrides)
    return cfg, os.path.abspath(cfg.server.data_dir)

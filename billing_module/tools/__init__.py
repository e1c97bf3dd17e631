"""Operator tools (bench, crash test, proof): reached from the CLI only, never imported by the runtime."""

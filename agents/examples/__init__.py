"""Example agents for the demo: deterministic code, no model calls."""

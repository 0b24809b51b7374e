"""Jepsen-style fault suite: workload, fault injector, client history, checker."""

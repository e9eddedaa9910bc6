"""Deterministic simulation of pyraft clusters: :mod:`.cluster` (the harness) and :mod:`.invariants`."""

"""ledgermesh benchmark harness: ``python -m bench`` from the repository root.

See ``bench/README.md`` for what is measured and ``bench/RESULTS.md`` for figures.
"""

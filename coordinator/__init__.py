"""The coordinator: the only writer of the ledger.

Consumes intake, validates, authorizes, decides, records, and relays.
"""

"""The ledger: an eventsourcing application whose events form per-aggregate hash chains."""

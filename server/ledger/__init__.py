"""The ledger as a durable queue: its entries and audit, consumers, trimming and the relay."""

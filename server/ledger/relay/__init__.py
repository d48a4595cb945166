"""The JetStream relay: every ledger entry published to NATS JetStream once, in order."""

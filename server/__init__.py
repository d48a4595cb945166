"""The giftstream server: wiring, command line and settings; realtime, money and ledger below."""

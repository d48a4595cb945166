"""The load-test harness: simulated viewers and gifters over real sockets, and the checks."""

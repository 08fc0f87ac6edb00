"""Load tests for the bot stack: locust scenarios with SLO verdicts, and `make bench` (wrk)."""

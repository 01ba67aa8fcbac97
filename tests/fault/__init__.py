"""Fault tests: real processes, real Postgres and Redis, and the faults they must survive."""

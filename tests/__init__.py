"""The test suite. Its processes fork servers (Postgres, Redis, the stack) to exec them, some
while gRPC's threads are busy: in the fault tier a Postgres restarted that way died of SIGSEGV
before its exec (CI, 2026-12-07), in gRPC's fork handlers ("Other threads are currently
calling into gRPC, skipping fork() handlers"). Processes that fork only to exec need none of
them: GRPC_ENABLE_FORK_SUPPORT=0 (gRPC's doc/fork_support.md). This package is imported
before any conftest, so before grpc, and the processes the tests start inherit it."""

import os

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

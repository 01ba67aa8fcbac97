"""testing/ports.py: the ports the tests' servers listen on."""

from __future__ import annotations

from testing.ports import _ephemeral_low, free_port_block

GRPC_BLOCK = (0, 1, 10, 11)  # ingest, status and two workers (testing/stack.py)


def test_blocks_handed_out_in_one_process_never_share_a_port() -> None:
    # A stack asks for its gateway port and its gRPC block in two calls, before anything binds
    # either: both free, so only the handing out keeps them apart.
    taken: set[int] = set()
    for _ in range(300):
        for offsets in ((0,), GRPC_BLOCK):
            base = free_port_block(offsets)
            ports = {base + offset for offset in offsets}
            assert not ports & taken, f"handed out twice: {sorted(ports & taken)}"
            taken |= ports


def test_blocks_stay_below_the_ephemeral_range() -> None:
    for _ in range(100):
        base = free_port_block(GRPC_BLOCK)
        assert base >= 10000 and base + max(GRPC_BLOCK) < _ephemeral_low()

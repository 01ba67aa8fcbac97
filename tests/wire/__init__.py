"""Protobuf messages as earlier versions wrote them to Redis, kept as bytes (see
tests/unit/test_proto_contract.py): the current code must read them."""

"""testing/containers.py waits for a container's server by polling with a deadline, and fails
with the container's log when it exits or the deadline passes. A stand-in container object
answers `status` and `logs` (no engine is needed); the server check is a plain callable."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from testing import containers


@dataclass
class Wrapped:
    status: str = "running"
    reloads: int = 0

    def reload(self) -> None:
        self.reloads += 1

    def logs(self) -> bytes:
        return b"FATAL: the server said why"


@dataclass
class Container:
    image: str = "postgres:17"
    wrapped: Wrapped = field(default_factory=Wrapped)

    def get_wrapped_container(self) -> Wrapped:
        return self.wrapped


def test_returns_once_the_server_answers() -> None:
    calls: list[int] = []

    def ready() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionRefusedError("not yet")

    container = Container()
    containers._wait_ready(container, ready)
    assert len(calls) == 3
    assert container.wrapped.reloads == 2  # the status is looked at after each refusal


def test_an_exited_container_fails_at_once_with_its_log() -> None:
    container = Container(wrapped=Wrapped(status="exited"))

    def ready() -> None:
        raise ConnectionRefusedError("refused")

    with pytest.raises(AssertionError, match="FATAL: the server said why"):
        containers._wait_ready(container, ready)
    assert container.wrapped.reloads == 1


def test_the_deadline_fails_with_the_log(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(containers, "START_TIMEOUT", 0.3)

    def ready() -> None:
        raise ConnectionRefusedError("refused")

    with pytest.raises(AssertionError, match=r"timed out .*(?s:.*)FATAL: the server said why"):
        containers._wait_ready(Container(), ready)

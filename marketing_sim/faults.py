"""Fault injection settings of the simulator (no I/O)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

MAX_LATENCY_MS: Final = 600_000
MAX_DOWN_S: Final = 86_400.0
#: How long a request hit by ``timeout_after_commit_rate`` is held open at most.
DEFAULT_HOLD_MS: Final = 30_000


class FaultError(ValueError):
    """A fault setting is malformed."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FaultError(f"{name} must be a number")
    return float(value)


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """The faults in force.

    ``down`` is ``None`` (up), ``0`` (down until cleared) or a number of seconds after which the
    simulator listens again.
    """

    latency_ms: int = 0
    error_rate: float = 0.0
    timeout_after_commit_rate: float = 0.0
    hold_ms: int = DEFAULT_HOLD_MS
    down: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.latency_ms <= MAX_LATENCY_MS:
            raise FaultError(f"latency_ms must be between 0 and {MAX_LATENCY_MS}")
        if not 0 < self.hold_ms <= MAX_LATENCY_MS:
            raise FaultError(f"hold_ms must be between 1 and {MAX_LATENCY_MS}")
        for name in ("error_rate", "timeout_after_commit_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise FaultError(f"{name} must be between 0 and 1")
        if self.down is not None and not 0 <= self.down <= MAX_DOWN_S:
            raise FaultError(f"down must be true, false or 0 to {MAX_DOWN_S} seconds")

    def updated(self, changes: Mapping[str, object]) -> Faults:
        """These faults with ``changes`` (decoded JSON) applied; unknown keys are refused."""
        values: dict[str, object] = {}
        for name, value in changes.items():
            if name in ("latency_ms", "hold_ms"):
                number = _number(name, value)
                if number != int(number):
                    raise FaultError(f"{name} must be an integer")
                values[name] = int(number)
            elif name in ("error_rate", "timeout_after_commit_rate"):
                values[name] = _number(name, value)
            elif name == "down":
                if value is True:
                    values[name] = 0.0
                elif value is False or value is None:
                    values[name] = None
                else:
                    seconds = _number(name, value)
                    if seconds <= 0:
                        raise FaultError("down must be true, false or a positive number of seconds")
                    values[name] = seconds
            else:
                raise FaultError(f"unknown fault {name!r}")
        return dataclasses.replace(self, **values)  # type: ignore[arg-type]

    def to_json(self) -> dict[str, object]:
        return {
            "latency_ms": self.latency_ms,
            "error_rate": self.error_rate,
            "timeout_after_commit_rate": self.timeout_after_commit_rate,
            "hold_ms": self.hold_ms,
            "down": self.down is not None,
            "down_for_s": self.down or None,
        }


NO_FAULTS: Final = Faults()

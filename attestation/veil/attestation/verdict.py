"""Verdicts: the outcome of verifying evidence, one named check at a time.

Every verifier (SNP, Azure, TDX, NVIDIA GPU, simulated) reports through a
:class:`Verdict`: an ordered list of :class:`Check` s, each pass, fail or skip
with a detail saying why. A verdict is good only when no check failed and at
least one passed; a skip never makes a bad verdict good.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "CheckStatus", "Verdict", "VerdictBuilder"]


class CheckStatus(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"


@dataclass(frozen=True, slots=True)
class Check:
    """One named check: e.g. ``snp.signature``, ``policy.debug``, ``binding.report_data``."""

    name: str
    status: CheckStatus
    detail: str = ""

    def to_json(self) -> dict[str, str]:
        return {"name": self.name, "status": self.status.value, "detail": self.detail}


@dataclass(frozen=True, slots=True)
class Verdict:
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        statuses = [c.status for c in self.checks]
        return CheckStatus.FAIL not in statuses and CheckStatus.PASS in statuses

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if c.status is CheckStatus.FAIL)

    def get(self, name: str) -> Check | None:
        """The check called ``name``, or None."""
        return next((c for c in self.checks if c.name == name), None)

    def __add__(self, other: Verdict) -> Verdict:
        return Verdict(self.checks + other.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": [c.to_json() for c in self.checks]}

    def table(self) -> str:
        """A fixed-width text table, one check a line."""
        width = max((len(c.name) for c in self.checks), default=5)
        lines = [f"{'check'.ljust(width)}  status  detail"]
        lines += [f"{c.name.ljust(width)}  {c.status.value.ljust(6)}  {c.detail}" for c in self.checks]
        lines.append(f"verdict: {'GOOD' if self.ok else 'BAD'}")
        return "\n".join(lines)


@dataclass(slots=True)
class VerdictBuilder:
    """Collects checks in order; ``build()`` freezes them into a :class:`Verdict`."""

    checks: list[Check] = field(default_factory=list)

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(name, CheckStatus.PASS if ok else CheckStatus.FAIL, detail))
        return ok

    def passed(self, name: str, detail: str = "") -> None:
        self.checks.append(Check(name, CheckStatus.PASS, detail))

    def fail(self, name: str, detail: str) -> None:
        self.checks.append(Check(name, CheckStatus.FAIL, detail))

    def skip(self, name: str, reason: str) -> None:
        self.checks.append(Check(name, CheckStatus.SKIP, reason))

    def extend(self, checks: Iterable[Check]) -> None:
        self.checks.extend(checks)

    def build(self) -> Verdict:
        return Verdict(tuple(self.checks))

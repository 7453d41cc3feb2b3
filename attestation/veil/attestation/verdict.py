"""Verdicts: the outcome of verifying evidence, one named check at a time.

Every verifier (SNP, Azure, TDX, NVIDIA GPU, simulated) reports through a
:class:`Verdict`: an ordered list of :class:`Check` s, each pass, fail or skip
with a detail saying why. A verdict is good only when no check failed and at
least one passed; a skip never makes a bad verdict good.

A check whose input another check failed to authenticate (TCB status of a quote
whose signature failed, a certificate's extensions when its chain failed) is
``skip`` with ``not checked: <prerequisite> failed`` (:meth:`VerdictBuilder.blocked`),
never ``pass``: the verdict is already bad, and the table names the one cause.
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

    def blocked(self, name: str, *prerequisites: str) -> bool:
        """Skip ``name`` when one of ``prerequisites`` failed; True when it did (then do not judge it).

        The skip reads ``not checked: <prerequisite> failed`` (the first failed one, in the order given).
        """
        failed = {c.name for c in self.checks if c.status is CheckStatus.FAIL}
        cause = next((p for p in prerequisites if p in failed), None)
        if cause is None:
            return False
        self.skip(name, f"not checked: {cause} failed")
        return True

    def build(self) -> Verdict:
        return Verdict(tuple(self.checks))

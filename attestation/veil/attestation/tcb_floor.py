"""The dated TCB floor shipped with the package (``data/tcb_floor.toml``).

A default :class:`~veil.attestation.policy.Policy` requires, per SEV-SNP product, at
least the TCB the file names, and for TDX one of its allowed TCB statuses. The file says
why each value was chosen and on which day (``set``); :func:`shipped_tcb_floor` reads it
once. A release manifest's own floor, or a policy's ``min_tcb``, replaces it.
"""

from __future__ import annotations

import datetime as dt
import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from veil.attestation.errors import PolicyError
from veil.attestation.snp.report import Product, TcbVersion

__all__ = ["SNP_TCB_COMPONENTS", "TcbFloor", "parse_snp_floor", "shipped_tcb_floor", "snp_floor_version"]

SNP_TCB_COMPONENTS = ("bootloader", "tee", "snp", "microcode", "fmc")


@dataclass(frozen=True, slots=True)
class TcbFloor:
    """A dated floor: SEV-SNP component levels per product name, TDX statuses allowed."""

    set_on: dt.date
    snp: Mapping[str, Mapping[str, int]]
    tdx_statuses: frozenset[str]


def parse_snp_floor(doc: Any, what: str = "tcb_floor") -> dict[str, dict[str, int]]:
    """``{"Milan": {"bootloader": 4, ...}, ...}`` checked: known products and components, 0..255."""
    if not isinstance(doc, Mapping):
        raise PolicyError(f"{what} must be a table of products")
    out: dict[str, dict[str, int]] = {}
    for name, levels in doc.items():
        try:
            product = Product.from_name(str(name))
        except Exception:
            raise PolicyError(f"{what}: unknown SEV-SNP product {name!r}") from None
        if not isinstance(levels, Mapping):
            raise PolicyError(f"{what}.{name} must be a table of component levels")
        parts: dict[str, int] = {}
        for component, level in levels.items():
            if component not in SNP_TCB_COMPONENTS:
                raise PolicyError(f"{what}.{name}: unknown component {component!r}")
            if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 255:
                raise PolicyError(f"{what}.{name}.{component} must be an integer in 0..255")
            parts[component] = level
        out[product.value] = parts
    return out


def snp_floor_version(product: Product, levels: Mapping[str, int]) -> TcbVersion:
    """The floor as a TCB_VERSION in ``product``'s layout (Turin's has ``fmc``)."""
    parts = {k: levels.get(k, 0) for k in ("bootloader", "tee", "snp", "microcode")}
    fmc = levels.get("fmc", 0) if product is Product.TURIN else None
    return TcbVersion.from_parts(**parts, fmc=fmc)


@functools.cache
def shipped_tcb_floor() -> TcbFloor:
    """The floor in ``veil/attestation/data/tcb_floor.toml`` (read once)."""
    try:
        text = resources.files("veil.attestation").joinpath("data/tcb_floor.toml").read_text("utf-8")
        doc = tomllib.loads(text)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PolicyError(f"shipped TCB floor unusable: {exc}") from None
    set_on = doc.get("set")
    statuses = doc.get("tdx", {}).get("allowed_tcb_statuses")
    if not isinstance(set_on, dt.date) or not isinstance(statuses, list) or not statuses:
        raise PolicyError("shipped TCB floor lacks its date or TDX statuses")
    return TcbFloor(set_on, parse_snp_floor(doc.get("snp", {}), "shipped tcb_floor"), frozenset(statuses))

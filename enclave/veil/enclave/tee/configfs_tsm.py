"""SEV-SNP and TDX reports through Linux's configfs-tsm (``/sys/kernel/config/tsm/report``, Linux ≥ 6.7).

One report per entry, as the kernel ABI (Documentation/ABI/testing/configfs-tsm) and
go-tdx-guest / go-sev-guest use it: ``mkdir`` an entry, write ``privlevel`` (SNP VMPL, when the
attribute exists), read ``generation``, write the 64 bytes to ``inblob``, read ``outblob`` (the SNP
``ATTESTATION_REPORT`` or the TDX quote), ``auxblob`` (SNP: the GUID certificate table),
``provider`` (``sev_guest`` / ``tdx_guest``) and ``generation`` again, ``rmdir``. Each write bumps
``generation``; if it moved by more than our one write, another process wrote the entry between
our write and read (a race), and the report may be for its inblob: we retry with a new entry.

The seams are the root directory and :class:`ConfigfsFiles` (the file operations): tests pass a
fake kernel whose ``outblob`` is signed over the ``inblob`` written (``tests/enclave/tee_fakes.py``).
The report is checked before use: it must parse, and its
REPORT_DATA must be the bytes written (a truncated or foreign blob is an error, never served).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from veil.attestation.errors import VeilAttestationError
from veil.attestation.snp.report import parse_snp_report
from veil.attestation.tdx.quote import parse_tdx_quote
from veil.enclave.errors import AttestationProviderError, TeeUnavailableError
from veil.enclave.tee.cert_table import cert_table_to_pem
from veil.enclave.tee.provider import CpuEvidencePart
from veil.proto.v1 import evidence_pb2

__all__ = ["TSM_REPORT_ROOT", "ConfigfsFiles", "ConfigfsTsm", "ConfigfsTsmSource", "TsmReport"]

log = logging.getLogger("veil.enclave.tee")
TSM_REPORT_ROOT = Path("/sys/kernel/config/tsm/report")
PROVIDERS = {"sev_guest": evidence_pb2.PLATFORM_SEV_SNP, "tdx_guest": evidence_pb2.PLATFORM_TDX}
_MAX_BLOB = 64 * 1024


@dataclass(frozen=True, slots=True)
class TsmReport:
    provider: str
    outblob: bytes
    auxblob: bytes
    generation: int


class ConfigfsFiles:
    """The file operations configfs-tsm needs (the real file system; tests pass a fake kernel)."""

    def mkdir(self, path: Path) -> None:
        path.mkdir()

    def rmdir(self, path: Path) -> None:
        path.rmdir()

    def exists(self, path: Path) -> bool:
        return path.exists()

    def write(self, path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.write(fd, data) != len(data):
                raise AttestationProviderError(f"configfs-tsm: short write to {path.name}")
        finally:
            os.close(fd)

    def read(self, path: Path) -> bytes:
        with path.open("rb") as f:
            return f.read(_MAX_BLOB + 1)


def _entry_name() -> str:
    return f"veil-{os.getpid()}-{secrets.token_hex(6)}"


class ConfigfsTsm:
    """The configfs-tsm report interface under ``root`` (see the module docstring)."""

    def __init__(
        self,
        root: Path = TSM_REPORT_ROOT,
        *,
        privlevel: int | None = 0,
        attempts: int = 3,
        entry_name: Callable[[], str] = _entry_name,
        files: ConfigfsFiles | None = None,
    ) -> None:
        self.root = Path(root)
        self.files = files or ConfigfsFiles()
        self.privlevel = privlevel
        self.attempts = attempts
        self._entry_name = entry_name

    def report(self, inblob: bytes) -> TsmReport:
        """A fresh report over ``inblob`` (64 bytes); retries when another writer raced us."""
        if len(inblob) != 64:
            raise AttestationProviderError(f"configfs-tsm inblob must be 64 bytes, got {len(inblob)}")
        for attempt in range(1, self.attempts + 1):
            entry = self.root / self._entry_name()
            try:
                self.files.mkdir(entry)
            except FileNotFoundError:
                raise TeeUnavailableError(
                    f"configfs-tsm: {self.root} does not exist (needs Linux >= 6.7 with CONFIG_TSM_REPORTS "
                    "and configfs mounted on /sys/kernel/config)"
                ) from None
            except PermissionError:
                raise TeeUnavailableError(
                    f"configfs-tsm: permission denied creating an entry in {self.root} (run as root or "
                    "give the service user write access to it)"
                ) from None
            try:
                report = self._one(entry, inblob)
            finally:
                try:
                    self.files.rmdir(entry)
                except OSError as exc:
                    log.warning("configfs-tsm: could not remove %s (%s)", entry.name, exc.strerror)
            if report is not None:
                return report
            log.warning("configfs-tsm: generation moved during attempt %d: another writer raced us", attempt)
        raise AttestationProviderError(
            f"configfs-tsm: another writer changed the report entry in each of {self.attempts} attempts"
        )

    def _one(self, entry: Path, inblob: bytes) -> TsmReport | None:
        try:
            f = self.files
            if self.privlevel is not None and f.exists(entry / "privlevel"):
                f.write(entry / "privlevel", str(self.privlevel).encode())
            start = self._generation(entry)
            f.write(entry / "inblob", inblob)
            outblob = self._read(entry / "outblob")
            auxblob = self._read(entry / "auxblob") if f.exists(entry / "auxblob") else b""
            provider = self._read(entry / "provider").decode("ascii", "replace").strip()
            end = self._generation(entry)
        except PermissionError:
            raise TeeUnavailableError(f"configfs-tsm: permission denied on {entry}") from None
        except OSError as exc:
            code = errno.errorcode.get(exc.errno or 0, "?")
            raise AttestationProviderError(
                f"configfs-tsm: {exc.strerror or code} ({code}) on {entry}"
            ) from None
        if end != start + 1:
            return None
        return TsmReport(provider, outblob, auxblob, end)

    def _read(self, path: Path) -> bytes:
        data = self.files.read(path)
        if len(data) > _MAX_BLOB:
            raise AttestationProviderError(f"configfs-tsm: {path.name} is implausibly large")
        return data

    def _generation(self, entry: Path) -> int:
        text = self._read(entry / "generation").strip()
        if not text.isdigit():
            raise AttestationProviderError("configfs-tsm: generation is not a number")
        return int(text)


class ConfigfsTsmSource:
    """A :class:`~veil.enclave.tee.hardware.CpuSource` over configfs-tsm: SEV-SNP or TDX, as the
    kernel's ``provider`` says. SNP certificates come from ``auxblob`` or, when the host supplied
    none, from ``fetch_chain(report)`` (AMD KDS, cached); TDX quotes carry their PCK chain."""

    def __init__(
        self,
        tsm: ConfigfsTsm,
        provider: str,
        *,
        fetch_chain: Callable[[bytes], bytes] | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise TeeUnavailableError(f"configfs-tsm provider {provider!r} is not sev_guest or tdx_guest")
        self.tsm = tsm
        self.provider = provider
        self.platform = PROVIDERS[provider]
        self.name = f"{'SEV-SNP' if provider == 'sev_guest' else 'TDX'} (configfs-tsm {tsm.root})"
        self._fetch_chain = fetch_chain

    def cpu_evidence(self, report_data: bytes) -> CpuEvidencePart:
        report = self.tsm.report(report_data)
        if report.provider != self.provider:
            raise AttestationProviderError(
                f"configfs-tsm provider changed from {self.provider} to {report.provider!r}"
            )
        try:
            if self.provider == "sev_guest":
                signed = parse_snp_report(report.outblob).report_data
            else:
                signed = parse_tdx_quote(report.outblob).td_report.report_data
        except VeilAttestationError as exc:
            raise AttestationProviderError(f"configfs-tsm outblob is not a usable report: {exc}") from None
        if signed != report_data:
            raise AttestationProviderError("configfs-tsm outblob was made for another inblob")
        chain = b""
        if self.provider == "sev_guest":
            if report.auxblob:
                chain = cert_table_to_pem(report.auxblob)
            elif self._fetch_chain is not None:
                chain = self._fetch_chain(report.outblob)
        return CpuEvidencePart(report.outblob, chain)

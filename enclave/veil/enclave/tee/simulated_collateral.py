"""The simulated TEE's collateral source: what a vendor would sign, issued by the fake authorities.

The same path as on hardware (:class:`veil.enclave.collateral.CollateralCache` staples it, the
client verifies it offline against the roots it trusts), with the simulation's roots:

* a CRL from the simulated ARK (``thisUpdate`` an hour ago, ``nextUpdate`` in ``crl_lifetime``),
  listing nothing;
* the driver RIM (golden indices ``driver_indices``) and the VBIOS RIM (the others) of the
  simulated GPU, XMLDSig-signed by the simulated RIM signing certificate;
* OCSP responses, signed by each issuer, ``good`` for ``ocsp_lifetime``: the GPU device chain
  below its root (the ICA; the leaf is never asked about) and the RIM signing certificate.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from veil.attestation.testing.ocsp import amd_crl, ocsp_responses
from veil.enclave.tee.simulated import SimulationAuthority
from veil.proto.v1 import evidence_pb2

__all__ = ["SimulatedCollateralSource"]


@dataclass
class SimulatedCollateralSource:
    """Issues a fresh set of simulated collateral at ``clock()`` on every :meth:`fetch`."""

    authority: SimulationAuthority
    golden: Mapping[int, bytes]  # 0-based golden index → the simulated GPU's measurement
    driver_version: str
    vbios_version: str
    clock: Callable[[], dt.datetime]
    driver_indices: frozenset[int] = frozenset({4, 5, 6, 7})
    crl_lifetime: dt.timedelta = dt.timedelta(days=7)
    ocsp_lifetime: dt.timedelta = dt.timedelta(days=1)

    def fetch(self) -> evidence_pb2.Collateral:
        auth, now = self.authority, self.clock()
        start = now - dt.timedelta(hours=1)
        out = evidence_pb2.Collateral()
        out.amd.crl = amd_crl(
            auth.amd.ark, auth.amd.ark_key, last_update=start, next_update=now + self.crl_lifetime
        )
        driver = {i: v for i, v in self.golden.items() if i in self.driver_indices}
        vbios = {i: v for i, v in self.golden.items() if i not in self.driver_indices}
        out.nvidia.rims.append(auth.rim.sign_rim(kind="driver", version=self.driver_version, golden=driver))
        out.nvidia.rims.append(auth.rim.sign_rim(kind="vbios", version=self.vbios_version, golden=vbios))
        gpu, rim = auth.gpu, auth.rim
        keys = {gpu.root: gpu.root_key, gpu.ica: gpu.ica_key, rim.root: rim.root_key}
        until = now + self.ocsp_lifetime
        out.nvidia.ocsp_responses.extend(
            ocsp_responses(gpu.chain, keys, this_update=start, next_update=until, skip_leaf=True)
            + ocsp_responses(rim.chain, keys, this_update=start, next_update=until, skip_leaf=False)
        )
        return out

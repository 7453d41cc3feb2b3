"""The simulated enclave's own signed release manifest, beside its simulation root.

``veil serve --tee simulated`` calls :func:`write_simulation_release` at every start (the
model or build may have changed). It writes ``STATE_DIR/simulation-release.json``: a
release manifest (:mod:`veil.attestation.release`) naming platform ``SIMULATED_SEV_SNP``
with what this simulated enclave reports: its launch measurement (the server build digest
‖ 0¹⁶), ``host_data``, the model, data-policy and build digests, the GPU count and the
simulator's GPU firmware versions, and its TCB as the floor. It is signed by a simulation
publisher key kept in ``STATE_DIR/simulation/publisher.key.pem`` (0600, made on first use);
the public key is ``STATE_DIR/simulation-publisher.pub``. ``Policy.simulated(root)`` reads
both from the root's folder, so development and CI go through the same fail-closed pinning
as hardware. Like the simulation root, the key proves nothing about hardware: it is trusted
only by someone who points a client at this state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from veil.attestation.nvidia.report import format_vbios_version
from veil.attestation.policy import SIMULATION_PUBLISHER_FILE, SIMULATION_RELEASE_FILE, PlatformName
from veil.attestation.release import PlatformRelease, Release, load_signing_key, public_key_pem, sign_release
from veil.attestation.snp.report import TcbVersion
from veil.enclave.keys import measurement_from_build_digest
from veil.enclave.tee.simulated import GPU_DRIVER_VERSION, GPU_VBIOS_VERSION, PRODUCT

__all__ = ["PUBLISHER_KEY_FILE", "simulation_release", "write_simulation_release"]

PUBLISHER_KEY_FILE = "simulation/publisher.key.pem"
SIMULATED_HOST_DATA = bytes(32)  # the simulator launches without HOST_DATA


def simulation_release(
    *,
    build_digest: bytes,
    model_digest: bytes,
    data_policy_digest: bytes,
    gpu_count: int,
    tcb: TcbVersion,
) -> Release:
    """What a simulated enclave with these digests reports, as a release (unsigned)."""
    pins = PlatformRelease(
        measurements=frozenset({measurement_from_build_digest(build_digest)}),
        host_data=SIMULATED_HOST_DATA,
        model_digests=frozenset({model_digest}),
        data_policy_digest=data_policy_digest,
        gpu_count=gpu_count,
        gpu_driver_versions=frozenset({GPU_DRIVER_VERSION}) if gpu_count else frozenset(),
        gpu_vbios_versions=frozenset({format_vbios_version(GPU_VBIOS_VERSION)}) if gpu_count else frozenset(),
        snp_tcb_floor={PRODUCT: tcb.components()},
    )
    return Release(
        f"simulated-{build_digest.hex()[:12]}", build_digest, {PlatformName.SIMULATED_SEV_SNP: pins}
    )


def write_simulation_release(
    state_dir: Path,
    *,
    build_digest: bytes,
    model_digest: bytes,
    data_policy_digest: bytes,
    gpu_count: int,
    tcb: TcbVersion,
) -> Path:
    """Sign :func:`simulation_release` with the state dir's publisher key; returns the manifest's path."""
    state = Path(state_dir)
    (state / "simulation").mkdir(mode=0o700, parents=True, exist_ok=True)
    release = simulation_release(
        build_digest=build_digest,
        model_digest=model_digest,
        data_policy_digest=data_policy_digest,
        gpu_count=gpu_count,
        tcb=tcb,
    )
    with _locked(state):
        key = _publisher_key(state)
        _write(state / SIMULATION_PUBLISHER_FILE, public_key_pem(key.public_key()), 0o644)
        path = state / SIMULATION_RELEASE_FILE
        _write(path, sign_release(release, key), 0o644)
    return path


def _publisher_key(state: Path) -> Ed25519PrivateKey:
    path = state / PUBLISHER_KEY_FILE
    if path.exists():
        return load_signing_key(path.read_bytes())
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write(path, pem, 0o600)
    return key


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    fd = os.open(state / "simulation" / ".release.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

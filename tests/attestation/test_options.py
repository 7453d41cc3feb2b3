"""VerifyOptions: the clock is checked once, roots are a tuple, the anchor is chosen by the chain."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from veil.attestation.bundle import verify_evidence
from veil.attestation.errors import MalformedInputError
from veil.attestation.nvidia.certs import nvidia_device_root
from veil.attestation.nvidia.ocsp import check_ocsp
from veil.attestation.options import VerifyOptions
from veil.attestation.policy import Policy
from veil.attestation.testing.nvidia import make_fake_ca

NOW = datetime(2025, 6, 1, tzinfo=UTC)


def test_now_must_be_timezone_aware() -> None:
    with pytest.raises(MalformedInputError, match="timezone-aware"):
        VerifyOptions(now=datetime(2025, 6, 1))
    with pytest.raises(MalformedInputError):
        VerifyOptions(now="2025-06-01")  # type: ignore[arg-type]
    assert VerifyOptions(now=datetime(2025, 6, 1, tzinfo=timezone(timedelta(hours=2)))).now.utcoffset()


def test_roots_become_a_tuple_of_certificates() -> None:
    ca = make_fake_ca()
    opts = VerifyOptions(now=NOW, trusted_roots=[ca.root])  # type: ignore[arg-type]
    assert opts.trusted_roots == (ca.root,)
    assert VerifyOptions(now=NOW).trusted_roots == ()
    with pytest.raises(MalformedInputError):
        VerifyOptions(now=NOW, trusted_roots=ca.root)  # type: ignore[arg-type]
    with pytest.raises(MalformedInputError):
        VerifyOptions(now=NOW, trusted_roots=(b"not a certificate",))  # type: ignore[arg-type]
    with pytest.raises(MalformedInputError):
        VerifyOptions(now=NOW, ocsp_post=b"not callable")  # type: ignore[arg-type]


def test_anchor_for_defaults_then_matches_the_chain() -> None:
    one, two = make_fake_ca(), make_fake_ca()
    assert VerifyOptions(now=NOW).anchor_for(one.chain, nvidia_device_root) == nvidia_device_root()
    both = VerifyOptions(now=NOW, trusted_roots=(one.root, two.root))
    assert both.anchor_for(two.chain, nvidia_device_root) == two.root  # the chain ends at it
    only_two = VerifyOptions(now=NOW, trusted_roots=(two.root,))
    assert only_two.anchor_for(two.chain[:-1], nvidia_device_root) == two.root  # it issued the top
    assert both.anchor_for((), nvidia_device_root) == one.root  # nothing matches: the first


def test_ocsp_check_needs_a_poster() -> None:
    ca = make_fake_ca()
    with pytest.raises(MalformedInputError, match="ocsp_post"):
        check_ocsp(ca.chain, VerifyOptions(now=NOW))


def test_verify_evidence_takes_roots_from_the_policy_only() -> None:
    ca = make_fake_ca()
    with pytest.raises(MalformedInputError, match="policy"):
        verify_evidence(b"", VerifyOptions(now=NOW, trusted_roots=(ca.root,)), policy=Policy(), nonce=None)

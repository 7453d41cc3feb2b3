"""Attestation evidence, its verification, and the channel bound to it.

Modules:

* :mod:`veil.attestation.binding` — claims, ``report_data``, ``gpu_nonce``, ``key_id``.
* :mod:`veil.attestation.channel` — HPKE sealing of requests to the enclave key.
* :mod:`veil.attestation.stream` — the secretstream-encrypted response.
* :mod:`veil.attestation.padding` — size buckets for channel plaintexts.
* :mod:`veil.attestation.errors` — the exception tree.

Nothing here imports torch or ``veil.enclave``.
"""

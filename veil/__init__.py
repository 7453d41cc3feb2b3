"""Veil: confidential LLM inference.

The distribution installs one namespace with these sub-packages:

* ``veil.client`` — the SDK (needs no torch),
* ``veil.attestation`` — evidence formats, verification, the channel crypto,
* ``veil.enclave`` — everything that runs inside the TEE, the engine included,
* ``veil.kernels`` — compute kernels,
* ``veil.proto`` — the wire protocol.
"""

__version__ = "0.1.0"

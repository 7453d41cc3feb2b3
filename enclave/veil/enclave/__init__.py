"""Everything that runs inside the TEE: the server, its keys and evidence, and the inference engine.

Sub-packages:

* :mod:`~veil.enclave.tee` — where evidence comes from: the provider protocol, the simulated TEE
  and the hardware providers.
* :mod:`~veil.enclave.engine` — the inference engine: the pure scheduler, block manager and
  sequences, sampling and detokenizing, the synchronous ``LLMEngine`` and the asyncio ``AsyncEngine``.
* :mod:`~veil.enclave.model` — the model: configuration, weights, the GGUF and safetensors loaders,
  the Llama forward pass.
* :mod:`~veil.enclave.runner` — the one owner of device state: the ``Runner`` protocol the engines
  use, and its CPU and CUDA implementations.

Top-level modules:

* :mod:`~veil.enclave.server` — the gRPC server (``veil serve``); :mod:`~veil.enclave.servicers`
  translates wire messages to engine requests and back.
* :mod:`~veil.enclave.keys` — the enclave's HPKE key pair and the claims it attests.
* :mod:`~veil.enclave.data_policy` — the data-handling policy and the metadata-only logging it allows.
* :mod:`~veil.enclave.local_server` — ``veil serve`` in a subprocess on loopback (demo, tests, benchmarks).
* :mod:`~veil.enclave.cli` — the ``veil serve`` flags and entry point.
* :mod:`~veil.enclave.errors` — every exception the package raises, drawn as a tree.
"""

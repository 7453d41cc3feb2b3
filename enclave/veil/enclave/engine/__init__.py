"""The inference engine: pure scheduling around one model runner.

Pure (no torch, no I/O): :mod:`~veil.enclave.engine.sequence`, :mod:`~veil.enclave.engine.block_manager`,
:mod:`~veil.enclave.engine.scheduler`, :mod:`~veil.enclave.engine.sampling` (``SamplingParams``).
With tensors: :mod:`~veil.enclave.engine.sampler` (per-request seeded sampling),
:mod:`~veil.enclave.engine.detokenizer` (incremental text).
The engines: :mod:`~veil.enclave.engine.sync_engine` (``LLMEngine``: one step at a time, the caller's
thread) and :mod:`~veil.enclave.engine.async_engine` (``AsyncEngine``: asyncio front end for the server).

Nothing is re-exported here, so importing the pure modules never imports torch.
"""

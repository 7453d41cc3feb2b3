"""The inference engine: pure scheduling around one model runner.

Pure (no torch, no I/O): :mod:`~veil.enclave.engine.sequence`, :mod:`~veil.enclave.engine.block_manager`
(and ``blocks_for_budget``, the KV-cache size for a byte budget), :mod:`~veil.enclave.engine.scheduler`,
:mod:`~veil.enclave.engine.sampling` (``SamplingParams``), :mod:`~veil.enclave.engine.detokenizer`
(incremental text, stop rules and the finish reasons; it calls the tokenizer it is given).
With tensors: :mod:`~veil.enclave.engine.sampler` (per-request seeded sampling).
The engines: :mod:`~veil.enclave.engine.sync_engine` (``LLMEngine``: one step at a time, the caller's
thread) and :mod:`~veil.enclave.engine.async_engine` (``AsyncEngine``: asyncio front end for the server,
each step on the runner's device thread). Both speak to the model through
:class:`veil.enclave.runner.protocol.Runner`.

Nothing is re-exported here, so importing the pure modules never imports torch.
"""

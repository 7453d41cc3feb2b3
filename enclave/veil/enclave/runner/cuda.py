"""The GPU model runner: the Llama forward pass on Triton kernels, decode steps replayed from CUDA graphs.

:class:`CudaRunner` implements :class:`~veil.enclave.runner.protocol.Runner`, like the CPU runner
(:class:`veil.enclave.runner.cpu.CpuRunner`): ``execute(steps)`` runs one scheduled batch of
:class:`SeqStep` and samples the next token of every step that asks for one, on the device
(:class:`~veil.enclave.engine.sampler.Sampler`): only token ids come back to the host, a few bytes per
sequence instead of a vocabulary of fp32 logits. ``submit`` queues an engine step on the runner's one
device thread. Only this object holds device tensors.

Device selection: ``device="cuda"`` (default) runs on a GPU in bf16; ``device="cpu"`` runs the very
same code on CPU tensors with the Triton kernels in Triton's interpreter (``TRITON_INTERPRET=1`` set
before the kernel modules are imported; fp32, since the interpreter has no bf16; no CUDA graphs, but
the same padded static-buffer decode path the graphs replay). That is how CI proves the GPU path end
to end without a GPU; it is far too slow to serve.

Hot loop, per layer: fused RMSNorm + residual → QKV (w4a16 / int8 Triton matmul, Q/K/V fused) →
fused RoPE + paged-KV write → paged attention → O → fused RMSNorm + residual → gate/up (fused) →
SiLU·mul → down. Weights are repacked once from the loader's unpacked specs (``LoadedModel.specs()``)
by :mod:`veil.enclave.runner.gpu_weights`.

KV cache: ``[n_layers, n_kv_heads, num_blocks, block_size, head_dim]``, the one layout of both runners
(:mod:`veil.enclave.runner.protocol`). The kernels take strides and index ``[block, row, kv_head,
dim]``, so each layer's cache is handed to them as the view ``cache[layer].permute(1, 2, 0, 3)``.

Decode steps (every step one token) run from **CUDA graphs** captured at start-up for a ladder of
batch sizes; a batch is padded to the next size on the ladder. Padding rows are inert: slot ``-1``
(nothing written to the cache) and context length 0 (attention returns zeros). Every per-step input
lives in a static device buffer that the graphs read; the attention split is sized from the model's
maximum context, never from this step's lengths, so one graph serves every length. Prefill and mixed
steps run eagerly (their shapes vary too much to capture).

Host↔device copies use **pageable** memory on purpose. On a confidential-computing GPU (H100/H200 in
CC mode) ``cudaHostRegister`` and pinned host allocations are not usable for DMA from private
memory: all transfers go through the driver's encrypted bounce buffers. So nothing here pins memory
(no ``pin_memory()``, no ``non_blocking=True`` staging): step inputs are built in ordinary host
tensors and copied in; only the sampled token ids are copied out.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from veil.enclave.engine.sampler import Sampler
from veil.enclave.errors import DeviceUnavailableError, InvalidRequestError
from veil.enclave.model.config import ModelConfig
from veil.enclave.model.llama import rope_tables
from veil.enclave.model.loader import LoadedModel
from veil.enclave.model.weights import LlamaSpecs
from veil.enclave.runner.gpu_weights import build_gpu_weights
from veil.enclave.runner.protocol import Runner, SeqStep, sample_steps, validate_steps
from veil.kernels.triton_fused import rmsnorm_residual, rope_kv_write
from veil.kernels.triton_paged_attention import paged_attention_decode
from veil.kernels.triton_paged_prefill import paged_attention_prefill

__all__ = ["DEFAULT_GRAPH_BATCHES", "CudaRunner"]

T = TypeVar("T")

DEFAULT_GRAPH_BATCHES = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128)


@dataclass(slots=True)
class _StepMeta:
    """Device tensors describing one eager step."""

    tokens: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    decode_rows: torch.Tensor | None
    decode_tables: torch.Tensor | None
    decode_lens: torch.Tensor | None
    prefill_rows: torch.Tensor | None
    prefill_tables: torch.Tensor | None
    prefill_lens: torch.Tensor | None
    prefill_starts: torch.Tensor | None
    prefill_max_q: int


class CudaRunner:
    """The GPU :class:`Runner`: executes batches of :class:`SeqStep` on a GPU (or, for tests, on the
    CPU under the Triton interpreter).

    ``graph_batches``: the decode batch sizes to capture (only sizes up to ``max_batch`` are kept);
    ``use_graphs`` defaults to True on CUDA. ``prefill_impl`` picks the prefill attention
    (``"sdpa"`` or ``"triton"``, see ``veil.kernels.triton_paged_prefill``). ``dtype`` defaults to
    bf16 on a GPU and fp32 on the CPU (the interpreter). Sampling happens on the device: at 64
    sequences × a 49k vocabulary the fp32 logits are 12.6 MB per step, which through CC-mode bounce
    buffers can cost as much as the step itself; greedy rows never leave the device. (Rows that sample
    at a temperature are moved to the host by the Sampler, whose row-wise CPU ops are what keep a
    seeded draw independent of its batch-mates.)
    """

    def __init__(
        self,
        model: LoadedModel,
        num_kv_blocks: int,
        block_size: int = 16,
        *,
        device: str | torch.device = "cuda",
        dtype: torch.dtype | None = None,
        max_batch: int = 64,
        graph_batches: Sequence[int] = DEFAULT_GRAPH_BATCHES,
        use_graphs: bool | None = None,
        prefill_impl: str = "sdpa",
        specs: LlamaSpecs | None = None,
    ) -> None:
        if num_kv_blocks < 1 or block_size < 1 or max_batch < 1:
            raise InvalidRequestError("the KV cache needs at least one block of one slot, and max_batch ≥ 1")
        self.dev = _usable_device(torch.device(device))
        default_dtype = torch.bfloat16 if self.dev.type == "cuda" else torch.float32  # interpreter: no bf16
        self.dtype = dtype if dtype is not None else default_dtype
        self.device = _describe(self.dev)
        self.config: ModelConfig = model.config
        self.tokenizer = model.tokenizer
        self.chat_template: str | None = model.chat_template
        self.eos_token_ids: frozenset[int] = model.eos_token_ids
        self.model_digest: bytes = model.model_digest
        self.max_context: int = model.config.max_context
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks
        self.prefill_impl = prefill_impl
        self.sampler = Sampler()
        cfg = self.config
        self.weights = build_gpu_weights(
            specs if specs is not None else model.specs(), cfg, self.dev, self.dtype
        )
        shape = (cfg.n_layers, cfg.n_kv_heads, num_kv_blocks, block_size, cfg.head_dim)  # see the docstring
        self.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.dev)
        self.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.dev)
        # per layer, the [block, row, kv_head, dim] views the kernels index (strided, no copy)
        self._k = [c.permute(1, 2, 0, 3) for c in self.k_cache]
        self._v = [c.permute(1, 2, 0, 3) for c in self.v_cache]
        cos, sin = rope_tables(cfg, cfg.max_context)  # [P, D] rotate-half, both halves equal
        half = cfg.head_dim // 2
        self.cos = cos[:, :half].contiguous().to(self.dev)
        self.sin = sin[:, :half].contiguous().to(self.dev)
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        # The interpreter runs programs one by one: one KV split (see veil.kernels.triton_common.
        # interpreter_block_n); on a GPU the split is chosen from the shapes.
        self._splits: int | None = 1 if self.dev.type == "cpu" else None
        self.max_blocks_per_seq = -(-self.max_context // block_size)

        ladder = sorted({b for b in graph_batches if 0 < b <= max_batch} | {max_batch})
        self.graph_batches: tuple[int, ...] = tuple(ladder)
        top = ladder[-1]
        # Static decode inputs (graphs read these addresses; each step copies its values in).
        self._tokens = torch.zeros(top, dtype=torch.long, device=self.dev)
        self._positions = torch.zeros(top, dtype=torch.long, device=self.dev)
        self._slots = torch.full((top,), -1, dtype=torch.long, device=self.dev)
        self._tables = torch.zeros((top, self.max_blocks_per_seq), dtype=torch.int32, device=self.dev)
        self._lens = torch.zeros(top, dtype=torch.int32, device=self.dev)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if use_graphs if use_graphs is not None else self.dev.type == "cuda":
            self._capture()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="veil-cuda")
        weakref.finalize(self, self._pool.shutdown, wait=False)  # a dropped runner leaves no thread

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Queue ``fn(*args)`` on this runner's one device thread (the engine runs each step there)."""
        return self._pool.submit(fn, *args)

    # ----------------------------------------------------------------------------------- the forward pass

    def _forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        attention: Callable[[int, torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states after the final norm, ``[T, hidden]`` in ``self.dtype``."""
        cfg, w = self.config, self.weights
        nh, nkv, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        inter = cfg.intermediate
        t = tokens.shape[0]
        x = w.embed.lookup(tokens).to(self.dtype)
        residual: torch.Tensor | None = None
        for li, layer in enumerate(w.layers):
            h, residual = rmsnorm_residual(x, residual, layer.attn_norm, cfg.rms_eps)
            qkv = layer.qkv(h)
            q = qkv[:, : nh * hd].view(t, nh, hd)
            k = qkv[:, nh * hd : (nh + nkv) * hd].view(t, nkv, hd)
            v = qkv[:, (nh + nkv) * hd :].view(t, nkv, hd)
            q, _ = rope_kv_write(
                q, k, v, positions=positions, cos=self.cos, sin=self.sin,
                k_cache=self._k[li], v_cache=self._v[li], slot_mapping=slots,
            )  # fmt: skip
            x = layer.o(attention(li, q).reshape(t, nh * hd))
            h, residual = rmsnorm_residual(x, residual, layer.ffn_norm, cfg.rms_eps)
            gu = layer.gate_up(h)
            x = layer.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        out, _ = rmsnorm_residual(x, residual, w.norm, cfg.rms_eps)
        return out

    def _decode_attention(self, batch: int) -> Callable[[int, torch.Tensor], torch.Tensor]:
        def attend(li: int, q: torch.Tensor) -> torch.Tensor:
            return paged_attention_decode(
                q, self._k[li], self._v[li], self._tables[:batch], self._lens[:batch],
                scale=self.scale, max_context_len=self.max_context, num_splits=self._splits,
            )  # fmt: skip

        return attend

    def _decode_body(self, batch: int) -> torch.Tensor:
        """One padded decode step over the static buffers: fp32 logits ``[batch, vocab]``."""
        h = self._forward(
            self._tokens[:batch], self._positions[:batch], self._slots[:batch], self._decode_attention(batch)
        )
        return self.weights.output(h).float()

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.dev)  # type: ignore[no-untyped-call]
        for batch in sorted(self.graph_batches, reverse=True):  # largest first: the pool fits the rest
            stream.wait_stream(torch.cuda.current_stream(self.dev))
            with torch.cuda.stream(stream):
                self._decode_body(batch)  # compile the kernels, set up cuBLAS, outside the capture
            torch.cuda.current_stream(self.dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                logits = self._decode_body(batch)
            self._graphs[batch] = (graph, logits)
        torch.cuda.synchronize(self.dev)

    # ------------------------------------------------------------------------------------------ execute

    def _validate(self, steps: list[SeqStep]) -> None:
        validate_steps(
            steps,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_context=self.max_context,
            vocab=self.config.vocab,
        )

    def execute(self, steps: list[SeqStep]) -> list[int]:
        """Run ``steps`` and sample on the device: one token id per step with ``sample`` set, in order."""
        if not steps:
            return []
        self._validate(steps)
        with torch.inference_mode():
            return sample_steps(self.sampler, self._logits(steps), steps)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero KV ``blocks`` (axis 2 of both caches, every layer and head) on the device."""
        if blocks:
            index = torch.tensor(blocks, dtype=torch.long, device=self.dev)
            self.k_cache.index_fill_(2, index, 0.0)
            self.v_cache.index_fill_(2, index, 0.0)

    def logits(self, steps: list[SeqStep]) -> torch.Tensor:
        """Run ``steps``; fp32 logits ``[steps with sample set, vocab]`` copied to the host (parity
        tests and benchmarks only: serving samples on the device)."""
        if not steps:
            return torch.empty(0, self.config.vocab)
        self._validate(steps)
        with torch.inference_mode():
            return self._logits(steps).cpu()  # a copy: a graph's output buffer is reused by the next replay

    def _logits(self, steps: list[SeqStep]) -> torch.Tensor:
        """fp32 logits of the sampled positions, on the device, in step order."""
        if all(len(s.token_ids) == 1 for s in steps) and len(steps) <= self.graph_batches[-1]:
            logits = self._execute_decode(steps)
            want = [i for i, s in enumerate(steps) if s.want_logits]
        else:
            logits, want = self._execute_eager(steps)
        return logits if len(want) == logits.shape[0] else logits[want]

    def _execute_decode(self, steps: list[SeqStep]) -> torch.Tensor:
        n = len(steps)
        batch = next(b for b in self.graph_batches if b >= n)
        bs = self.block_size
        # Host staging in plain numpy arrays (pageable), then one copy per static buffer. Padding rows
        # keep slot -1 and length 0. Only the block-table columns a row uses are written: the kernel
        # never reads a column past a row's context, so stale entries further right are harmless.
        ints = np.zeros((4, batch), dtype=np.int64)  # tokens, positions, slots, lengths
        ints[2, :] = -1
        used = [(s.start_pos + bs) // bs for s in steps]  # blocks covering positions 0 .. start_pos
        width = max(used)
        tables = np.zeros((batch, width), dtype=np.int32)
        for i, s in enumerate(steps):
            p = s.start_pos
            ints[0, i] = s.token_ids[0]
            ints[1, i] = p
            ints[2, i] = s.block_table[p // bs] * bs + p % bs
            ints[3, i] = p + 1
            tables[i, : used[i]] = s.block_table[: used[i]]
        staged = torch.from_numpy(ints)
        self._tokens[:batch].copy_(staged[0])
        self._positions[:batch].copy_(staged[1])
        self._slots[:batch].copy_(staged[2])
        self._lens[:batch].copy_(staged[3])
        self._tables[:batch, :width].copy_(torch.from_numpy(tables))
        captured = self._graphs.get(batch)
        if captured is not None:
            graph, logits = captured
            graph.replay()
            return logits[:n]
        return self._decode_body(batch)[:n]

    def _execute_eager(self, steps: list[SeqStep]) -> tuple[torch.Tensor, list[int]]:
        meta, logit_rows = self._step_meta(steps)
        if not logit_rows:
            return torch.empty(0, self.config.vocab, device=self.dev), []
        k_cache, v_cache = self._k, self._v

        def attend(li: int, q: torch.Tensor) -> torch.Tensor:
            out = torch.empty_like(q)
            if (
                meta.decode_rows is not None
                and meta.decode_tables is not None
                and meta.decode_lens is not None
            ):
                out[meta.decode_rows] = paged_attention_decode(
                    q[meta.decode_rows], k_cache[li], v_cache[li], meta.decode_tables, meta.decode_lens,
                    scale=self.scale, max_context_len=self.max_context, num_splits=self._splits,
                )  # fmt: skip
            if (
                meta.prefill_rows is not None
                and meta.prefill_tables is not None
                and meta.prefill_lens is not None
                and meta.prefill_starts is not None
            ):
                out[meta.prefill_rows] = paged_attention_prefill(
                    q[meta.prefill_rows], k_cache[li], v_cache[li], meta.prefill_tables,
                    context_lens=meta.prefill_lens, query_start_loc=meta.prefill_starts,
                    max_query_len=meta.prefill_max_q, scale=self.scale, impl=self.prefill_impl,
                )  # fmt: skip
            return out

        h = self._forward(meta.tokens, meta.positions, meta.slots, attend)
        rows = torch.tensor(logit_rows, dtype=torch.long, device=self.dev)
        return self.weights.output(h[rows]).float(), list(range(len(logit_rows)))

    def _step_meta(self, steps: list[SeqStep]) -> tuple[_StepMeta, list[int]]:
        bs = self.block_size
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        dec_rows: list[int] = []
        dec_seqs: list[SeqStep] = []
        pf_rows: list[int] = []
        pf_seqs: list[SeqStep] = []
        pf_starts = [0]
        logit_rows: list[int] = []
        for s in steps:
            row, n = len(tokens), len(s.token_ids)
            tokens.extend(s.token_ids)
            for p in range(s.start_pos, s.start_pos + n):
                positions.append(p)
                slots.append(s.block_table[p // bs] * bs + p % bs)
            if n == 1:
                dec_rows.append(row)
                dec_seqs.append(s)
            else:
                pf_rows.extend(range(row, row + n))
                pf_seqs.append(s)
                pf_starts.append(pf_starts[-1] + n)
            if s.want_logits:
                logit_rows.append(row + n - 1)

        def dev(values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(self.dev)  # pageable copy

        def tables(seqs: list[SeqStep]) -> torch.Tensor:
            width = max(-(-(s.start_pos + len(s.token_ids)) // bs) for s in seqs)
            rows = [s.block_table[:width] + [0] * (width - len(s.block_table[:width])) for s in seqs]
            return dev([b for r in rows for b in r], torch.int32).view(len(seqs), width)

        def lens(seqs: list[SeqStep]) -> torch.Tensor:
            return dev([s.start_pos + len(s.token_ids) for s in seqs], torch.int32)

        meta = _StepMeta(
            tokens=dev(tokens),
            positions=dev(positions),
            slots=dev(slots),
            decode_rows=dev(dec_rows) if dec_rows else None,
            decode_tables=tables(dec_seqs) if dec_seqs else None,
            decode_lens=lens(dec_seqs) if dec_seqs else None,
            prefill_rows=dev(pf_rows) if pf_rows else None,
            prefill_tables=tables(pf_seqs) if pf_seqs else None,
            prefill_lens=lens(pf_seqs) if pf_seqs else None,
            prefill_starts=dev(pf_starts, torch.int32) if pf_seqs else None,
            prefill_max_q=max((len(s.token_ids) for s in pf_seqs), default=0),
        )
        return meta, logit_rows


def _usable_device(device: torch.device) -> torch.device:
    """``device`` if this runner can run there: a present CUDA device, or the CPU under the interpreter."""
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError("no CUDA device is available (torch.cuda.is_available() is false)")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if not 0 <= index < torch.cuda.device_count():
            raise DeviceUnavailableError(f"no CUDA device {index} ({torch.cuda.device_count()} present)")
        return torch.device("cuda", index)
    if device.type == "cpu":
        from veil.kernels.triton_common import kernels_run_on_cpu

        if not kernels_run_on_cpu():
            raise DeviceUnavailableError(
                "the CUDA runner runs on the CPU only under the Triton interpreter: set TRITON_INTERPRET=1 "
                "before the kernel modules are imported (or use the CPU runner)"
            )
        return device
    raise DeviceUnavailableError(f"the CUDA runner cannot run on {device.type!r}")


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return "cpu (Triton interpreter)"


_RUNNER: type[Runner] = CudaRunner  # mypy checks that CudaRunner implements the protocol

"""What shape a request's answer must take (structured output), checked when built. Pure: no torch.

A :class:`ResponseFormat` is one of: any JSON object (OpenAI's ``{"type": "json_object"}``), a
JSON Schema given as JSON text (``{"type": "json_schema"}``), or a context-free grammar in
llguidance's Lark dialect. The engine compiles it (:mod:`veil.enclave.engine.grammar`) and masks
every token the grammar does not allow before sampling. Error messages name the field and the
problem; they travel back inside the encrypted response only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Literal

from veil.enclave.errors import ResponseFormatError

__all__ = ["MAX_FORMAT_BYTES", "ResponseFormat"]

# The schema or grammar text a request may carry. It is sealed with the prompt and padded with it
# to the request's size bucket; a limit far above real schemas bounds the compile work one request
# can ask of the enclave (llguidance's own parser limits bound the rest).
MAX_FORMAT_BYTES = 64 * 1024
_MAX_NAME_CHARS = 128

Kind = Literal["json_object", "json_schema", "lark_grammar"]
_KINDS = ("json_object", "json_schema", "lark_grammar")


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """One request's output constraint. ``text`` is the JSON Schema or the grammar ('' for JSON mode)."""

    kind: Kind
    text: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ResponseFormatError(f"response_format type must be one of {', '.join(_KINDS)}")
        if not isinstance(self.text, str) or not isinstance(self.name, str):
            raise ResponseFormatError("response_format fields must be strings")
        if len(self.name) > _MAX_NAME_CHARS:
            raise ResponseFormatError(f"response_format name is limited to {_MAX_NAME_CHARS} characters")
        size = len(self.text.encode("utf-8", "surrogatepass"))
        if size > MAX_FORMAT_BYTES:
            raise ResponseFormatError(
                f"response_format {self.kind} is {size} bytes; the limit is {MAX_FORMAT_BYTES}"
            )
        if self.kind == "json_object":
            if self.text:
                raise ResponseFormatError("response_format json_object takes no schema")
        elif not self.text.strip():
            raise ResponseFormatError(f"response_format {self.kind} is empty")
        if self.kind == "json_schema":
            try:
                schema = json.loads(self.text)
            except ValueError as exc:
                raise ResponseFormatError(f"response_format json_schema is not valid JSON: {exc}") from None
            if not isinstance(schema, dict):
                raise ResponseFormatError("response_format json_schema must be a JSON object")

    @property
    def digest(self) -> bytes:
        """SHA-256 over the kind and the exact text: the key of the compiled-grammar cache."""
        h = hashlib.sha256(b"veil/response-format/v1\0")
        h.update(self.kind.encode())
        h.update(b"\0")
        h.update(self.text.encode("utf-8", "surrogatepass"))
        return h.digest()

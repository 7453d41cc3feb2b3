"""``response_format=`` of ``chat.completions.create``: the OpenAI shapes, turned into the sealed field.

Accepted (the OpenAI API's shapes, plus one for raw grammars):

* ``None`` or ``{"type": "text"}``: free text;
* ``{"type": "json_object"}``: any JSON object;
* ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``: an
  answer valid under the JSON Schema (``schema`` a dict or JSON text; Veil always enforces it,
  whatever ``strict`` says);
* a Pydantic model class (anything with ``model_json_schema()``): its JSON Schema, named after
  the class. Pydantic is not a dependency of the client: the class brings its own;
* ``{"type": "grammar", "grammar": "<Lark grammar>"}``: a context-free grammar in llguidance's
  Lark dialect (a Veil extension).

The schema is sealed inside the request with the prompt; the enclave compiles it and answers an
invalid or unsupported one with ``RequestRejectedError("INVALID_REQUEST", <what is wrong>)``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, TypeAlias

from veil.client.errors import ConfigurationError
from veil.proto.v1 import generate_pb2

__all__ = ["ResponseFormat", "check_response_format"]

# What ``create(response_format=...)`` takes: an OpenAI-shaped dict or a Pydantic model class.
ResponseFormat: TypeAlias = Mapping[str, Any] | type[Any]

_NAME_CHARS = 128


def check_response_format(response_format: object) -> generate_pb2.ResponseFormat | None:
    """The sealed form of ``response_format``; raises :class:`ConfigurationError` for a wrong shape."""
    if response_format is None:
        return None
    to_schema = getattr(response_format, "model_json_schema", None)
    if isinstance(response_format, type) and callable(to_schema):
        schema = to_schema()
        return generate_pb2.ResponseFormat(json_schema=_schema_text(schema), name=response_format.__name__)
    if not isinstance(response_format, Mapping):
        raise ConfigurationError(
            "response_format must be a dict like {'type': 'json_object'} or a Pydantic model class"
        )
    kind = response_format.get("type")
    _known_keys(
        response_format, _KEYS.get(kind, {"type"}) if isinstance(kind, str) else {"type"}, "response_format"
    )
    if kind == "text":
        return None
    if kind == "json_object":
        return generate_pb2.ResponseFormat(json_object=generate_pb2.ResponseFormat.JsonObject())
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, Mapping) or "schema" not in spec:
            raise ConfigurationError("response_format json_schema needs {'json_schema': {'schema': {...}}}")
        _known_keys(spec, {"name", "schema", "strict", "description"}, "response_format json_schema")
        name = spec.get("name", "")
        if not isinstance(name, str) or len(name) > _NAME_CHARS:
            raise ConfigurationError(f"response_format json_schema.name must be a string of <= {_NAME_CHARS}")
        return generate_pb2.ResponseFormat(json_schema=_schema_text(spec["schema"]), name=name)
    if kind == "grammar":
        grammar = response_format.get("grammar")
        if not isinstance(grammar, str) or not grammar.strip():
            raise ConfigurationError("response_format grammar needs {'grammar': '<Lark grammar>'}")
        return generate_pb2.ResponseFormat(lark_grammar=grammar)
    raise ConfigurationError(
        f"response_format type must be 'text', 'json_object', 'json_schema' or 'grammar', got {kind!r}"
    )


# The keys each OpenAI shape has (and Veil's grammar extension): anything else is refused by
# name rather than ignored, as the OpenAI API does (``strict`` is accepted: it is always enforced).
_KEYS = {
    "text": {"type"},
    "json_object": {"type"},
    "json_schema": {"type", "json_schema"},
    "grammar": {"type", "grammar"},
}


def _known_keys(spec: Mapping[str, Any], known: set[str], where: str) -> None:
    unknown = sorted(str(k) for k in spec if k not in known)
    if unknown:
        raise ConfigurationError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}")


def _schema_text(schema: Any) -> str:
    """A JSON Schema as JSON text, keys in the caller's order (the order the answer follows)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise ConfigurationError(f"response_format schema is not valid JSON: {exc}") from None
    if not isinstance(schema, Mapping):
        raise ConfigurationError("response_format schema must be a JSON object (a dict)")
    try:
        return json.dumps(schema, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"response_format schema is not JSON-serializable: {exc}") from None

"""Prompts and JSON Schemas shared by the structured-output tests and bench/structured.py."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["PROMPTS", "SCHEMAS", "schema_text"]

PROMPTS = [
    "Describe a person you might meet in a cafe.",
    "Tell me about your favourite book.",
    "Give me a recipe for pancakes.",
    "What is the weather like in Paris in spring?",
    "Describe a dog.",
    "Plan a weekend trip to the mountains.",
    "Summarise the plot of a detective story.",
    "Invent a new board game.",
    "Describe a city of the future.",
    "Recommend a laptop for a student.",
    "Explain what a rainbow is.",
    "Write a short product review of headphones.",
]

# Objects with required fields, enums, arrays, nested objects, numbers with bounds. Strings and
# arrays are bounded so that every answer can complete within the tests' small max_tokens.
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 24},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "employed": {"type": "boolean"},
        },
        "required": ["name", "age", "employed"],
        "additionalProperties": False,
    },
    "rating": {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "score": {"type": "number", "minimum": 0, "maximum": 10},
            "confidence": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["sentiment", "score", "confidence"],
        "additionalProperties": False,
    },
    "tags": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 32},
            "tags": {
                "type": "array",
                "items": {"type": "string", "maxLength": 12},
                "minItems": 1,
                "maxItems": 3,
            },
        },
        "required": ["title", "tags"],
        "additionalProperties": False,
    },
    "place": {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 20},
            "location": {
                "type": "object",
                "properties": {
                    "lat": {"type": "number", "minimum": -90, "maximum": 90},
                    "lon": {"type": "number", "minimum": -180, "maximum": 180},
                },
                "required": ["lat", "lon"],
                "additionalProperties": False,
            },
            "season": {"enum": ["spring", "summer", "autumn", "winter"]},
        },
        "required": ["city", "location", "season"],
        "additionalProperties": False,
    },
}


def schema_text(name: str) -> str:
    return json.dumps(SCHEMAS[name])

"""JSON schemas of real-world shape (records, nested objects, bounded arrays, enums, anyOf, string formats,
required and optional fields) that structured-output tests and benchmarks share.

Every free string and array is bounded, so a model that samples at random inside the grammar still reaches the
end of a document within a few hundred tokens.
"""

from __future__ import annotations

from typing import Any


def _s(max_length: int = 12, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "maxLength": max_length, **extra}


def _obj(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False, **extra}
    schema["required"] = list(properties) if required is None else required
    return schema


def _array(items: dict[str, Any], max_items: int = 3, min_items: int = 0) -> dict[str, Any]:
    return {"type": "array", "items": items, "minItems": min_items, "maxItems": max_items}


_INT = {"type": "integer", "minimum": 0, "maximum": 9999}
_NUM = {"type": "number", "minimum": -1000, "maximum": 1000}
_BOOL = {"type": "boolean"}
_ADDRESS = _obj({"street": _s(), "city": _s(), "zip": _s(pattern="^[0-9]{5}$"),
                 "country": {"enum": ["US", "FR", "DE", "JP"]}}, ["city", "country"])
_MONEY = _obj({"amount": _NUM, "currency": {"enum": ["USD", "EUR", "JPY"]}})

SCHEMAS: dict[str, dict[str, Any]] = {
    "user": _obj({"id": _INT, "name": _s(), "email": _s(40, format="email"), "active": _BOOL}, ["id", "name"]),
    "address": _ADDRESS,
    "person_with_address": _obj({"name": _s(), "age": {"type": "integer", "minimum": 0, "maximum": 130},
                                 "address": _ADDRESS}),
    "product": _obj({"sku": _s(pattern="^[A-Z]{3}-[0-9]{3}$"), "title": _s(), "price": _MONEY,
                     "tags": _array(_s(8))}, ["sku", "price"]),
    "order": _obj({"order_id": {"type": "string", "format": "uuid"}, "items": _array(
        _obj({"sku": _s(), "quantity": {"type": "integer", "minimum": 1, "maximum": 99}}), 3, 1),
        "total": _MONEY}),
    "event": _obj({"title": _s(), "date": {"type": "string", "format": "date"}, "all_day": _BOOL}, ["title", "date"]),
    "timestamped": _obj({"at": {"type": "string", "format": "date-time"}, "level": {"enum": ["info", "warn"]}}),
    "weather": _obj({"city": _s(), "temperature_c": _NUM, "conditions": {"enum": ["sunny", "rain", "snow", "fog"]},
                     "wind_kph": {"type": "number", "minimum": 0, "maximum": 300}}, ["city", "temperature_c"]),
    "tool_call": _obj({"name": {"enum": ["get_weather", "search", "send_email"]},
                       "arguments": _obj({"query": _s(20), "limit": {"type": "integer", "minimum": 1,
                                                                     "maximum": 10}}, ["query"])}),
    "search_result": _obj({"results": _array(_obj({"url": _s(30), "score": {"type": "number", "minimum": 0,
                                                                             "maximum": 1}}), 2)}),
    "sentiment": _obj({"label": {"enum": ["positive", "negative", "neutral"]},
                       "confidence": {"type": "number", "minimum": 0, "maximum": 1}}),
    "classification": _obj({"category": {"enum": ["bug", "feature", "question"]}, "priority": {"enum": [1, 2, 3]}}),
    "entity_list": _obj({"entities": _array(_obj({"text": _s(), "type": {"enum": ["PER", "ORG", "LOC"]}}), 3)}),
    "key_values": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 99},
                   "maxProperties": 3},
    "matrix": _obj({"rows": _array(_array({"type": "integer", "minimum": 0, "maximum": 9}, 3, 1), 3, 1)}),
    "coordinates": _obj({"lat": {"type": "number", "minimum": -90, "maximum": 90},
                         "lon": {"type": "number", "minimum": -180, "maximum": 180}}),
    "bounding_box": _obj({"min": _obj({"x": _INT, "y": _INT}), "max": _obj({"x": _INT, "y": _INT})}),
    "color": _obj({"hex": _s(pattern="^#[0-9a-f]{6}$"), "name": _s()}, ["hex"]),
    "rgb": _array({"type": "integer", "minimum": 0, "maximum": 255}, 3, 3),
    "shape": {"anyOf": [_obj({"kind": {"const": "circle"}, "radius": _NUM}),
                        _obj({"kind": {"const": "square"}, "side": _NUM})]},
    "id_or_name": _obj({"ref": {"anyOf": [_INT, _s()]}}),
    "nullable_note": _obj({"note": {"anyOf": [_s(), {"type": "null"}]}}),
    "optional_fields": _obj({"a": _INT, "b": _s(), "c": _BOOL, "d": _NUM}, ["a"]),
    "no_required": _obj({"x": _INT, "y": _INT}, []),
    "nested_three": _obj({"outer": _obj({"middle": _obj({"inner": _s()})})}),
    "company": _obj({"name": _s(), "employees": _array(_obj({"name": _s(), "role": {"enum": ["eng", "pm", "ops"]}}),
                                                        2), "hq": _ADDRESS}, ["name", "hq"]),
    "invoice": _obj({"number": _s(pattern="^INV-[0-9]{4}$"), "lines": _array(_obj({"desc": _s(), "cost": _MONEY}), 2,
                                                                               1), "paid": _BOOL}),
    "calendar": _obj({"days": _array({"enum": ["mon", "tue", "wed", "thu", "fri"]}, 5, 1)}),
    "recipe": _obj({"title": _s(), "servings": {"type": "integer", "minimum": 1, "maximum": 12},
                    "ingredients": _array(_obj({"name": _s(), "grams": _INT}), 3, 1)}),
    "book": _obj({"isbn": _s(13, pattern="^[0-9]{13}$"), "title": _s(), "authors": _array(_s(), 2, 1),
                  "year": {"type": "integer", "minimum": 1450, "maximum": 2030}}),
    "movie": _obj({"title": _s(), "rating": {"type": "number", "minimum": 0, "maximum": 10},
                   "genres": _array({"enum": ["drama", "comedy", "action"]}, 2)}, ["title"]),
    "http_request": _obj({"method": {"enum": ["GET", "POST", "PUT", "DELETE"]}, "path": _s(20, pattern="^/[a-z/]*$"),
                          "headers": {"type": "object", "additionalProperties": _s(), "maxProperties": 2}},
                         ["method", "path"]),
    "http_response": _obj({"status": {"type": "integer", "minimum": 100, "maximum": 599}, "body": _s(20)}),
    "feature_flags": _obj({"flags": _array(_obj({"name": _s(), "enabled": _BOOL}), 3)}),
    "semver": _obj({"version": _s(pattern="^[0-9]\\.[0-9]{1,2}\\.[0-9]{1,2}$")}),
    "ip_record": _obj({"ip": {"type": "string", "format": "ipv4"}, "port": {"type": "integer", "minimum": 1,
                                                                              "maximum": 65535}}),
    "contact": _obj({"name": _s(), "phones": _array(_s(pattern="^[0-9]{3}-[0-9]{4}$"), 2),
                     "email": _s(40, format="email")}, ["name"]),
    "review": _obj({"stars": {"enum": [1, 2, 3, 4, 5]}, "text": _s(20), "verified": _BOOL}),
    "task": _obj({"title": _s(), "done": _BOOL, "subtasks": _array(_obj({"title": _s(), "done": _BOOL}), 2)}),
    "graph_edge": _obj({"from": _INT, "to": _INT, "weight": _NUM}),
    "graph": _obj({"nodes": _array(_INT, 4, 1), "edges": _array(_obj({"from": _INT, "to": _INT}), 3)}),
    "pagination": _obj({"page": {"type": "integer", "minimum": 1, "maximum": 100},
                        "per_page": {"enum": [10, 25, 50]}, "has_more": _BOOL}),
    "error": _obj({"error": _obj({"code": {"enum": ["NOT_FOUND", "INVALID", "INTERNAL"]}, "message": _s(20)})}),
    "translation": _obj({"source_lang": {"enum": ["en", "fr", "de"]}, "target_lang": {"enum": ["en", "fr", "de"]},
                         "text": _s(20)}),
    "answer_with_sources": _obj({"answer": _s(20), "sources": _array({"type": "integer", "minimum": 1,
                                                                      "maximum": 9}, 3)}),
    "yes_no": _obj({"answer": _BOOL}),
    "score_vector": _array({"type": "number", "minimum": 0, "maximum": 1}, 4, 1),
    "string_list": _array(_s(8), 4),
    "enum_only": {"enum": ["red", "green", "blue"]},
    "integer_only": {"type": "integer", "minimum": -50, "maximum": 50},
    "mixed_array": _array({"anyOf": [_INT, _BOOL, _s(6)]}, 3),
    "sensor_reading": _obj({"sensor": _s(pattern="^s[0-9]{2}$"), "values": _array(_NUM, 3, 1),
                            "unit": {"enum": ["C", "F", "K"]}}),
    "bank_transfer": _obj({"from_account": _s(pattern="^[0-9]{8}$"), "to_account": _s(pattern="^[0-9]{8}$"),
                           "amount": _MONEY, "memo": _s()}, ["from_account", "to_account", "amount"]),
    "survey": _obj({"answers": _array(_obj({"question": _INT, "choice": {"enum": ["a", "b", "c", "d"]}}), 3, 1)}),
    "config": _obj({"debug": _BOOL, "retries": {"type": "integer", "minimum": 0, "maximum": 5},
                    "timeout_s": {"type": "number", "minimum": 0, "maximum": 60},
                    "mode": {"enum": ["fast", "safe"]}}, ["mode"]),
}

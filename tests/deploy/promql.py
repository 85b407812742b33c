"""The metric names a PromQL expression (or a Grafana `label_values(...)` query) reads."""

from __future__ import annotations

import re

# Words of PromQL that are not metric names: aggregation modifiers, binary operators and vector matching.
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                       "offset", "bool", "inf", "nan"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(?P<metric>[^,]+),)?\s*(?P<label>[A-Za-z_][A-Za-z0-9_]*)\s*\)\s*$")


def metric_names(expression: str) -> set[str]:
    """Every metric name the expression selects: identifiers outside strings, label matchers ({...}), ranges
    ([...]), grouping clauses and numbers, that are neither functions (followed by '(') nor keywords."""
    label_values = _LABEL_VALUES.match(expression)
    if label_values is not None:
        return metric_names(label_values["metric"]) if label_values["metric"] else set()
    text = _STRING.sub('""', expression)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b\d[\w.]*", " ", text)  # numbers and durations (0.95, 5m, 1e3)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        word = match.group()
        followed_by_call = text[match.end():].lstrip().startswith("(")
        if followed_by_call or word.lower() in _KEYWORDS or word.startswith("$"):
            continue
        names.add(word)
    return names

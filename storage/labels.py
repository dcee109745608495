"""Label sets read once per distinct label object: canonical JSON (the series identity), the
reason a set cannot be stored, and the facts the quality rules read (count, longest name and
value).

Rows decoded from one file share label dicts, so everything here works per distinct object
(by `id()`), never per row.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from metricmill.types import Reason


def canonical_labels(labels: Any) -> tuple[str | None, str | None]:
    """(canonical JSON, None) for a usable label set, else (None, reason)."""
    if labels is None or (isinstance(labels, float) and math.isnan(labels)):
        return "{}", None
    if isinstance(labels, str):
        text = labels.strip()
        if not text:
            return "{}", None
        try:
            labels = json.loads(text)
        except ValueError:
            return None, Reason.INVALID_LABELS
    if not isinstance(labels, Mapping):
        return None, Reason.INVALID_LABELS
    clean: dict[str, str] = {}
    for key, value in labels.items():
        if not isinstance(key, str) or not key:
            return None, Reason.INVALID_LABELS
        if isinstance(value, bool):
            text_value = "true" if value else "false"
        elif isinstance(value, str | int | float):
            text_value = str(value)
        else:
            return None, Reason.INVALID_LABELS
        for part in (key, text_value):
            if "\x00" in part:
                return None, Reason.NUL_CHARACTER
            try:
                part.encode("utf-8")
            except UnicodeEncodeError:
                return None, Reason.INVALID_UNICODE
        clean[key] = text_value
    return json.dumps(clean, sort_keys=True, ensure_ascii=False, separators=(",", ":")), None


_CANONICAL_JSON = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))
# canonical JSON of label sets of text (their items as given -> JSON), shared by batches: the
# same series come back batch after batch. Emptied when full.
_CANONICAL_CACHE: dict[tuple[tuple[str, str], ...], str] = {}
_CANONICAL_CACHE_SIZE = 200_000


def _plain_text_sets(objs: list[Any]) -> tuple[list[str], list[str]] | None:
    """(all keys, all values) when every object is a dict of text to text, else None."""
    if not objs or set(map(type, objs)) != {dict}:
        return None
    keys = list(chain.from_iterable(objs))
    values = list(chain.from_iterable(map(dict.values, objs)))
    if set(map(type, keys)) <= {str} and set(map(type, values)) <= {str}:
        return keys, values
    return None


def canonical_label_sets(objs: list[Any]) -> tuple[np.ndarray, np.ndarray]:
    """`canonical_labels` of each object: (canonical JSON or None, reason or None) arrays.

    Dicts of text keys and values (what readers give) that are all usable are done together:
    one check of the text for NUL and lone surrogates, one encoder, remembered across calls.
    Anything else goes through `canonical_labels` one object at a time."""
    m = len(objs)
    canon = np.empty(m, dtype=object)
    reasons = np.full(m, None, dtype=object)
    plain = _plain_text_sets(objs)
    if plain is not None and all(plain[0]):
        keys, values = plain
        text = "\x01".join(keys) + "\x01" + "\x01".join(values)
        usable = "\x00" not in text
        if usable:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                usable = False
        if usable:
            cache = _CANONICAL_CACHE
            if len(cache) + m > _CANONICAL_CACHE_SIZE:
                cache.clear()
            encode = _CANONICAL_JSON.encode
            for pos, obj in enumerate(objs):
                items = tuple(obj.items())
                found = cache.get(items)
                if found is None:
                    found = cache[items] = encode(obj)
                canon[pos] = found
            return canon, reasons
    for pos, obj in enumerate(objs):
        canon[pos], reasons[pos] = canonical_labels(obj)
    return canon, reasons


@dataclass
class LabelSets:
    """The distinct label objects of a batch, read once: per object its canonical JSON (None
    when unusable) and reason, label count, longest name and longest value; per row the
    number of its object."""

    of_row: np.ndarray  # int64: the object of each row
    canonical: np.ndarray  # object: canonical JSON or None, per object
    reasons: np.ndarray  # object: why the set cannot be stored, or None, per object
    count: np.ndarray  # int64 per object
    longest_name: np.ndarray  # int64 per object
    longest_value: np.ndarray  # int64 per object


def read_label_sets(label_objs: np.ndarray) -> LabelSets:
    """Each distinct label object (by id) read once: canonical form, reason and sizes."""
    n = len(label_objs)
    object_ids = np.fromiter(map(id, label_objs), dtype=np.int64, count=n)
    _, first_row, of_row = np.unique(object_ids, return_index=True, return_inverse=True)
    objs = label_objs[first_row].tolist()
    canonical, reasons = canonical_label_sets(objs)
    count, longest_name, longest_value = _label_sizes(objs)
    return LabelSets(
        of_row=np.asarray(of_row, dtype=np.int64).reshape(-1),
        canonical=canonical,
        reasons=reasons,
        count=count,
        longest_name=longest_name,
        longest_value=longest_value,
    )


def _label_sizes(objs: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(label count, longest name, longest value) per object: whole-list numpy reductions
    when every object is a dict of text to text, else one `_sizes_of` call per object."""
    m = len(objs)
    plain = _plain_text_sets(objs)
    if plain is None:
        sizes = [_sizes_of(obj) for obj in objs]
        return tuple(  # type: ignore[return-value]
            np.fromiter((s[i] for s in sizes), dtype=np.int64, count=m) for i in range(3)
        )
    keys, values = plain
    count = np.fromiter(map(len, objs), dtype=np.int64, count=m)
    longest_name = np.zeros(m, dtype=np.int64)
    longest_value = np.zeros(m, dtype=np.int64)
    filled = count > 0
    if filled.any():
        starts = (np.cumsum(count) - count)[filled]
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))
        longest_name[filled] = np.maximum.reduceat(lengths, starts)
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        longest_value[filled] = np.maximum.reduceat(lengths, starts)
    return count, longest_name, longest_value


def _label_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _sizes_of(obj: Any) -> tuple[int, int, int]:
    """(label count, longest name, longest value) of one label object; 0s when it is not a
    mapping (nor JSON text of one)."""
    mapping: Any = obj
    if obj is None or (isinstance(obj, float) and math.isnan(obj)):
        return 0, 0, 0
    if isinstance(obj, str):
        text = obj.strip()
        try:
            mapping = json.loads(text) if text else {}
        except ValueError:
            return 0, 0, 0
    if not isinstance(mapping, Mapping) or not mapping:
        return 0, 0, 0
    pairs = [(str(k), _label_text(v)) for k, v in mapping.items()]
    return len(pairs), max(len(k) for k, _ in pairs), max(len(v) for _, v in pairs)

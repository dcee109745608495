"""PromQL-style label selectors: `metric{host="a", env!="dev", job=~"api.*", dc!~"eu-.*"}`.

Regex matchers run on RE2 (google-re2), the engine and syntax Prometheus uses: linear time in
the length of the value whatever the pattern (no catastrophic backtracking, so a silence or an
alert rule cannot stall a detect run), fully anchored and with `.` matching newlines, as
Prometheus compiles them (`^(?s:PATTERN)$`). Backreferences and lookarounds are not RE2 syntax
and are refused as invalid.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import re2

from metricmill.errors import SelectorError

Op = Literal["=", "!=", "=~", "!~"]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_MATCHER = re.compile(
    rf'\s*(?P<name>{_LABEL}|"(?:[^"\\]|\\.)*")\s*(?P<op>=~|!~|!=|=)\s*'
    r'(?P<value>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')\s*(?P<sep>,|$)'
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # an invalid pattern is the user's error line, not a C++ log


def compile_label_regex(pattern: str) -> Any:
    """A label matcher's pattern on RE2, fully anchored as Prometheus anchors it."""
    try:
        re2.compile(pattern, _RE2_OPTIONS)  # alone first: `a)|(b` must not escape the anchors
        return re2.compile(f"^(?s:{pattern})$", _RE2_OPTIONS)
    except re2.error as exc:
        detail = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise SelectorError(f"invalid regular expression {pattern!r}: {detail}") from None


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


@dataclass(frozen=True)
class Matcher:
    """One label condition; a missing label matches as the empty string, as in PromQL."""

    name: str
    op: Op
    value: str
    _regex: Any = field(default=None, compare=False, repr=False)  # a compiled RE2 pattern

    @classmethod
    def make(cls, name: str, op: Op, value: str) -> Matcher:
        regex = None
        if op in ("=~", "!~"):
            regex = compile_label_regex(value)
        return cls(name, op, value, regex)

    def matches(self, labels: Mapping[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self._regex is not None
        hit = self._regex.fullmatch(actual) is not None
        return hit if self.op == "=~" else not hit


@dataclass(frozen=True)
class Selector:
    """An optional metric name and the label matchers that must all hold."""

    metric: str | None = None
    matchers: tuple[Matcher, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(m.matches(labels) for m in self.matchers)

    @property
    def equalities(self) -> dict[str, str]:
        return {m.name: m.value for m in self.matchers if m.op == "="}


def parse_selector(text: str | Mapping[str, str] | Selector | None) -> Selector:
    """Parse `metric{...}`, `{...}`, `a="b",c=~"d"`, or take a plain dict as equalities."""
    if text is None:
        return Selector()
    if isinstance(text, Selector):
        return text
    if isinstance(text, Mapping):
        return Selector(None, tuple(Matcher.make(str(k), "=", str(v)) for k, v in text.items()))
    source = text.strip()
    if not source:
        return Selector()
    metric = None
    head = re.match(rf"({_NAME})\s*", source)
    if head and not re.match(rf"{_LABEL}\s*(=|!=|=~|!~)", source):
        metric = head.group(1)
        source = source[head.end() :]
    if source.startswith("{"):
        if not source.endswith("}"):
            raise SelectorError(f"malformed selector {text!r}: missing closing '}}'")
        source = source[1:-1]
    elif source and metric is not None:
        raise SelectorError(f"malformed selector {text!r}: expected '{{' after the metric")
    matchers: list[Matcher] = []
    pos = 0
    body = source.strip()
    while pos < len(body):
        found = _MATCHER.match(body, pos)
        if not found:
            raise SelectorError(
                f"malformed selector {text!r} at {body[pos : pos + 20]!r}: "
                'expected label="value", label!="value", label=~"regex" or label!~"regex"'
            )
        name = found.group("name")
        if name.startswith('"'):
            name = _unquote(name)
        op: Op = found.group("op")  # type: ignore[assignment]
        matchers.append(Matcher.make(name, op, _unquote(found.group("value"))))
        pos = found.end()
        if found.group("sep") == "," and pos >= len(body):
            break
    return Selector(metric, tuple(matchers))

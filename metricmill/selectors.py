"""PromQL-style label selectors: `metric{host="a", env!="dev", job=~"api.*", dc!~"eu-.*"}`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from metricmill.errors import SelectorError

Op = Literal["=", "!=", "=~", "!~"]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r"[a-zA-Z_][a-zA-Z0-9_]*"
_MATCHER = re.compile(
    rf'\s*(?P<name>{_LABEL}|"(?:[^"\\]|\\.)*")\s*(?P<op>=~|!~|!=|=)\s*'
    r'(?P<value>"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\')\s*(?P<sep>,|$)'
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


@dataclass(frozen=True)
class Matcher:
    """One label condition; a missing label matches as the empty string, as in PromQL."""

    name: str
    op: Op
    value: str
    _regex: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    @classmethod
    def make(cls, name: str, op: Op, value: str) -> Matcher:
        regex = None
        if op in ("=~", "!~"):
            try:
                regex = re.compile(value, re.DOTALL)
            except re.error as exc:
                raise SelectorError(f"invalid regular expression {value!r}: {exc}") from None
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

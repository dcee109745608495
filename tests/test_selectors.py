"""PromQL-style label selectors: parsing and matching, no database involved."""

from __future__ import annotations

import pytest

from metricmill.errors import SelectorError
from metricmill.selectors import Matcher, Selector, parse_selector


def ops(selector: Selector) -> list[tuple[str, str, str]]:
    return [(m.name, m.op, m.value) for m in selector.matchers]


def test_all_four_operators_parse() -> None:
    selector = parse_selector('{host="a", env!="dev", job=~"api.*", dc!~"eu-.*"}')

    assert selector.metric is None
    assert ops(selector) == [
        ("host", "=", "a"),
        ("env", "!=", "dev"),
        ("job", "=~", "api.*"),
        ("dc", "!~", "eu-.*"),
    ]


def test_metric_prefix_is_the_metric_name() -> None:
    host_a = (Matcher.make("host", "=", "a"),)
    assert parse_selector('cpu_usage{host="a"}') == Selector("cpu_usage", host_a)
    assert parse_selector("node:cpu:rate5m") == Selector("node:cpu:rate5m", ())
    assert parse_selector("cpu {}") == Selector("cpu", ())


def test_braces_are_optional_without_a_metric() -> None:
    assert ops(parse_selector('host="a",env!="dev"')) == [("host", "=", "a"), ("env", "!=", "dev")]


def test_escaped_quotes_and_backslashes_are_unescaped() -> None:
    selector = parse_selector(r'{path="C:\\dir\\\"x\"", note=' + r"'it\'s'" + "}")

    assert ops(selector) == [("path", "=", 'C:\\dir\\"x"'), ("note", "=", "it's")]


def test_trailing_comma_and_whitespace_are_allowed() -> None:
    assert ops(parse_selector('  cpu { host = "a" , }  ')) == [("host", "=", "a")]


def test_dict_is_a_set_of_equalities() -> None:
    selector = parse_selector({"host": "a", "env": "prod"})

    assert selector.metric is None
    assert ops(selector) == [("host", "=", "a"), ("env", "=", "prod")]
    assert selector.equalities == {"host": "a", "env": "prod"}


def test_empty_inputs_select_everything() -> None:
    for empty in (None, "", "   ", "{}", {}):
        selector = parse_selector(empty)
        assert selector.matchers == ()
        assert selector.matches({"anything": "goes"})


def test_regex_matching_is_anchored_and_missing_labels_are_empty() -> None:
    selector = parse_selector('{job=~"api", zone!~".+"}')

    assert selector.matches({"job": "api"})
    assert not selector.matches({"job": "api-gw"})
    assert not selector.matches({"job": "my-api"})
    assert not selector.matches({"job": "api", "zone": "eu"})
    assert parse_selector('{zone=""}').matches({})
    assert not parse_selector('{zone!=""}').matches({})


@pytest.mark.parametrize(
    "text",
    [
        'cpu{host="a"',
        "{host=a}",
        '{host~"a"}',
        '{host=~"("}',
        'cpu host="a"',
        '{="a"}',
        '{host="a" env="b"}',
        '{host="a"} extra',
        '{1host="a"}',
        '{host="unterminated}',
    ],
)
def test_malformed_selector_raises_selector_error(text: str) -> None:
    with pytest.raises(SelectorError):
        parse_selector(text)

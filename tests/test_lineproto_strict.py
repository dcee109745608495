"""Line protocol as strict as InfluxDB: control characters, strings over newlines, precision
of "now", and a bound on rejected lines. Cases in the upstream style: the input line, then the
points it gives or its rejection."""

from __future__ import annotations

from datetime import UTC, datetime

import pandas as pd
import pytest

from storage.limits import UnreadableFile
from storage.lineproto import LineProtocolResult, parse_line_protocol

NOW = datetime(2024, 5, 21, 12, 34, 56, 789_123, tzinfo=UTC)


def parse(text: str, **kwargs: object) -> LineProtocolResult:
    kwargs.setdefault("now", NOW)
    return parse_line_protocol(text, **kwargs)  # type: ignore[arg-type]


def points(result: LineProtocolResult) -> list[tuple[str, dict[str, str], float]]:
    frame = result.frame
    return list(zip(frame["metric"], frame["labels"], frame["value"], strict=True))


@pytest.mark.parametrize(
    "line",
    [
        "c\x01pu value=1 1",  # measurement
        "cpu\x1b[31m value=1 1",  # an ANSI escape in the measurement
        "cpu,ho\x7fst=a value=1 1",  # tag key
        "cpu,host=a\x0bb value=1 1",  # tag value, vertical tab
        "cpu,host=a\tb value=1 1",  # tag value, tab
        "cpu va\x01lue=1 1",  # field key
        "cpu,host=\x85 value=1 1",  # a C1 control (NEL)
        'cpu,host=a\x1b value=1,s="quoted" 1',  # also on the slow (quoted) path
        "cpu,host=a\\ \x01 value=1 1",  # also on the slow (escaped) path
    ],
)
def test_control_characters_in_names_and_tag_values_reject_the_line(line: str) -> None:
    result = parse(f"{line}\nok value=2 2", precision="s")
    assert result.rejected == [({"line": line, "line_no": 1}, "malformed_line")]
    assert points(result) == [("ok", {}, 2.0)]


def test_printable_unicode_names_are_kept() -> None:
    result = parse("température,pièce=cuisine valeur=21.5 1", precision="s")
    assert result.rejected == []
    assert points(result) == [("température_valeur", {"pièce": "cuisine"}, 21.5)]


def test_a_newline_inside_a_string_field_does_not_split_the_point() -> None:
    # InfluxDB: `str="foo\nbar"` is one string field; the numeric field beside it is kept.
    text = 'cpu,host=serverA value=1.0,str="foo\nbar" 1000000000\nnext value=2 1000000000'
    result = parse(text)
    assert result.rejected == []
    assert points(result) == [("cpu", {"host": "serverA"}, 1.0), ("next", {}, 2.0)]
    assert result.skipped_fields["string"] == 1


def test_a_string_cannot_smuggle_a_point_past_its_newline() -> None:
    # `x v=2` is inside the string: no sample x_v may come out of it.
    result = parse('m s="a\nx v=2\n"\nm v=3 3', precision="s")
    assert result.rejected == []
    assert points(result) == [("m_v", {}, 3.0)]
    assert result.skipped_fields["string"] == 1


def test_a_quote_in_a_tag_value_opens_no_string() -> None:
    # InfluxDB's TestParsePointsUnbalancedQuotedTags: the quote is part of the tag value.
    result = parse('baz,mytag="a x=1 1441103862125\nbaz,mytag=a z=1 1441103862126')
    assert [(m, labels) for m, labels, _ in points(result)] == [
        ("baz_x", {"mytag": '"a'}),
        ("baz_z", {"mytag": "a"}),
    ]


def test_an_escaped_quote_and_backslash_inside_a_string_keep_it_open_and_closed() -> None:
    result = parse('m v=1,s="a\\"\nb\\\\" 5\nm v=2 6', precision="s")
    assert result.rejected == []
    assert [v for *_, v in points(result)] == [1.0, 2.0]


def test_a_string_never_closed_rejects_only_its_line() -> None:
    result = parse('m s="open\nm v=1 1\nm v=2 2', precision="s")
    assert result.rejected == [({"line": 'm s="open', "line_no": 1}, "malformed_line")]
    assert [v for *_, v in points(result)] == [1.0, 2.0]


@pytest.mark.parametrize(
    ("precision", "expected"),
    [
        ("s", "2024-05-21T12:34:56Z"),
        ("ms", "2024-05-21T12:34:56.789Z"),
        ("us", "2024-05-21T12:34:56.789123Z"),
        ("ns", "2024-05-21T12:34:56.789123Z"),
    ],
)
def test_now_is_truncated_to_the_precision(precision: str, expected: str) -> None:
    result = parse("cpu value=1", precision=precision)
    assert result.frame["ts"].tolist() == [pd.Timestamp(expected)]


def test_more_bad_lines_than_the_bound_refuse_the_file() -> None:
    text = "\n".join(["junk"] * 11 + ["ok value=1 1"])
    assert len(parse(text, max_bad_lines=11).rejected) == 11
    with pytest.raises(UnreadableFile) as raised:
        parse(text, max_bad_lines=10)
    assert raised.value.reason == "too_many_bad_lines"

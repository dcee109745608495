"""InfluxDB line protocol parsing: naming, escapes, field types, timestamps, rejects."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import pandas as pd
import pytest

from storage.lineproto import LineProtocolResult, parse_line_protocol
from storage.normalise import prepare

NOW = datetime(2024, 5, 21, 12, 0, 0, tzinfo=UTC)
T0_NS = 1_700_000_000_123_456_789  # 2023-11-14T22:13:20.123456789Z
T0 = pd.Timestamp("2023-11-14T22:13:20.123456Z")


def parse(text: str, **kwargs: object) -> LineProtocolResult:
    kwargs.setdefault("now", NOW)
    return parse_line_protocol(text, **kwargs)  # type: ignore[arg-type]


def rows(result: LineProtocolResult) -> list[tuple[str, dict[str, str], pd.Timestamp, float]]:
    frame = result.frame
    return list(zip(frame["metric"], frame["labels"], frame["ts"], frame["value"], strict=True))


def test_simple_line() -> None:
    result = parse(f"cpu,host=server01 usage_idle=97.5 {T0_NS}\n")
    assert rows(result) == [("cpu_usage_idle", {"host": "server01"}, T0, 97.5)]
    assert result.rejected == []
    assert result.skipped_fields == {"string": 0, "boolean": 0}
    assert list(result.frame.columns) == ["metric", "labels", "ts", "value"]
    assert str(result.frame["ts"].dtype) == "datetime64[us, UTC]"
    assert result.frame["value"].dtype == "float64"


def test_multiple_fields_become_several_metrics() -> None:
    result = parse(f"cpu,host=a usage_user=1.5,usage_system=2,usage_idle=96.5 {T0_NS}")
    assert rows(result) == [
        ("cpu_usage_user", {"host": "a"}, T0, 1.5),
        ("cpu_usage_system", {"host": "a"}, T0, 2.0),
        ("cpu_usage_idle", {"host": "a"}, T0, 96.5),
    ]


def test_value_field_is_named_after_the_measurement() -> None:
    result = parse(f"temperature,room=kitchen value=21.5,value_max=23 {T0_NS}")
    assert [m for m, *_ in rows(result)] == ["temperature", "temperature_value_max"]


def test_tags_become_labels() -> None:
    result = parse(f"disk,host=db1,device=sda,mount=/var/lib used=0.75 {T0_NS}")
    assert result.frame["labels"].tolist() == [
        {"host": "db1", "device": "sda", "mount": "/var/lib"}
    ]


def test_no_tags_gives_empty_labels() -> None:
    assert rows(parse(f"uptime value=3600 {T0_NS}")) == [("uptime", {}, T0, 3600.0)]


def test_escapes_round_trip_to_exact_strings() -> None:
    line = (
        r"my\ measure\,ment,tag\ key\,with\=eq=val\ with\,comma\=eq,plain=x"
        r" field\ key\,a\=b=1.25 "
        f"{T0_NS}"
    )
    result = parse(line)
    assert result.rejected == []
    assert rows(result) == [
        (
            "my measure,ment_field key,a=b",
            {"tag key,with=eq": "val with,comma=eq", "plain": "x"},
            T0,
            1.25,
        )
    ]


def test_backslashes() -> None:
    # As InfluxDB parses them: a backslash escapes only the characters that need it (",", " ",
    # and "=" outside the measurement); before anything else, a second backslash included, it
    # is a literal backslash. Two backslashes and a space are a backslash and an escaped space.
    text = "\n".join(
        [
            r"paths,dir=C:\Windows\System32 value=1 1",
            r"cpu,regions=\\ east value=2 2",
            r"cpu,regions=east\\  value=3 3",
            r"meas\=x value=4 4",
            r"cpu,reg\\=ion=east value=5 5",
            r"cpu,regions=\\,\,\=east value=6 6",
            r"cpu,regions=eas\t value=7 7",
        ]
    )
    result = parse(text, precision="s")
    assert result.rejected == []
    assert result.frame["labels"].tolist() == [
        {"dir": "C:\\Windows\\System32"},
        {"regions": "\\ east"},
        {"regions": "east\\ "},
        {},
        {"reg\\=ion": "east"},
        {"regions": "\\,,=east"},
        {"regions": "eas\\t"},
    ]
    assert result.frame["metric"].tolist()[3] == "meas\\=x"
    assert result.frame["value"].tolist() == [1, 2, 3, 4, 5, 6, 7]


def test_unescaped_space_in_tag_value_rejects_only_that_line() -> None:
    text = "\n".join(
        [
            f"cpu,host=server01 usage=1 {T0_NS}",
            f"cpu,host=my server usage=2 {T0_NS}",
            f"cpu,host=my server=1 usage=3 {T0_NS}",
            f"cpu,host=server02 usage=4 {T0_NS}",
        ]
    )
    result = parse(text)
    assert result.frame["value"].tolist() == [1.0, 4.0]
    assert result.rejected == [
        ({"line": f"cpu,host=my server usage=2 {T0_NS}", "line_no": 2}, "malformed_line"),
        ({"line": f"cpu,host=my server=1 usage=3 {T0_NS}", "line_no": 3}, "malformed_line"),
    ]


@pytest.mark.parametrize(
    "line",
    [
        "cpu",
        "cpu,host=a",
        "cpu ",
        "cpu,host=a ",
        "cpu value=",
        "cpu value",
        "cpu =1",
        "cpu value=1,",
        "cpu value=1,,other=2",
        ",host=a value=1",
        "cpu,host= value=1",
        "cpu,=a value=1",
        "cpu,host value=1",
        "cpu,host=a=b value=1",
        "cpu,host=a,host=b value=1",
        "cpu value=1 123 456",
        'cpu s="unterminated',
        'cpu s="done"x=1',
        "cpu value=1.2.3",
        "cpu value=12x",
        "cpu value=1_000",
        "cpu value=+1",
        "cpu value=0x10",
        "cpu value=1.5i",
        "cpu value=-7u",
        "cpu value=yes",
        r"cpu\ ,host=a\ value=1",
    ],
)
def test_malformed_lines(line: str) -> None:
    result = parse(f"{line}\nok value=1 1")
    assert result.rejected == [({"line": line, "line_no": 1}, "malformed_line")]
    assert result.frame["metric"].tolist() == ["ok"]


@pytest.mark.parametrize("token", ["NaN", "nan", "inf", "-Inf", "+Inf", "1e999", "-1e400"])
def test_non_finite_field_values_reject_the_line(token: str) -> None:
    # Line protocol has no NaN or infinity literal, and a float overflowing to infinity is out
    # of range: the whole line is malformed (also its valid fields are not kept).
    result = parse(f"cpu a=1,b={token} {T0_NS}")
    assert result.frame.empty
    assert result.rejected == [
        ({"line": f"cpu a=1,b={token} {T0_NS}", "line_no": 1}, "malformed_line")
    ]


def test_string_and_boolean_fields_are_skipped_and_counted() -> None:
    text = "\n".join(
        [
            'svc,host=a up=t,status="running, ok = \\"yes\\" \\\\",restarts=3i,healthy=FALSE 1',
            'svc,host=b message="only a string field, with spaces" 2',
            "svc,host=c a=true,b=True,c=TRUE,d=f,e=F,f=false,g=False 3",
        ]
    )
    result = parse(text, precision="s")
    assert result.rejected == []
    assert rows(result) == [
        ("svc_restarts", {"host": "a"}, pd.Timestamp(1, unit="s", tz="UTC"), 3.0),
    ]
    assert result.skipped_fields == {"string": 2, "boolean": 9}


def test_skipped_fields_of_a_rejected_line_are_not_counted() -> None:
    result = parse('svc up=t,msg="x",bad=NaN 1')
    assert len(result.rejected) == 1
    assert result.skipped_fields == {"string": 0, "boolean": 0}


def test_integer_and_unsigned_fields() -> None:
    text = f"net rx=12i,tx=7u,drift=-5i,big=18446744073709551615u {T0_NS}"
    result = parse(text)
    assert result.frame["value"].tolist() == [12.0, 7.0, -5.0, 18446744073709551615.0]
    assert result.frame["metric"].tolist() == ["net_rx", "net_tx", "net_drift", "net_big"]


@pytest.mark.parametrize(
    "token", ["9223372036854775808i", "-9223372036854775809i", "18446744073709551616u"]
)
def test_integers_out_of_range_reject_the_line(token: str) -> None:
    result = parse(f"net rx={token} 1")
    assert [reason for _, reason in result.rejected] == ["malformed_line"]


@pytest.mark.parametrize(
    ("precision", "stamp"),
    [
        ("s", "1700000000"),
        ("ms", "1700000000000"),
        ("us", "1700000000000000"),
        ("ns", "1700000000000000000"),
    ],
)
def test_precisions_give_the_same_instant(precision: str, stamp: str) -> None:
    result = parse(f"cpu value=1 {stamp}", precision=precision)
    assert result.frame["ts"].tolist() == [pd.Timestamp("2023-11-14T22:13:20Z")]


def test_nanoseconds_are_floored_to_microseconds() -> None:
    result = parse("cpu value=1 1999\ncpu value=2 -1")
    assert result.frame["ts"].tolist() == [
        pd.Timestamp(1, unit="us", tz="UTC"),
        pd.Timestamp(-1, unit="us", tz="UTC"),
    ]


def test_unknown_precision_raises() -> None:
    with pytest.raises(ValueError, match="precision"):
        parse("cpu value=1", precision="h")


def test_missing_timestamp_uses_now() -> None:
    result = parse("cpu,host=a value=1\ncpu,host=b value=2 \ncpu,host=c value=3  ")
    assert result.frame["ts"].tolist() == [pd.Timestamp(NOW)] * 3


def test_missing_timestamp_defaults_to_current_time() -> None:
    before = datetime.now(UTC)
    result = parse_line_protocol("cpu value=1")
    after = datetime.now(UTC)
    stamp = result.frame["ts"].iloc[0]
    assert pd.Timestamp(before).floor("us") <= stamp <= pd.Timestamp(after)


def test_crlf_and_bom() -> None:
    text = f"\ufeffcpu,host=a value=1 {T0_NS}\r\n# comment\r\n\r\nmem,host=a value=2 {T0_NS}\r\n"
    result = parse(text)
    assert result.rejected == []
    assert rows(result) == [
        ("cpu", {"host": "a"}, T0, 1.0),
        ("mem", {"host": "a"}, T0, 2.0),
    ]


def test_bom_before_a_comment() -> None:
    result = parse("\ufeff# written by telegraf\ncpu value=1 1")
    assert result.rejected == []
    assert result.frame["metric"].tolist() == ["cpu"]


def test_comments_and_blank_lines_are_ignored_and_line_numbers_kept() -> None:
    text = "\n".join(
        [
            "# header",
            "",
            "   ",
            "  # indented comment",
            "cpu value=1 1",
            "\t",
            "cpu value=oops 2",
        ]
    )
    result = parse(text)
    assert result.frame["value"].tolist() == [1.0]
    assert result.rejected == [({"line": "cpu value=oops 2", "line_no": 7}, "malformed_line")]


def test_extra_spaces_between_sections_are_tolerated() -> None:
    result = parse("  cpu,host=a   value=1    5  ", precision="s")
    assert rows(result) == [("cpu", {"host": "a"}, pd.Timestamp(5, unit="s", tz="UTC"), 1.0)]


def test_escaped_and_plain_lines_agree() -> None:
    # the same series written plainly (fast path) and with a harmless literal backslash elsewhere
    plain = parse('cpu,host=a,region=eu x=1.5,y=2i,s="str",b=t 1', precision="s")
    escaped = parse(r'cpu,host=a,region=eu x=1.5,y=2i,s="st\\r",b=t 1', precision="s")
    assert rows(plain) == rows(escaped)
    assert plain.skipped_fields == escaped.skipped_fields == {"string": 1, "boolean": 1}


@pytest.mark.parametrize("stamp", ["12.5", "abc", "1e9", "+5", "٣"])
def test_invalid_timestamp(stamp: str) -> None:
    result = parse(f"cpu value=1 {stamp}")
    assert result.rejected == [
        ({"line": f"cpu value=1 {stamp}", "line_no": 1}, "invalid_timestamp")
    ]


def test_out_of_range_timestamps_pass_through_to_the_storage_layer() -> None:
    text = "\n".join(
        [
            "cpu value=1 1700000000",
            "cpu value=2 -100",  # 1969: representable, storage rejects it
            "cpu value=3 10000000000",  # year 2286: representable, storage rejects it
            "cpu value=4 9223372036854775807",  # int64 seconds: not representable in µs
            "cpu value=5 99999999999999999999999999",
        ]
    )
    result = parse(text, precision="s")
    assert result.frame["value"].tolist() == [1.0, 2.0, 3.0]
    assert result.frame["ts"].iloc[2].year == 2286
    assert [(raw["line_no"], reason) for raw, reason in result.rejected] == [
        (4, "timestamp_out_of_range"),
        (5, "timestamp_out_of_range"),
    ]
    batch = prepare(result.frame)
    assert sorted((raw["value"], reason) for raw, reason in batch.rejected) == [
        (2.0, "timestamp_out_of_range"),
        (3.0, "timestamp_out_of_range"),
    ]
    assert batch.values.tolist() == [1.0]


def test_extreme_nanosecond_timestamps_do_not_crash() -> None:
    result = parse("cpu value=1 9223372036854775807\ncpu value=2 -9223372036854775808")
    assert result.rejected == []
    assert result.frame["ts"].iloc[0] == pd.Timestamp("2262-04-11T23:47:16.854775Z")


def test_frame_is_accepted_by_the_storage_layer() -> None:
    text = "\n".join(
        f"cpu,host=h{i % 3} user={i}.5,system={i}i {T0_NS + i * 10**9}" for i in range(9)
    )
    batch = prepare(parse(text).frame)
    assert batch.rejected == []
    assert len(batch.series) == 6  # 2 metrics x 3 hosts
    assert len(batch.values) == 18


def test_empty_input() -> None:
    result = parse("")
    assert result.frame.empty
    assert list(result.frame.columns) == ["metric", "labels", "ts", "value"]
    assert str(result.frame["ts"].dtype) == "datetime64[us, UTC]"
    assert result.frame["value"].dtype == "float64"


def test_float_syntax_variants() -> None:
    result = parse("m a=1,b=-3,c=1.,d=.5,e=-.5,f=1e3,g=1.5E-3,h=2e+2,i=0 1")
    assert result.rejected == []
    values = result.frame["value"].tolist()
    assert values == [1.0, -3.0, 1.0, 0.5, -0.5, 1000.0, 0.0015, 200.0, 0.0]
    assert all(math.isfinite(v) for v in values)

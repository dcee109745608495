"""The parameter schemas `serve` registers: each optional parameter a plain input on the UI's
custom-run form (no "or null" branch, which the form showed as `Property is type "None"`),
and still validated by Prefect as before (null, omitted or a value of the type)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.utilities.callables import parameter_schema
from prefect.utilities.schema_tools.validation import validate

from deployments.forms import form_schema
from deployments.serve import build_deployments
from metricmill.settings import load_settings
from tests.settings_env import isolate_settings


def _flow_parameters(
    required: str, optional: str | None = None, count: int | None = None, tag: str | None = "x"
) -> None:
    """A flow function's signature.

    Args:
        required: Needed.
        optional: May be left out.
        count: A number, or nothing.
        tag: Has a default that is not None.
    """


def test_optional_parameters_become_plain_inputs_and_accept_null() -> None:
    original = parameter_schema(_flow_parameters)
    schema = form_schema(original).model_dump_for_openapi()
    props = schema["properties"]
    assert props["optional"] == {
        "type": "string",
        "title": "optional",
        "description": "May be left out.",
        "position": 1,
    }
    assert props["count"]["type"] == "integer" and "default" not in props["count"]
    # a default other than None is kept, and with it Prefect's own description
    assert props["tag"] == original.properties["tag"]
    assert props["required"] == original.properties["required"]
    assert schema["required"] == ["required"]
    assert validate({"required": "r"}, schema) == []
    assert validate({"required": "r", "optional": None, "count": None}, schema) == []
    assert validate({"required": "r", "optional": "o", "count": 3}, schema) == []
    bad = validate({"required": "r", "optional": 3, "count": "three"}, schema)
    assert sorted(e.message for e in bad) == [
        "'three' is not valid under any of the given schemas",
        "3 is not valid under any of the given schemas",
    ]
    assert original.properties["optional"]["anyOf"]  # the input was not changed


def test_every_served_deployment_has_no_null_branch_in_its_form() -> None:
    deployments, _ = build_deployments()
    assert {d.flow_name for d in deployments} >= {"ingest", "rollup", "detect", "baseline"}
    for deployment in deployments:
        schema = deployment._parameter_openapi_schema.model_dump_for_openapi()
        for name, prop in schema["properties"].items():
            branches: list[dict[str, Any]] = prop.get("anyOf", [])
            assert {"type": "null"} not in branches, (deployment.flow_name, name, prop)
            assert prop.get("type") != "null", (deployment.flow_name, name)
        # what a run started from the form with every field left empty sends: accepted
        assert validate({}, schema) == [], deployment.flow_name
    detect = next(d for d in deployments if d.flow_name == "detect")
    series = detect._parameter_openapi_schema.properties["series"]
    assert series["type"] == "string" and "default" not in series
    assert "label selector" in series["description"]


def test_fields_the_form_left_empty_mean_not_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    isolate_settings(monkeypatch, home=tmp_path)
    settings = load_settings(home="", database_url="  ")
    assert settings.home == tmp_path  # METRICMILL_HOME, not the working directory
    assert settings.database_url == load_settings().database_url

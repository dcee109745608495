"""Parameter schemas the Prefect UI's custom-run form renders cleanly.

Prefect describes an optional parameter (`home: str | None = None`) as
`{"anyOf": [{"type": "string"}, {"type": "null"}], "default": null}`. The UI's form draws an
`anyOf` as a choice of branches and opens the one the default matches, the null branch, whose
whole form is the text `Property is type "None"`: that under every optional field, and the
real input one click away. `form_schema` gives such a property its non-null branch alone, with
no default: the form then shows a plain input, left empty means "not given" (the flow's own
default, None), and the server still accepts an explicit null (Prefect's parameter validation
lets a property that is neither required nor has a default be null).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Any

from prefect.utilities.callables import ParameterSchema


def _without_null_branch(prop: dict[str, Any]) -> dict[str, Any]:
    branches = prop.get("anyOf")
    if not isinstance(branches, list) or len(branches) != 2:
        return prop
    kept = [b for b in branches if b != {"type": "null"}]
    if len(kept) != 1 or "default" not in prop or prop["default"] is not None:
        return prop  # not "X or null, default null": leave it as Prefect made it
    rest = {k: v for k, v in prop.items() if k not in {"anyOf", "default"}}
    return {**kept[0], **rest}


def form_schema(schema: ParameterSchema) -> ParameterSchema:
    """A copy of `schema` with each optional `X | None = None` parameter described as `X`."""
    properties = {name: _without_null_branch(p) for name, p in schema.properties.items()}
    return schema.model_copy(update={"properties": deepcopy(properties)})

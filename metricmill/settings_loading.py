"""Where settings come from and how reading them fails: the TOML file's place, Prefect Secret
blocks named by a setting, and one clear SettingsError for whatever does not validate (or every
invalid field at its default, for `metricmill doctor`). Nothing here knows the fields."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import pydantic_settings
from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

from metricmill.errors import SettingsError

S = TypeVar("S", bound=BaseSettings)


def config_file_path(home: str | Path | None = None) -> Path | None:
    """METRICMILL_CONFIG if set (it must exist), else HOME/metricmill.toml when present."""
    explicit = os.environ.get("METRICMILL_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise SettingsError(f"METRICMILL_CONFIG points at {path}, which is not a file")
        return path
    home_dir = Path(home or os.environ.get("METRICMILL_HOME", "~/.metricmill")).expanduser()
    candidate = home_dir / "metricmill.toml"
    return candidate if candidate.is_file() else None


def _secret_block(name: str) -> str:
    """The value of a Prefect Secret block, "" when it holds none (Prefect is imported only
    when a block is named). ValueError when it cannot be loaded."""
    from prefect.blocks.system import Secret

    try:
        block: Any = Secret.load(name, _sync=True)  # type: ignore[call-arg]
        value = block.get()
    except Exception as exc:  # missing block, unreachable API: a setting that cannot be used
        raise ValueError(f"cannot load the Prefect Secret block {name!r}: {exc}") from None
    return "" if value is None else str(value)


def secret_setting(value: SecretStr | None, block: str | None) -> str | None:
    """A secret setting's value, else that of the Prefect Secret block the setting beside it
    names; None when neither gives one. ValueError when the block cannot be loaded."""
    if value is not None and value.get_secret_value():
        return value.get_secret_value()
    return (_secret_block(block) or None) if block else None


def _blank(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def load(cls: type[S], overrides: dict[str, Any]) -> S:
    """`cls` from overrides, the environment and the TOML file, or one SettingsError naming
    every invalid field as its METRICMILL_* variable (never the value given).

    An override that is None or a blank string is not given (a field a custom-run form in the
    Prefect UI left empty arrives as ""): the environment, the file or the default applies."""
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None and not _blank(v)})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(part) for part in err["loc"])
            message = err["msg"].removeprefix("Value error, ")
            # err["msg"] never contains the input value; URLs are masked by the validator.
            problems.append(f"METRICMILL_{field.upper()}: {message}" if field else message)
        raise SettingsError("invalid settings: " + "; ".join(problems)) from None
    except pydantic_settings.SettingsError as exc:
        # A list or dict setting that is not JSON: pydantic-settings names the field in quotes.
        text = str(exc)
        field = text.split('"')[1] if text.count('"') >= 2 else "?"
        raise SettingsError(
            f"invalid settings: METRICMILL_{field.upper()}: not valid JSON "
            '(a list is written ["a", "b"], a mapping {"key": "value"})'
        ) from None
    except tomllib.TOMLDecodeError as exc:
        where = config_file_path(overrides.get("home"))
        raise SettingsError(f"invalid settings: {where}: not TOML: {exc}") from None


def load_past_errors(cls: type[S], overrides: dict[str, Any]) -> tuple[S | None, list[str]]:
    """`cls` with every invalid field at its default, and the names of those fields (None,
    names when even that fails: a TOML file that does not parse, a cross-field rule). Variables
    that do not parse at all are out of the environment while it tries, and back after."""
    given = {k: v for k, v in overrides.items() if v is not None}
    replaced: dict[str, Any] = {}
    hidden: dict[str, str] = {}  # variables that do not even parse, out of the environment
    try:
        for _ in range(2 * len(cls.model_fields) + 1):
            try:
                return cls(**(given | replaced)), sorted(replaced)
            except ValidationError as exc:
                fields = {str(err["loc"][0]) for err in exc.errors() if err["loc"]}
            except pydantic_settings.SettingsError as exc:
                text = str(exc)
                fields = {text.split('"')[1]} if text.count('"') >= 2 else set()
                for name in list(os.environ):
                    if name.upper() in {f"METRICMILL_{f.upper()}" for f in fields}:
                        hidden[name] = os.environ.pop(name)
            except tomllib.TOMLDecodeError:
                return None, sorted(replaced)
            fields = {f for f in fields if f in cls.model_fields and f not in replaced}
            if not fields:
                return None, sorted(replaced)
            for name in fields:
                replaced[name] = cls.model_fields[name].get_default(call_default_factory=True)
        return None, sorted(replaced)
    finally:
        os.environ.update(hidden)

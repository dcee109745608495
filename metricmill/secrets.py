"""Passwords never leave: one masking function for anything printed, logged or stored, and the
split of a database URL into a password-free part (safe as a flow parameter) and its password.

`redact` hides, wherever they appear in a text:
- URL userinfo passwords (`postgresql://user:PW@host/db`, the userinfo running to the last `@`
  so `postgresql://u:Pa@ss/wo#rd@h/db` hides all of `Pa@ss/wo#rd`);
- `password=` in a URL query (`?password=PW`, `&password=PW`) and in a keyword DSN
  (`host=h password=PW`, `password='a b'`);
- every password metricmill knows of (the database password from the settings or the
  environment), wherever it is echoed, as in a driver's error text.
"""

from __future__ import annotations

import logging
import os
import re
import traceback
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, unquote

MASK = "***"
PASSWORD_ENV = "METRICMILL_DATABASE_PASSWORD"

# scheme://userinfo@ — the userinfo greedy up to the last "@" before a blank or a quote.
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s'\"]*)@")
_QUERY_PASSWORD = re.compile(r"(?P<key>[?&;]password=)[^&#\s'\"]*", re.IGNORECASE)
_KEYWORD_PASSWORD = re.compile(
    r"(?P<key>\bpassword\s*=\s*)(?:'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&]*)",
    re.IGNORECASE,
)

# Passwords this process has seen (set by `remember`), hidden even where no syntax shows them.
_known: set[str] = set()


def remember(secret: str | None) -> None:
    """Hide this value from everything `redact` masks from now on (a password, a token)."""
    if secret and len(secret) >= 3:  # shorter would mask ordinary words and digits
        _known.add(secret)
        _known.add(quote(secret, safe=""))


def _mask_userinfo(match: re.Match[str]) -> str:
    userinfo = match.group("userinfo")
    user, colon, _ = userinfo.partition(":")
    if not colon:
        return match.group(0)  # no password in it
    return f"{match.group('scheme')}{user}:{MASK}@"


def redact(text: str, extra: Iterable[str | None] = ()) -> str:
    """The text with every password it may hold replaced by ***."""
    if not text:
        return text
    secrets = set(_known)
    env_password = os.environ.get(PASSWORD_ENV)
    for secret in (env_password, *extra):
        if secret and len(secret) >= 3:
            secrets.update((secret, quote(secret, safe="")))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_USERINFO.sub(_mask_userinfo, text)
    text = _QUERY_PASSWORD.sub(lambda m: m.group("key") + MASK, text)
    return _KEYWORD_PASSWORD.sub(lambda m: m.group("key") + MASK, text)


def _userinfo_end(rest: str) -> int:
    """Index of the `@` ending the userinfo of a URL's part after `scheme://`, or -1.

    The last `@` (a host never holds one, a password may), unless the query holds one."""
    at = rest.rfind("@")
    query = rest.find("?")
    if 0 <= query < at:
        before = rest.rfind("@", 0, query)
        if before >= 0:
            at = before
    return at


def quote_password(url: str) -> str:
    """The URL with its password percent-encoded, so a password holding `@`, `/`, `#`, `?` or
    a blank is read as a password, not as the host or the path."""
    scheme, sep, rest = url.partition("://")
    at = _userinfo_end(rest) if sep else -1
    if at < 0:
        return url
    user, colon, password = rest[:at].partition(":")
    if not colon:
        return url
    return f"{scheme}://{user}:{quote(unquote(password), safe='')}@{rest[at + 1 :]}"


def split_password(url: str) -> tuple[str, str | None]:
    """(the URL without its password, the password or None): the first is safe to store as a
    flow parameter; the second travels through the environment only."""
    scheme, sep, rest = url.partition("://")
    at = _userinfo_end(rest) if sep else -1
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon:
            return f"{scheme}://{user}@{rest[at + 1 :]}", unquote(password)
    match = re.search(r"[?&]password=([^&#]*)", url, re.IGNORECASE)
    if match:
        at = match.start()
        stripped = url[:at] + url[match.end() :]
        if match.group(0)[0] == "?" and stripped[at : at + 1] == "&":
            stripped = stripped[:at] + "?" + stripped[at + 1 :]  # the next parameter leads
        return stripped, unquote(match.group(1))
    return url, None


def _redacting_factory(factory: Any) -> Any:
    def make(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not fit its format: leave it to logging
            return record
        cleaned = redact(message)
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = redact(text)
        return record

    make.redacting = True  # type: ignore[attr-defined]
    return make


def install_log_redaction() -> None:
    """Every log record of this process (Prefect's, shipped to its API, included) is redacted
    when it is made: its message and its traceback."""
    factory = logging.getLogRecordFactory()
    if not getattr(factory, "redacting", False):
        logging.setLogRecordFactory(_redacting_factory(factory))

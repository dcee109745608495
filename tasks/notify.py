"""Alert messages through Prefect notification blocks, with truthful outcomes and retries.

Channels are named in settings as "block-type-slug/block-name" (what `prefect block ls` shows):
`slack-webhook/…`, `ms-teams-webhook/…`, `custom-webhook/…` (CustomWebhookNotificationBlock)
and `email-server-credentials/…` (prefect-email; recipients from `notify_email_to`).

Apprise-backed blocks (Slack, Teams) report neither the HTTP status nor timeouts of a send, so
for those two we post the message to the block's webhook URL ourselves and read the status. A
5xx, 429, timeout or dropped connection is transient (retried with exponential backoff); any
other 4xx is permanent (reported at once, never retried). SMTP is the other way round: 4xx
replies are transient, 5xx permanent.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

import httpx

from metricmill.errors import MetricmillError
from metricmill.settings import Settings

EMAIL_SLUG = "email-server-credentials"
_WEBHOOK_SLUGS = {"slack-webhook", "ms-teams-webhook"}


class NotificationConfigError(MetricmillError):
    """A notification channel named in settings cannot be used."""


class _Transient(Exception):
    """Worth another attempt: 5xx, 429, timeout, refused or dropped connection."""


class _Permanent(Exception):
    """Retrying cannot help: 4xx, a rejected recipient."""


@dataclass(frozen=True)
class Message:
    subject: str
    body: str


@dataclass(frozen=True)
class Delivery:
    """The outcome of one message on one channel: sent, failed (transient, retries exhausted)
    or rejected (permanent)."""

    key: Any  # what the caller sent it for (alert id and event)
    channel: str
    attempts: int
    outcome: str
    error: str | None


@dataclass
class Channel:
    """One loaded notification block."""

    ref: str
    block: Any
    email_to: tuple[str, ...] = ()
    email_from: str | None = None

    @property
    def slug(self) -> str:
        return self.ref.partition("/")[0]

    def send(self, message: Message, timeout: float) -> None:
        if self.slug == EMAIL_SLUG:
            self._send_email(message, timeout)
        elif self.slug in _WEBHOOK_SLUGS:
            self._post(self.block.url.get_secret_value(), self._payload(message), timeout)
        else:
            self._send_through_block(message)

    def _payload(self, message: Message) -> dict[str, Any]:
        if self.slug == "slack-webhook":
            return {"text": f"*{message.subject}*\n{message.body}"}
        card = {
            "type": "AdaptiveCard",
            "version": "1.4",
            "body": [
                {"type": "TextBlock", "text": message.subject, "weight": "bolder", "wrap": True},
                {"type": "TextBlock", "text": message.body, "wrap": True},
            ],
        }
        return {
            "type": "message",
            "attachments": [
                {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
            ],
        }

    @staticmethod
    def _post(url: str, payload: dict[str, Any], timeout: float) -> None:
        try:
            response = httpx.post(url, json=payload, timeout=timeout)
        except httpx.TimeoutException:
            raise _Transient(f"timed out after {timeout:g}s") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed: {exc}") from None
        _check_status(response)

    def _send_through_block(self, message: Message) -> None:
        try:
            self.block.notify(message.body, subject=message.subject)
        except httpx.HTTPStatusError as exc:
            _check_status(exc.response)
        except httpx.TimeoutException:
            timeout = getattr(self.block, "timeout", None)
            raise _Transient(f"timed out after {timeout}s" if timeout else "timed out") from None
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed: {exc}") from None
        except Exception as exc:  # apprise-backed blocks: the status is unknown
            raise _Transient(f"{type(exc).__name__}: {exc}") from None

    def _send_email(self, message: Message, timeout: float) -> None:
        email = EmailMessage()
        email["Subject"] = message.subject
        email["From"] = self.email_from or self.block.username or "metricmill@localhost"
        email["To"] = ", ".join(self.email_to)
        email.set_content(message.body)
        try:
            with self.block.get_server() as server:
                if server.sock is not None:
                    server.sock.settimeout(timeout)
                server.send_message(email)
        except smtplib.SMTPRecipientsRefused as exc:
            raise _Permanent(f"recipients refused: {sorted(exc.recipients)}") from None
        except smtplib.SMTPResponseException as exc:
            text = f"SMTP {exc.smtp_code}: {exc.smtp_error!r}"
            raise (_Permanent(text) if exc.smtp_code >= 500 else _Transient(text)) from None
        except (smtplib.SMTPException, OSError) as exc:
            raise _Transient(f"{type(exc).__name__}: {exc}") from None


def _check_status(response: httpx.Response) -> None:
    code = response.status_code
    if code < 400:
        return
    text = f"HTTP {code}: {response.text[:200]}"
    if code >= 500 or code == 429:
        raise _Transient(text)
    raise _Permanent(text)


def load_channels(settings: Settings, refs: Sequence[str] | None = None) -> list[Channel]:
    """Load the notification blocks named in settings (or `refs`); one clear error if any is
    missing or unusable, so a run fails before it changes anything."""
    import prefect.blocks.notifications  # noqa: F401 - registers the block classes
    import prefect_email  # noqa: F401
    from prefect.blocks.core import Block

    channels = []
    for ref in settings.notification_blocks if refs is None else refs:
        slug, _, name = ref.partition("/")
        if not slug or not name:
            raise NotificationConfigError(
                f"notification channel {ref!r} must be 'block-type-slug/block-name', "
                "e.g. 'slack-webhook/ops'"
            )
        try:
            block = Block.load(ref)
        except Exception as exc:  # ValueError / ObjectNotFound / unknown block type
            raise NotificationConfigError(
                f"notification block {ref!r} cannot be loaded ({str(exc).splitlines()[0]}): "
                "register it with Prefect or remove it from notification_blocks"
            ) from None
        if slug == EMAIL_SLUG and not settings.notify_email_to:
            raise NotificationConfigError(
                f"notification block {ref!r} sends email but notify_email_to is empty"
            )
        if not (slug in _WEBHOOK_SLUGS or slug == EMAIL_SLUG or hasattr(block, "notify")):
            raise NotificationConfigError(
                f"block {ref!r} is neither a notification block nor email server credentials"
            )
        channels.append(
            Channel(
                ref=ref,
                block=block,
                email_to=tuple(settings.notify_email_to),
                email_from=settings.notify_email_from,
            )
        )
    return channels


def _deliver_one(channel: Channel, key: Any, message: Message, settings: Settings) -> Delivery:
    attempts, last_error = 0, ""
    while True:
        attempts += 1
        try:
            channel.send(message, settings.notify_timeout_seconds)
            return Delivery(key, channel.ref, attempts, "sent", None)
        except _Permanent as exc:
            return Delivery(key, channel.ref, attempts, "rejected", str(exc))
        except _Transient as exc:
            last_error = str(exc)
        if attempts > settings.notify_retries:
            return Delivery(key, channel.ref, attempts, "failed", last_error)
        time.sleep(settings.notify_backoff_seconds * 2 ** (attempts - 1))


def deliver(
    channels: Sequence[Channel],
    messages: Sequence[tuple[Any, Message, Collection[str] | None]],
    settings: Settings,
) -> list[Delivery]:
    """Send each message on the channels it names (None: all); channels run side by side, so
    a slow or failing one delays nobody else. Delivery problems come back as outcomes."""
    if not channels or not messages:
        return []

    def run(channel: Channel) -> list[Delivery]:
        return [
            _deliver_one(channel, key, message, settings)
            for key, message, only in messages
            if only is None or channel.ref in only
        ]

    with ThreadPoolExecutor(max_workers=len(channels)) as pool:
        results = list(pool.map(run, channels))
    return [delivery for per_channel in results for delivery in per_channel]


def send_test(settings: Settings, ref: str) -> Delivery:
    """Send a test message through one channel (it need not be listed in settings)."""
    (channel,) = load_channels(settings, [ref])
    message = Message(
        subject="[metricmill] test notification",
        body=f"This is a test message from metricmill through {ref}.",
    )
    return _deliver_one(channel, "test", message, settings)

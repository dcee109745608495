"""`metricmill notify test`: send a test message through every configured channel
(Prefect notification blocks), or one named channel."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from metricmill.cli.common import (
    echo,
    settings_from,
)
from metricmill.errors import MetricmillError

notify_app = typer.Typer(help="Notification channels (Prefect blocks).", no_args_is_help=True)


@notify_app.command("test")
def notify_test(
    ctx: typer.Context,
    channel: Annotated[
        str | None,
        typer.Argument(help="Block, e.g. slack-webhook/ops; default: every one configured."),
    ] = None,
) -> None:
    """Send a test message through one notification block, or through every configured one
    (notification_blocks) side by side; exit 1 if any could not deliver it."""
    from tasks.notify import Message, deliver, load_channels

    settings = settings_from(ctx)
    refs = [channel] if channel else list(settings.notification_blocks)
    if not refs:
        raise MetricmillError(
            "no notification block configured (notification_blocks): name one, "
            "e.g. `metricmill notify test slack-webhook/ops`"
        )
    channels = load_channels(settings, refs)
    # Loading a block queues an event; at exit Prefect's EventsWorker sends it and warns that
    # it is "still processing items". The event still goes; the warning is noise here.
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)
    messages = [
        (
            ref,
            Message(
                subject="[metricmill] test notification",
                body=f"This is a test message from metricmill through {ref}.",
            ),
            {ref},
        )
        for ref in refs
    ]
    failed = 0
    for delivery in deliver(channels, messages, settings):
        if delivery.outcome == "sent":
            echo(f"{delivery.channel}: test message sent ({delivery.attempts} attempt(s))")
        else:
            failed += 1
            echo(
                f"error: {delivery.channel}: {delivery.outcome} after {delivery.attempts} "
                f"attempt(s): "
                f"{delivery.error}",
                err=True,
            )
    if failed:
        raise typer.Exit(1)

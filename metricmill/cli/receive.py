"""`metricmill receive`: serve the push receiver (metricmill/receiver.py) until stopped."""

from __future__ import annotations

from typing import Annotated

import typer

from metricmill.cli.common import out, settings_from
from metricmill.settings import Settings

receive_app: typer.Typer = typer.Typer()


@receive_app.command()
def receive(
    ctx: typer.Context,
    host: Annotated[
        str | None,
        typer.Option(help="Address to listen on (METRICMILL_RECEIVE_HOST, 127.0.0.1)."),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(help="TCP port (METRICMILL_RECEIVE_PORT, 9201)."),
    ] = None,
) -> None:
    """Take remote write, Influx line protocol and OTLP pushes into the landing directory."""
    from metricmill.receiver import serve

    settings = settings_from(ctx, receive_host=host, receive_port=port)
    console = out()

    def announce(url: str) -> None:
        auth = (
            "bearer token required"
            if (settings.receive_token or settings.receive_token_block)
            else "no token"
        )
        console.print(f"receiving on {url} ({auth}); landing in {settings.landing}")

    serve(settings, host=settings.receive_host, port=settings.receive_port, on_ready=announce)


def receiver_status(settings: Settings) -> str:
    """One line for `status`: the landing backlog against its limit, and whether a receiver
    answers on the configured address."""
    import httpx

    from storage.push_landing import landing_backlog

    backlog = landing_backlog(settings.landing)
    limit = settings.receive_max_backlog_bytes
    url = f"http://{settings.receive_host}:{settings.receive_port}"
    try:
        up = httpx.get(f"{url}/-/ready", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        up = False
    state = f"receiver at {url} answering" if up else f"no receiver answering at {url}"
    share = f"{100 * backlog.bytes / limit:.0f}%"
    return (
        f"{backlog.files} files, {backlog.bytes} bytes waiting in landing "
        f"({share} of receive_max_backlog_bytes); {state}"
    )

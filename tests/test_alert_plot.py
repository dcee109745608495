"""`metricmill alerts show ID --plot FILE.png`: the picture of an alert, and its band clipped at
0 for a series that never goes negative."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from metricmill.cli import app
from metricmill.settings import load_settings
from metricmill.types import datetime_to_us
from storage.alerts import open_alerts
from storage.store import Store
from tests.settings_env import isolate_settings


def make_alert(home: Path, metric: str, values: list[float], low: float, high: float) -> int:
    """A series of one point a minute ending now, and an alert on it since 30 minutes ago."""
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    samples = [
        {"metric": metric, "labels": {"host": "a"}, "ts": now - timedelta(minutes=len(values) - i),
         "value": v}
        for i, v in enumerate(values)
    ]  # fmt: skip
    with Store.open(settings=load_settings(home=home)) as store:
        store.write_samples(samples, source="test")
        series_id = int(store.series(metric)["series_id"].iloc[0])
        at = datetime_to_us(now - timedelta(minutes=30))
        detail = json.dumps({"metric": metric, "labels": {"host": "a"}})
        with store.backend.transaction():
            open_alerts(
                store.backend,
                [(f"fp-{metric}", "anomaly", series_id, "warning", at, at, values[-1],
                  (low + high) / 2, low, high, 0.9, detail, None)],
            )  # fmt: skip
        return int(store.backend.execute(
            "SELECT alert_id FROM alerts WHERE fingerprint = ?", (f"fp-{metric}",)
        )[0][0])  # fmt: skip


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    isolate_settings(monkeypatch, home=home)
    monkeypatch.setenv("COLUMNS", "200")
    return home


def test_plot_of_a_never_negative_series_with_the_band_clipped(home: Path, tmp_path: Path) -> None:
    values = [2.0 + (i % 5) * 0.5 for i in range(120)] + [40.0] * 30
    alert_id = make_alert(home, "cpu_usage_percent", values, low=-13.5, high=6.0)
    picture = tmp_path / "pictures" / "alert.png"
    result = CliRunner().invoke(app, ["alerts", "show", str(alert_id), "--plot", str(picture)])
    assert result.exit_code == 0, result.output
    assert "[0 .. 6]" in result.output  # the band as shown: not below 0
    assert f"picture: {picture} (150 points)" in result.output
    import matplotlib.image

    pixels = matplotlib.image.imread(picture)
    assert pixels.shape[:2] == (400, 1000)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[2])[::97]}) > 5  # not blank


def test_a_series_that_goes_negative_keeps_its_band(home: Path, tmp_path: Path) -> None:
    values = [-1.0 + (i % 3) for i in range(60)]
    alert_id = make_alert(home, "temperature_celsius", values, low=-4.5, high=3.0)
    result = CliRunner().invoke(app, ["alerts", "show", str(alert_id)])
    assert result.exit_code == 0, result.output
    assert "[-4.5 .. 3]" in result.output


def test_plot_wants_a_png_name(home: Path, tmp_path: Path) -> None:
    alert_id = make_alert(home, "cpu_usage_percent", [1.0, 2.0], low=0.5, high=1.5)
    result = CliRunner().invoke(
        app, ["alerts", "show", str(alert_id), "--plot", str(tmp_path / "a.jpg")]
    )
    assert result.exit_code == 1
    assert result.output.strip().startswith("error: --plot")  # before anything else
    assert not (tmp_path / "a.jpg").exists()

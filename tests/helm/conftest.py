"""Fixtures of the chart tests.

helm is installed by `make helm-tools` into .tools/bin; without it these tests fail (they
must run in CI), they do not skip.
"""

from __future__ import annotations

import pytest

from .chart import CHART, HELM, Chart, Manifests


@pytest.fixture(scope="session")
def chart() -> Chart:
    if not HELM.is_file():
        pytest.fail(f"helm is not installed at {HELM}: run `make helm-tools`", pytrace=False)
    return Chart(HELM, CHART)


@pytest.fixture(scope="session")
def default(chart: Chart) -> Manifests:
    """The chart rendered with its default values."""
    return chart.render()

"""Figure resolution: MEDTRUST_FIGURE_DPI sets it (the tests draw draft figures), bad values are refused."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medtrust.report import figures


def _width(path) -> int:
    with Image.open(path) as im:
        return im.size[0]


def test_dpi_setting_scales_every_saved_figure(tmp_path, monkeypatch):
    cov = np.linspace(0.1, 1, 10)
    curves = {"deterministic": (cov, 0.2 * cov)}
    widths = {}
    for dpi in (40, 110):
        monkeypatch.setenv(figures.DPI_ENV, str(dpi))
        widths[dpi] = _width(figures.plot_risk_coverage(curves, tmp_path / f"rc{dpi}.png"))
    assert widths[110] / widths[40] == pytest.approx(110 / 40, rel=0.1)
    monkeypatch.delenv(figures.DPI_ENV)
    assert figures.figure_dpi() == 110


@pytest.mark.parametrize("bad", ["abc", "0", "5000", "1.5"])
def test_bad_dpi_is_refused_naming_the_variable(monkeypatch, bad):
    monkeypatch.setenv(figures.DPI_ENV, bad)
    with pytest.raises(ValueError, match="MEDTRUST_FIGURE_DPI"):
        figures.figure_dpi()

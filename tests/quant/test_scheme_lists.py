"""The scheme lists derive from LAYOUTS: recipes accept exactly its schemes, and a scheme needs calibration
statistics exactly when its layout cannot quantize a linear without them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import quant
from quant.layouts import LAYOUTS, NEEDS_ACTIVATION_STATS, layout_for
from quant.recipe import SCHEMES, Recipe


def test_recipes_accept_the_layouts_schemes_and_nothing_else():
    assert SCHEMES == tuple(LAYOUTS)
    bundled = {yaml.safe_load(p.read_text())["scheme"] for p in (Path(quant.__file__).parent / "recipes").glob("*.yaml")}
    assert bundled == set(LAYOUTS)
    with pytest.raises(ValueError, match="not one of"):
        Recipe.from_dict({"scheme": "int4"})


@pytest.mark.parametrize("scheme", list(LAYOUTS))
def test_a_scheme_needs_statistics_when_its_layout_does(scheme):
    w = [torch.randn(32, 64, dtype=torch.bfloat16)]
    layout = layout_for(scheme)
    if scheme in NEEDS_ACTIVATION_STATS:
        with pytest.raises(ValueError, match="calibrated activation statistics"):
            list(layout.linear(["m"], w))
        assert list(layout.linear(["m"], w, [torch.tensor(3.0)]))
    else:
        assert list(layout.linear(["m"], w))

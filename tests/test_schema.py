"""One declaration of a site (manager/settings.py): the recipe loader and the board hold a site to the same
limits, and the sites.json the host writes is read by the board's own reader before it is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_manager import sites_json

from appliance import config, errors, sites
from appliance.manager import settings
from appliance.manager.errors import Error

pytestmark = pytest.mark.unit

# recipe key, sites.json key, the limit's name
KEYS = [("memory_mib", "memory", "memory"), ("vcpus", "vcpus", "vcpus"), ("deadline", "deadline", "deadline"),
        ("drain", "drain", "drain"), ("keep", "keep", "keep")]


@pytest.mark.parametrize("recipe_key, board_key, limit", KEYS)
def test_the_recipe_and_the_board_hold_a_site_to_the_same_limits(tmp_path: Path, recipe_key: str, board_key: str,
                                                                  limit: str):
    low, high = settings.SITE_LIMITS[limit]
    for value, ok in ((low, True), (high, True), (low - 1, False), (high + 1, False)):
        if limit == "drain" and value < 0:
            continue
        try:
            config.load("booth", sites=[{recipe_key: value}])
            recipe_ok = True
        except errors.RecipeError:
            recipe_ok = False
        p = tmp_path / "sites.json"
        p.write_text(json.dumps(sites_json(**{board_key: value})))
        try:
            settings.load(p)
            board_ok = True
        except Error:
            board_ok = False
        assert (recipe_ok, board_ok) == (ok, ok), (limit, value)


def test_the_host_writes_what_the_board_reads():
    rec = config.load("booth").recipe
    board = settings.parse(json.loads(sites.board_json(rec)), sites.BOARD_PATH)
    assert [s.name for s in board.sites.values()] == [s.name for s in rec.sites]
    assert {s.name: (s.memory, s.deadline, s.keep) for s in board.sites.values()} == {
        s.name: (s.memory_mib, s.deadline, s.keep) for s in rec.sites}

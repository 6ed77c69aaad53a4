# ruff: noqa: F811 - the tests take the namespace double's `board` fixture, imported from its module
"""ssh tier: `invoke deploy` and pull mode agree. A push to a site that follows a release channel is refused with the
board's line; with --force it is deployed and the site stops following (invoke status says so).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from sshd_fixtures import keygen, needs_sshd, start
from test_deploy import bundle, target
from test_pull_double import setup_channel
from test_switch_double import Board, board  # noqa: F401

from appliance import deploy as d
from appliance.errors import DeployError

pytestmark = [pytest.mark.ssh, needs_sshd,
              pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/git"), reason="needs root and git")]


def test_a_push_deploy_to_a_following_site_is_refused_unless_forced(board: Board, tmp_path: Path):
    board.version("1.0", "serve:page one")
    board.supervise("1.0")
    p = setup_channel(tmp_path, board)
    s = start(tmp_path / "sshd", keygen(tmp_path / "id_ed25519"))
    try:
        env = {k: v for k, v in board.env.items() if k.startswith(("APPLIANCE_", "XL_STANDIN_"))}
        s.manager({**env, "APPLIANCE_STAGING": str(board.tmp / "staging")}, board.dom0)
        g = bundle(tmp_path, "2.0", "page two")
        with pytest.raises(DeployError) as e:
            d.deploy(target(s), g)
        assert str(e.value) == (f"booth-test: site demo follows {p.channel.bare}@stable (pull mode): a push deploy is "
                                f"refused; give --force to deploy anyway (the site then stops following until "
                                f"`appliance-guest follow demo`)")
        assert os.readlink(board.tmp / "store/demo/current") == "1.0"
        text = d.status_text("booth-test", d.status(target(s)))
        assert f"booth-test demo: following {p.channel.bare}@stable; serving nothing it pulled; never checked" in text
        row = d.deploy(target(s), g, force=True)
        assert (row.ok, row.result, row.new) == (True, "deployed", "2.0")
        text = d.status_text("booth-test", d.status(target(s)))
        assert re.search(r"^booth-test demo: not following; serving nothing it pulled; last check \d+ s ago: stopped "
                         r"following: a push deploy with --force$", text, re.M), text
    finally:
        s.stop()

# ruff: noqa: F811 - the tests take the namespace double's `board` fixture, imported from its module
"""ssh tier: pull mode and OpenSSH. A push deploy to a site that follows a release channel is refused with the
board's line, and with --force it is deployed and the site stops following; a channel fetched over ssh (an sshd on
dom0's loopback) with the board's own key.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from sshd_fixtures import keygen, needs_sshd, start
from test_deploy import bundle, target
from test_pull_double import serving, setup_channel
from test_switch_double import Board, board, make_board  # noqa: F401

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
        text = d.status_table({"booth-test": d.status(target(s))})
        assert f"booth-test demo: following {p.channel.bare}@stable; serving nothing it pulled; never checked" in text
        row = d.deploy(target(s), g, force=True)
        assert (row.ok, row.result, row.new) == (True, "deployed", "2.0")
        text = d.status_table({"booth-test": d.status(target(s))})
        assert re.search(r"^booth-test demo: not following; serving nothing it pulled; last check \d+ s ago: stopped "
                         r"following: a push deploy with --force$", text, re.M), text
    finally:
        s.stop()


def test_a_channel_over_ssh_with_the_boards_own_key(tmp_path: Path):
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        p = setup_channel(tmp_path, b, url="ssh://root@127.0.0.1:1/nowhere.git")
        rc, out = p.run("status")
        key = tmp_path / "pull-key/id_ed25519"
        assert out["pull_key"] == key.with_suffix(".pub").read_text().strip(), "status makes and shows the key"
        assert (key.stat().st_mode & 0o777, key.parent.stat().st_mode & 0o777) == (0o600, 0o700)
        sshd = start(tmp_path / "sshd", key, netns=b.dom0)
        try:
            conf = json.loads((tmp_path / "pull.json").read_text())
            conf["sites"]["demo"]["url"] = f"ssh://root@127.0.0.1:{sshd.port}{p.channel.bare}"
            (tmp_path / "pull.json").write_text(json.dumps(conf))
            commit = p.channel.release(1, "2.0", "serve:page two")
            out = p.pull()
            assert out["result"] == f"took 2.0 (serial 1) from {commit[:12]}, signed by alice@ci", out
            assert serving(p) == ("2.0", "2.0") and "Accepted publickey for root" in sshd.log()
            known = (tmp_path / "store/demo/.pull/channel.git/known_hosts").read_text()
            assert sshd.host_key_line.split(" ", 1)[1].strip() in known, "the server's key, trusted at first use"
        finally:
            sshd.stop()

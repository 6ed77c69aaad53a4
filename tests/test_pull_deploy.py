# ruff: noqa: F811 - the tests take the namespace double's `board` fixture, imported from its module
"""ssh tier: pull mode and OpenSSH. A push deploy to a site that follows a release channel is refused with the
board's line, and with --force it is deployed and the site stops following; a channel fetched over ssh (an sshd on
dom0's loopback) with the board's own key, its host key trusted at first use and a changed one refused.
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
from test_switch_double import Board, board, failures, make_board, sh, wait_for  # noqa: F401

from appliance import deploy as d
from appliance.errors import DeployError
from appliance.manager.pull import summary_text

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


def test_a_channel_whose_ssh_host_key_changed_is_refused(tmp_path: Path):
    with make_board(tmp_path) as b:
        b.version("1.0", "serve:page one")
        b.supervise("1.0")
        p = setup_channel(tmp_path, b, url="ssh://root@127.0.0.1:1/nowhere.git")
        p.run("status")                                         # makes the board's key
        key = tmp_path / "pull-key/id_ed25519"
        sshd = start(tmp_path / "sshd", key, netns=b.dom0)
        port, url = sshd.port, f"ssh://root@127.0.0.1:{sshd.port}{p.channel.bare}"
        conf = json.loads((tmp_path / "pull.json").read_text())
        conf["sites"]["demo"]["url"] = url
        (tmp_path / "pull.json").write_text(json.dumps(conf))
        p.channel.release(1, "2.0", "serve:page two")
        try:
            assert p.pull()["result"].startswith("took 2.0"), "the first key trusted"
        finally:
            sshd.stop()
        known = tmp_path / "store/demo/.pull/channel.git/known_hosts"
        trusted = known.read_text()
        # the same address and port now answer with another host key: a reinstalled server, or someone between
        other = start(tmp_path / "sshd-other", key, netns=b.dom0, port=port)
        try:
            assert other.host_key_line != sshd.host_key_line
            p.channel.release(2, "3.0", "serve:page three")
            visitor = b.visit()
            wait_for(lambda: len(visitor.lines()) >= 20, 10, "the visitor's first pages")
            out = p.pull()
            lines = visitor.finish()
            sent = sh("ssh-keygen", "-l", "-f", str(other.dir / "host_key.pub")).stdout.split()[1]
            line = (f"failed: [127.0.0.1]:{port}: the host key of the channel's server has CHANGED (ED25519 {sent}, "
                    f"not the key on line 1 of {known}); refused, as it could be another machine; if the server "
                    f"was re-installed, delete that line and the next check trusts its new key")
            assert (out["ok"], out["result"]) == (False, line), out
            assert "Accepted publickey" not in other.log(), "nothing sent to a server that is not the trusted one"
            assert known.read_text() == trusted, "the trusted key kept"
            assert serving(p) == ("2.0", "2.0") and failures(lines) == []
            st = p.status()["pull"]
            assert st["last_check"]["result"] == line and (st["failures"], st["highest"]) == (1, 1)
            assert f" ago: {line}; " in summary_text(st), summary_text(st)
        finally:
            other.stop()

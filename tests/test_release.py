"""Unit tier: pull mode's host side with real git and real SSH keys in tmp_path: the recipe's `pull:` key, what the
board's pull.json says, `invoke release` (one signed commit, the serial rule, a key from a file or ssh-agent, the
signature checked before anything is pushed) and status's line.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import config, release, sites
from appliance.errors import RecipeError, ReleaseError
from appliance.manager import manifest, pull

pytestmark = [pytest.mark.unit,
              pytest.mark.skipif(not all(os.path.exists(p) for p in ("/usr/bin/git", "/usr/bin/ssh-keygen",
                                                                    "/usr/bin/ssh-agent")),
                                 reason="needs git, ssh-keygen and ssh-agent")]
GIT = ["git", "-c", "init.defaultBranch=stable"]


def run(*argv: str, **kw: Any) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout.strip()


def keypair(tmp: Path, name: str) -> Path:
    run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(tmp / name))
    return tmp / name


def allowed(tmp: Path, *keys: Path) -> Path:
    path = tmp / "allowed_signers"
    path.write_text("".join(f"{k.name}@ci namespaces=\"git\" {' '.join(k.with_suffix('.pub').read_text().split()[:2])}\n"
                            for k in keys))
    return path


def bundle(tmp: Path, version: str, page: str = "hello") -> tuple[manifest.Manifest, Path]:
    d = tmp / f"bundle-{version}"
    d.mkdir()
    head = bytearray(0x30)
    head[0x24:0x28] = (0x016F2818).to_bytes(4, "little")
    kernel = bytes(head) + f"serve:{page}".encode()
    (d / "vmlinuz").write_bytes(kernel)
    m = manifest.validate({"name": "demo", "version": version, "kernel": "vmlinuz",
                           "sha256": {"vmlinuz": hashlib.sha256(kernel).hexdigest()}, "memory": 64, "vcpus": 1,
                           "port": 80, "health": {"path": "/", "deadline": 5}}, "test")
    return m, d


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    bare = tmp_path / "channel.git"
    run(*GIT, "init", "-q", "--bare", str(bare))
    return bare


def shown(bare: Path, what: str) -> str:
    return run("git", f"--git-dir={bare}", "show", what)


def test_a_release_is_one_signed_commit_with_the_next_serial(tmp_path: Path, channel: Path):
    alice = keypair(tmp_path, "alice")
    signers = allowed(tmp_path, alice)
    m1, d1 = bundle(tmp_path, "1.0")
    out = release.release(str(channel), "demo", m1, d1, key=alice, signers=signers)
    assert (out["serial"], out["version"], out["branch"]) == (1, "1.0", "stable")
    m2, d2 = bundle(tmp_path, "2.0", "two")
    out = release.release(str(channel), "demo", m2, d2, key=alice, signers=signers)
    assert out["serial"] == 2
    assert json.loads(shown(channel, "stable:demo/release.json")) == {"serial": 2}
    assert json.loads(shown(channel, "stable:demo/manifest.json"))["version"] == "2.0"
    assert run("git", f"--git-dir={channel}", "ls-tree", "--name-only", "stable:demo").split() == [
        "manifest.json", "release.json", "vmlinuz"]
    assert run("git", f"--git-dir={channel}", "rev-list", "--count", "stable") == "2"
    good = subprocess.run(["git", f"--git-dir={channel}", "-c", f"gpg.ssh.allowedSignersFile={signers}",
                           "verify-commit", out["commit"]], capture_output=True, text=True, check=False)
    assert good.returncode == 0 and 'Good "git" signature for alice@ci' in good.stderr


def test_a_serial_not_higher_than_the_channels_is_refused(tmp_path: Path, channel: Path):
    alice = keypair(tmp_path, "alice")
    m1, d1 = bundle(tmp_path, "1.0")
    release.release(str(channel), "demo", m1, d1, key=alice, serial=5)
    m2, d2 = bundle(tmp_path, "2.0")
    with pytest.raises(ReleaseError) as e:
        release.release(str(channel), "demo", m2, d2, key=alice, serial=5)
    assert str(e.value) == (f"{channel}@stable: serial 5 must be higher than 5, the channel's last for demo (and at "
                            f"most {1 << 53})")


def test_a_key_the_boards_would_refuse_pushes_nothing(tmp_path: Path, channel: Path):
    alice, mallory = keypair(tmp_path, "alice"), keypair(tmp_path, "mallory")
    signers = allowed(tmp_path, alice)
    m, d = bundle(tmp_path, "1.0")
    with pytest.raises(ReleaseError) as e:
        release.release(str(channel), "demo", m, d, key=mallory, signers=signers)
    assert str(e.value).startswith(f"{signers}: the release's signature does not verify with these allowed signers")
    assert str(e.value).endswith("; nothing was pushed")
    assert run("git", f"--git-dir={channel}", "for-each-ref") == ""


def test_the_key_comes_from_ssh_agent_unless_given(tmp_path: Path, channel: Path, monkeypatch: pytest.MonkeyPatch):
    m, d = bundle(tmp_path, "1.0")
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(ReleaseError) as e:
        release.release(str(channel), "demo", m, d)
    assert str(e.value).startswith("no signing key: give --key FILE (an SSH private key) or add one to ssh-agent")
    alice = keypair(tmp_path, "alice")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        end = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < end:
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        run("ssh-add", "-q", str(alice))
        out = release.release(str(channel), "demo", m, d, signers=allowed(tmp_path, alice))
        assert out["serial"] == 1
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(10)


def recipe(tmp_path: Path, pull_spec: dict[str, Any], signers: str | None = "ok") -> Path:
    data = yaml.safe_load((config.ROOT / "recipes/booth.yaml").read_text())
    data["sites"][0]["pull"] = pull_spec      # overlays and static sites by name: the tool's, from anywhere
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    if signers == "ok":
        keypair(tmp_path, "alice")
        allowed(tmp_path, tmp_path / "alice")
    return path


def test_the_recipe_pull_key_becomes_the_boards_pull_json(tmp_path: Path):
    path = recipe(tmp_path, {"url": "https://git.example.invalid/booth.git", "signers": "allowed_signers",
                             "every": 60})
    cfg = config.load(str(path))
    assert cfg.recipe.sites[0].pull == config.Pull("https://git.example.invalid/booth.git", "allowed_signers",
                                                   "stable", 60)
    data = json.loads(sites.pull_json(cfg.recipe, cfg.recipe_path))
    assert list(data["sites"]) == ["demo"]
    demo = data["sites"]["demo"]
    assert (demo["url"], demo["branch"], demo["every"]) == ("https://git.example.invalid/booth.git", "stable", 60)
    assert demo["signers"] == [(tmp_path / "allowed_signers").read_text().strip()]
    assert sites.pull_tick(cfg.recipe) == 60
    os.environ[pull.ENV_CONFIG] = str(tmp_path / "pull.json")
    try:
        (tmp_path / "pull.json").write_text(sites.pull_json(cfg.recipe, cfg.recipe_path))
        assert pull.settings()["demo"]["signers"] == demo["signers"]    # the board reads what the host wrote
    finally:
        del os.environ[pull.ENV_CONFIG]
    assert sites.pull_json(config.load("booth").recipe, config.recipe_path("booth")) == ""


@pytest.mark.parametrize("spec, signers, message", [
    ({"url": "ext::sh -c evil", "signers": "allowed_signers"}, "ok",
     "sites[0].pull: url: 'ext::sh -c evil' must be an https://, ssh://, git:// or file:// URL, user@host:path or "
     "an absolute path, with no spaces, quotes or backslashes"),
    ({"url": "/srv/booth.git", "signers": "allowed_signers", "branch": "a..b"}, "ok",
     "sites[0].pull: branch: 'a..b' is not a branch name (letters, digits, '.', '_', '-', '/')"),
    ({"url": "/srv/booth.git", "signers": "allowed_signers", "every": 1}, "ok",
     "sites[0].pull: every: 1 must be a whole number of seconds from 10 to 604800"),
    ({"url": "/srv/booth.git", "signers": "nobody"}, "ok", "sites[0].pull.signers: cannot read "),
    ({"url": "/srv/booth.git"}, "ok", "sites[0].pull.signers: missing key"),
])
def test_a_bad_pull_key_is_one_line_naming_it(tmp_path: Path, spec: dict[str, Any], signers: str, message: str):
    path = recipe(tmp_path, spec, signers)
    with pytest.raises(RecipeError) as e:
        config.load(str(path))
    assert message in str(e.value) and str(path.name) in str(e.value), str(e.value)


def test_an_empty_signers_file_is_refused(tmp_path: Path):
    path = recipe(tmp_path, {"url": "/srv/booth.git", "signers": "empty"}, None)
    (tmp_path / "empty").write_text("# nobody yet\n")
    with pytest.raises(RecipeError) as e:
        config.load(str(path))
    assert "sites[0].pull.signers: " in str(e.value) and "signers: 0 entries; an allowed_signers file needs 1 to 100" \
        in str(e.value)


def test_status_says_what_a_following_site_does():
    now = time.time()
    text = pull.summary_text({
        "following": "/srv/booth.git@stable",
        "serving": {"version": "2.0", "serial": 2, "commit": "a" * 40, "signer": "alice@ci"},
        "last_check": {"at": now - 30, "ok": True, "result": "up to date at aaaaaaaaaaaa"},
        "last_signed": {"commit": "a" * 40, "age_s": 7200}, "refused": [{"reason": "commit b: it is not signed"}],
        "bad": {"1.5": "did not answer"}})
    assert text == ("following /srv/booth.git@stable; serving 2.0 (serial 2, aaaaaaaaaaaa, signed by alice@ci); last "
                    "check 30 s ago: up to date at aaaaaaaaaaaa; last signed commit aaaaaaaaaaaa dated 2.0 h ago; "
                    "refused 1: commit b: it is not signed; bad: 1.5")


def test_invoke_release_prints_one_line_and_errors_are_one_line(tmp_path: Path, channel: Path):
    alice = keypair(tmp_path, "alice")
    m, d = bundle(tmp_path, "1.0")
    (d / "guest.yaml").write_text(json.dumps({"version": "1.0", "kernel": "vmlinuz", "sha256": m.sha256,
                                              "memory": 64}))
    invoke = [str(Path(sys.executable).parent / "invoke"), "release"]
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    p = subprocess.run([*invoke, "--channel", str(channel), "--site", "demo", "--key", str(alice), str(d)],
                       cwd=config.ROOT, capture_output=True, text=True, check=False, env=env)
    commit = run("git", f"--git-dir={channel}", "rev-parse", "stable")
    assert (p.returncode, p.stdout) == (0, f"{channel}@stable: demo 1.0 (serial 1) {commit[:12]}\n"), p.stderr
    p = subprocess.run([*invoke, "--channel", str(channel), "--site", "demo", "--serial", "1", "--key", str(alice),
                        str(d)], cwd=config.ROOT, capture_output=True, text=True, check=False, env=env)
    assert (p.returncode, p.stderr) == (1, f"appliance: ERROR: {channel}@stable: serial 1 must be higher than 1, the "
                                           f"channel's last for demo (and at most {1 << 53})\n")


def test_a_channel_and_a_key_named_relative_to_here_are_found(tmp_path: Path, channel: Path):
    """The README's CI example gives `--key ../ci_key`; git signs and clones from a temporary folder, where a
    relative path named nothing ('git -c: fatal: failed to write commit object')."""
    alice = keypair(tmp_path, "alice")
    m, d = bundle(tmp_path, "1.0")
    (d / "guest.yaml").write_text(json.dumps({"version": "1.0", "kernel": "vmlinuz", "sha256": m.sha256,
                                              "memory": 64}))
    here = tmp_path / "ci"
    here.mkdir()
    invoke = [str(Path(sys.executable).parent / "appliance"), "release"]      # from a folder of one's own
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    rel = os.path.relpath(channel, here)
    p = subprocess.run([*invoke, "--channel", rel, "--site", "demo", "--key", os.path.relpath(alice, here),
                        os.path.relpath(d, here)], cwd=here, capture_output=True, text=True, check=False, env=env)
    commit = run("git", f"--git-dir={channel}", "rev-parse", "stable")
    assert (p.returncode, p.stdout) == (0, f"{rel}@stable: demo 1.0 (serial 1) {commit[:12]}\n"), p.stderr
    p = subprocess.run([*invoke, "--channel", rel, "--site", "demo", "--key", str(tmp_path / "no-key"),
                        os.path.relpath(d, here)], cwd=here, capture_output=True, text=True, check=False, env=env)
    assert (p.returncode, p.stderr) == (1, f"appliance: ERROR: {tmp_path / 'no-key'}: no such key file\n")


def test_status_shows_a_broken_pull_state_instead_of_failing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from appliance.manager.context import Context
    from appliance.manager.settings import Site, Slot

    (tmp_path / "pull.json").write_text(json.dumps({"sites": {"demo": {
        "url": "/srv/c.git", "branch": "stable", "every": 60, "signers": ["a@b ssh-ed25519 AAAA"]}}}))
    monkeypatch.setenv(pull.ENV_CONFIG, str(tmp_path / "pull.json"))
    ctx = Context.from_env({"APPLIANCE_STORE": str(tmp_path / "store")})
    slot = Slot("blue", "10.42.100.10", "00:16:3e:2a:64:0a", "demo.blue")
    site = Site("demo", ("demo.booth",), "10.42.0.2", 80, 64, 1, "/", 120, 3, (slot, slot))
    assert pull.summary(ctx, site)["following"] == "/srv/c.git@stable"
    (tmp_path / "store/demo/.pull").mkdir(parents=True)
    (tmp_path / "store/demo/.pull/state.json").write_text("{broken")
    out = pull.summary(ctx, site)
    assert out["error"].startswith(f"{tmp_path}/store/demo/.pull/state.json: cannot read the site's pull state: ")
    assert pull.summary_text(out).startswith("pull mode: ")
    with pytest.raises(pull.Error) as e:       # a check never starts from a broken state: it holds the highest serial
        pull.read(ctx, site)
    assert "remove it only if no older release may be replayed meanwhile" in str(e.value)


def rendered(cfg: config.Config) -> dict[str, bytes]:
    from appliance.build import configure
    from appliance.identity import derive

    ctx = configure.context(cfg, derive(cfg.digest), need_secrets=False)
    return {f.rel: f.data for f in configure.render_overlays(cfg, ctx) if f.data is not None}


def test_the_image_carries_pull_json_and_a_timer_only_a_following_site_starts(tmp_path: Path):
    files = rendered(config.load("booth"))
    assert files["etc/appliance/pull.json"] == b"", "empty: the timer's ConditionFileNotEmpty keeps it stopped"
    assert b"ConditionFileNotEmpty=/etc/appliance/pull.json" in files["etc/systemd/system/appliance-pull.timer"]
    cfg = config.load(str(recipe(tmp_path, {"url": "/srv/booth.git", "signers": "allowed_signers", "every": 40})))
    files = rendered(cfg)
    assert json.loads(files["etc/appliance/pull.json"])["sites"]["demo"]["every"] == 40
    timer = files["etc/systemd/system/appliance-pull.timer"].decode()
    assert "OnUnitInactiveSec=40s\n" in timer and "RandomizedDelaySec=10s\n" in timer
    service = files["etc/systemd/system/appliance-pull.service"].decode()
    assert "ExecStart=/usr/local/sbin/appliance-guest pull --timer\n" in service

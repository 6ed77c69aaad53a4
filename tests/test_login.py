"""Unit tier: which SSH key an image trusts (--authorized-keys, the recipe's, else the user's own: ssh-agent's first,
else ~/.ssh/id_*.pub; none with --no-login), what the build says about it (a keyless image in its last line), the
fingerprints as ssh-keygen prints them, and emulate refusing at once a key the image's manifest does not list.
A real ssh-agent, started by the test and killed after it; HOME is a temporary folder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance import ROOT, build, emulate, keys
from appliance.errors import EmulateError, RecipeError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)
    return h


def keygen(path: Path, comment: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL)
    return path


def keygen_fingerprint(pub: Path) -> str:
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], check=True, capture_output=True, text=True).stdout.split()[1]


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        yield sock
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fingerprints_are_ssh_keygens(tmp_path: Path) -> None:
    key = keygen(tmp_path / "k", "someone@somewhere")
    line = (tmp_path / "k.pub").read_text()
    assert keys.fingerprint(line) == keygen_fingerprint(tmp_path / "k.pub")
    assert keys.private_fingerprint(key) == keygen_fingerprint(tmp_path / "k.pub")
    (tmp_path / "k.pub").unlink()          # derived from the private key when its .pub is not beside it
    assert keys.private_fingerprint(key) == keys.fingerprint(line)


def test_no_key_anywhere_builds_keyless_and_says_so_last(capsys: pytest.CaptureFixture[str]) -> None:
    """CI as root with no key: the build still succeeds, and its last line says nobody can log in."""
    assert build.build("booth", dry_run=True) is None
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("WARNING: build/cubieboard2-booth.img trusts no SSH key (no key of yours was found: none in "
                       "ssh-agent, no ~/.ssh/id_*.pub): nobody can log in to it, so deploy, status and emulate "
                       "--check cannot reach it")
    assert "  login:    none (no key of yours was found: none in ssh-agent, no ~/.ssh/id_*.pub)" in err


def test_the_users_key_file_is_trusted_by_default(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(home / ".ssh/id_ed25519", "me@laptop")
    keygen(home / ".ssh/id_rsa", "old@laptop")       # ssh tries id_rsa first, and so does the build
    keygen(home / ".ssh/id_other", "other@laptop")
    ctx = build.verify("booth")
    assert ctx.keys == (home / ".ssh/id_rsa.pub").read_text()
    fp = keygen_fingerprint(home / ".ssh/id_rsa.pub")
    assert f"root will trust your SSH key {fp} (old@laptop), from ~/.ssh/id_rsa.pub" in capsys.readouterr().err
    assert build.build("booth", dry_run=True) is None
    err = capsys.readouterr().err.splitlines()
    assert err[-2:] == [f"  login:    root by SSH key: {fp}", "  image:    build/cubieboard2-booth.img"]


def test_ssh_agents_first_key_comes_before_the_files(home: Path, agent: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    keygen(home / ".ssh/id_ed25519", "file@laptop")
    first, second = keygen(tmp_path / "a", "agent-first"), keygen(tmp_path / "b", "agent-second")
    for k in (first, second):
        subprocess.run(["ssh-add", "-q", str(k)], check=True, capture_output=True)
    ctx = build.verify("booth")
    assert ctx.keys is not None and ctx.keys.split()[:2] == (tmp_path / "a.pub").read_text().split()[:2]
    fp = keygen_fingerprint(tmp_path / "a.pub")
    assert f"root will trust your SSH key {fp} (agent-first), from ssh-agent (its first key)" \
        in capsys.readouterr().err


def test_an_empty_agent_falls_back_to_the_files(home: Path, agent: Path) -> None:
    keygen(home / ".ssh/id_ed25519", "file@laptop")
    assert build.verify("booth").keys == (home / ".ssh/id_ed25519.pub").read_text()


def test_no_login_is_keyless_on_purpose(home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keygen(home / ".ssh/id_ed25519", "me@laptop")
    ctx = build.verify("booth", login=False)
    assert ctx.keys is None and ctx.keyless == "--no-login"
    build.build("booth", dry_run=True, login=False)
    err = capsys.readouterr().err
    assert "WARNING: the image will trust no SSH key" not in err            # on purpose: no nagging up front
    assert err.splitlines()[-1] == ("WARNING: build/cubieboard2-booth.img trusts no SSH key (--no-login): nobody "
                                    "can log in to it, so deploy, status and emulate --check cannot reach it")
    with pytest.raises(RecipeError) as exc:
        build.verify("booth", authorized_keys=str(home / ".ssh/id_ed25519.pub"), login=False)
    assert str(exc.value) == "--no-login makes an image nobody can log in to: leave out --authorized-keys with it"


def image_with(tmp_path: Path, trusted: list[str] | None) -> Path:
    img = tmp_path / "cubieboard2-booth.img"
    img.write_bytes(b"")
    m = {"board": "cubieboard2", "also_boots": ["qemu-virt"]}
    if trusted is not None:
        m["authorized_keys"] = trusted
    img.with_suffix(".manifest.json").write_text(json.dumps(m))
    return img


def test_emulate_refuses_at_once_a_key_the_image_does_not_trust(tmp_path: Path) -> None:
    mine, theirs = keygen(tmp_path / "mine", "mine"), keygen(tmp_path / "theirs", "theirs")
    img = image_with(tmp_path, [keygen_fingerprint(tmp_path / "theirs.pub")])
    started = time.monotonic()
    with pytest.raises(EmulateError) as err, emulate.boot(img, log_path=tmp_path / "console.log", key=mine):
        pass
    assert str(err.value) == (f"{mine}: its public key {keygen_fingerprint(tmp_path / 'mine.pub')} is not one "
                              f"{img.name} trusts ({keygen_fingerprint(tmp_path / 'theirs.pub')})")
    assert time.monotonic() - started < 5 and not (tmp_path / "console.log").exists()   # no QEMU was started
    emulate.check_key(img, theirs)       # the key it lists passes


def test_emulate_refuses_at_once_on_a_keyless_image(tmp_path: Path) -> None:
    mine = keygen(tmp_path / "mine", "mine")
    with pytest.raises(EmulateError) as err:
        emulate.check_key(image_with(tmp_path, []), mine)
    assert str(err.value) == ("cubieboard2-booth.img trusts no SSH key (its manifest lists none), so nobody can "
                              "log in to it (build it with your key: appliance build, or --authorized-keys FILE)")
    emulate.check_key(image_with(tmp_path, None), mine)      # an image from before manifests listed keys


def test_emulates_default_key_is_one_the_image_trusts(home: Path, tmp_path: Path) -> None:
    keygen(home / ".ssh/id_rsa", "a")
    trusted = keygen(home / ".ssh/id_ed25519", "b")
    img = image_with(tmp_path, [keygen_fingerprint(home / ".ssh/id_ed25519.pub")])
    if (ROOT / "build/test/id_ed25519").exists():
        pytest.skip("the test suite's key exists here and comes first when the image lists it")
    assert emulate.default_key(img) == trusted


def test_emulate_logs_in_with_a_key_only_ssh_agent_holds(tmp_path: Path, agent: Path) -> None:
    """A key in ssh-agent alone (no ~/.ssh file, as after the README's step 1 with an agent) is the default; a
    key of the agent's that the image does not list is refused at once, in one line."""
    theirs, mine = keygen(tmp_path / "theirs", "theirs"), keygen(tmp_path / "mine", "mine")
    img = image_with(tmp_path, [keygen_fingerprint(tmp_path / "theirs.pub")])
    subprocess.run(["ssh-add", "-q", str(mine)], check=True, capture_output=True)
    if (ROOT / "build/test/id_ed25519").exists():
        assert emulate.default_key(img) == ROOT / "build/test/id_ed25519"   # listed by none: the first file
    else:
        assert emulate.default_key(img) is None
    with pytest.raises(EmulateError) as err:
        emulate.check_key(img, None)
    assert str(err.value) == (f"no key of yours that {img.name} trusts ({keygen_fingerprint(tmp_path / 'theirs.pub')}):"
                              " none in ssh-agent, none in ~/.ssh (give the private key with --key FILE)")
    subprocess.run(["ssh-add", "-q", str(theirs)], check=True, capture_output=True)
    emulate.check_key(img, None)
    assert emulate.default_key(img) is None          # the agent logs in


def test_emulate_check_on_a_keyless_image_is_one_line_at_once(tmp_path: Path, home: Path) -> None:
    img = image_with(tmp_path, [])
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "invoke", "emulate", "--check", "--image", str(img)], cwd=ROOT,
                         check=False, capture_output=True, text=True, timeout=60, env={**os.environ, "HOME": str(home)})
    assert out.returncode == 1 and time.monotonic() - started < 30
    assert out.stderr.strip().splitlines() == [
        "appliance: ERROR: cubieboard2-booth.img trusts no SSH key (its manifest lists none), so nobody can log in "
        "to it (build it with your key: invoke build, or --authorized-keys FILE)"]

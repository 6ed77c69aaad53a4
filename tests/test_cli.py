"""The command line as a user types it: `invoke …` in the checkout and the installed `appliance` command, run as
subprocesses; each refusal is one exact line on stderr and an exit status, never a traceback.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cards import Card

from appliance import ROOT, build, commands, default_cache
from appliance.errors import FlashInterrupted

BIN = Path(sys.executable).parent
INVOKE, APPLIANCE = str(BIN / "invoke"), str(BIN / "appliance")


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_DEBUG"}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


REFUSALS = [
    (["deploy", "--memory", "abc", "--host", "h", "g"], "--memory: 'abc' is not a whole number"),
    (["deploy", "--memory", "0", "--host", "h", "g"], "--memory: 0 is out of range (give a number at least 1)"),
    (["deploy", "--parallel", "abc", "--host", "h", "g"], "--parallel: 'abc' is not a whole number"),
    (["deploy", "--parallel", "65", "--host", "h", "g"],
     "--parallel: 65 is out of range (give a number from 1 to 64)"),
    (["deploy", "--host", "h"], "deploy what? Give GUEST (a bundle, tarball or kernel) or --static DIR"),
    (["emulate", "--timeout", "abc"], "--timeout: 'abc' is not a number"),
    (["emulate", "--timeout", "nan"], "--timeout: nan is out of range (give a number at least 1)"),
    (["bench", "--runs", "abc"], "--runs: 'abc' is not a whole number"),
    (["bench", "--runs", "1.5"], "--runs: '1.5' is not a whole number"),
    (["bench", "--runs", "0"], "--runs: 0 is out of range (give a number from 1 to 100)"),
    (["bench", "--only", "deploy,nonsense"], "--only: 'nonsense' is not one of switch, deploy, pull, wake"),
    (["bench", "--image", "x.img"], "--image and --key go with --only (the whole benchmark builds its own images)"),
    (["test", "--tier", "fast"], "--tier: 'fast' is not one of unit, root, ssh, browser, image, system, all"),
    (["status"], "name the board with --host HOST (or --hosts FILE)"),
]


@pytest.mark.unit
@pytest.mark.parametrize("program", [INVOKE, APPLIANCE], ids=["invoke", "appliance"])
@pytest.mark.parametrize(("argv", "line"), REFUSALS, ids=[" ".join(a[:3]) for a, _ in REFUSALS])
def test_a_bad_option_is_one_line(program: str, argv: list[str], line: str) -> None:
    p = run(program, *argv)
    assert (p.returncode, p.stderr, p.stdout) == (1, f"appliance: ERROR: {line}\n", "")


@pytest.mark.unit
def test_flash_to_file_refuses_an_existing_file_without_force(card: Card, tmp_path: Path) -> None:
    out = tmp_path / "out.img"
    out.write_bytes(b"someone's file")
    p = run(INVOKE, "flash", str(out), "--to-file", "--image", str(card.img))
    assert (p.returncode, p.stderr) == (1, f"appliance: ERROR: {out} already exists (--force overwrites it)\n")
    assert out.read_bytes() == b"someone's file"
    p = run(INVOKE, "flash", str(out), "--to-file", "--force", "--image", str(card.img))
    assert p.returncode == 0, p.stderr
    assert out.stat().st_size == card.img.stat().st_size


@pytest.mark.unit
def test_short_flags_mean_one_thing_on_every_task() -> None:
    seen: dict[str, set[str]] = {}
    for name in commands.ns.task_names:
        for arg in commands.ns[name].get_arguments():
            for short in (n for n in arg.names if len(n) == 1):
                seen.setdefault(short, set()).add(arg.attr_name or arg.name)
    assert seen == {"n": {"dry_run"}, "y": {"yes"}}


@pytest.mark.unit
@pytest.mark.parametrize("task", ["flash", "deploy", "rollback"])
def test_help_shows_the_positional_as_the_readme_does(task: str) -> None:
    p = run(INVOKE, task, "--help")
    usage = next(line.strip() for line in p.stdout.splitlines() if line.startswith(f"  {task} "))
    assert p.returncode == 0 and usage.split()[0] == task
    assert f"`appliance {usage.replace('|', chr(92) + '|')}`" in (ROOT / "README.md").read_text()


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "given"), [
    (["flash"], False), (["flash", "/dev/sdb"], True), (["flash", "--image", "x.img"], False),
    (["flash", "--image", "x.img", "/dev/sdb", "-y"], True), (["flash", "--help"], False), (["--list"], True),
    (["-d", "flash", "--bmap", "b", "--to-file", "out.img"], True)])
def test_an_optional_positional_is_found_after_the_valued_flags(argv: list[str], given: bool) -> None:
    assert commands._positional_given("flash", {"--image", "--bmap"}, argv) is given


@pytest.mark.unit
def test_an_interrupted_flash_exits_130() -> None:
    def body(c: object) -> None:
        raise FlashInterrupted("interrupted: out.img is incomplete and will not boot")

    with pytest.raises(commands.Exit) as exc:
        commands._cli(body)(None)
    assert (exc.value.code, exc.value.message) == (
        130, "appliance: ERROR: interrupted: out.img is incomplete and will not boot")


@pytest.mark.unit
@pytest.mark.parametrize("program", [INVOKE, APPLIANCE], ids=["invoke", "appliance"])
def test_ctrl_c_exits_130(program: str, tmp_path: Path) -> None:
    """Ctrl-C while the task waits on a board (an SSH server that never answers) ends with 130."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(60)
        port = listener.getsockname()[1]
        (tmp_path / "ssh_config").write_text("")
        # as a terminal's foreground command gets it: SIGINT's default action, even when this test runs in a
        # background job of a non-interactive shell, whose children inherit SIGINT ignored (as nohup does)
        proc = subprocess.Popen([program, "status", "--host", f"root@127.0.0.1:{port}", "--ssh-config",
                                 str(tmp_path / "ssh_config"), "--known-hosts", str(tmp_path / "known_hosts")],
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            conn, _ = listener.accept()      # it is connected, waiting for a banner that never comes
            with conn:
                proc.send_signal(signal.SIGINT)
                out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert (proc.returncode, err.splitlines()[-1:]) == (130, ["appliance: interrupted"])


@pytest.mark.unit
def test_the_appliance_command_works_from_any_directory(tmp_path: Path) -> None:
    p = run(APPLIANCE, "--version", cwd=tmp_path)
    assert p.returncode == 0 and p.stdout.startswith("appliance 0.1.0"), p
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True,
                         check=False)
    if git.returncode == 0:
        assert f"(git {git.stdout.strip()}" in p.stdout
    listing = run(APPLIANCE, "--list", cwd=tmp_path)
    assert listing.returncode == 0
    assert [line.split()[0] for line in listing.stdout.splitlines()[2:] if line.startswith("  ") and
            not line.startswith("    ")] == sorted(commands.ns.task_names)
    assert run(sys.executable, "-m", "appliance", "--version", cwd=tmp_path).stdout == p.stdout


@pytest.mark.unit
def test_invoke_lists_the_same_tasks_in_the_checkout() -> None:
    p = run(INVOKE, "--list")
    assert p.returncode == 0 and p.stdout.startswith("Available tasks:\n")
    assert [line.split()[0] for line in p.stdout.splitlines()[2:] if line.startswith("  ") and
            not line.startswith("    ")] == sorted(commands.ns.task_names)


@pytest.mark.unit
def test_clean_removes_only_what_appliance_made(tmp_path: Path) -> None:
    """The cache may be a folder shared with other programs (~/.cache): clean leaves what it did not make."""
    root, cache = tmp_path / "checkout", tmp_path / "cache"
    (root / "build" / ".work" / "x").mkdir(parents=True)
    for marker in ("pyproject.toml", "tasks.py"):    # a checkout: its workspaces are in build/, not the cache
        (root / marker).write_text("")
    for made in ("rootfs/abc/tree/etc", "initrd", "xz/cubieboard2-booth"):
        (cache / made).mkdir(parents=True)
        (cache / made / "data").write_bytes(b"ours")
    (cache / "fontconfig").mkdir()
    (cache / "fontconfig" / "cache-7").write_bytes(b"theirs")
    (cache / "notes.txt").write_text("theirs")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep").write_text("theirs")
    (cache / "xz").rename(tmp_path / "xz-was")
    (cache / "xz").symlink_to(elsewhere)          # a link named like ours is removed, never followed
    build.clean(root=root, cache=cache)
    assert sorted(p.name for p in cache.iterdir()) == ["fontconfig", "notes.txt"]
    assert (cache / "fontconfig" / "cache-7").read_bytes() == b"theirs"
    assert (elsewhere / "keep").read_text() == "theirs"
    assert not (root / "build" / ".work").exists()


@pytest.mark.unit
def test_the_cache_is_dot_cache_in_a_checkout_else_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_cache() == ROOT / ".cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache(tmp_path) == tmp_path / "xdg" / "appliance"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache(tmp_path) == tmp_path / "home" / ".cache" / "appliance"

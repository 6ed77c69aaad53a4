"""Progress and long commands: a bar that fits the terminal and redraws a few times a second, plain lines off a
TTY, a quiet command's heartbeat, and a build's last line. The clock is injected: no test sleeps.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from appliance import ROOT, commands, log


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def drive(bar: log.Progress, clock: Clock, steps: int, seconds: float) -> None:
    """Feed the bar its whole total in `steps` equal updates spread over `seconds`."""
    for _ in range(steps):
        clock.now += seconds / steps
        bar.update(bar.total // steps)
    bar.update(bar.total - bar.done)
    bar.close()


@pytest.mark.unit
@pytest.mark.parametrize("width", [40, 80, 200])
def test_the_bar_fits_the_terminal(width: int) -> None:
    clock, out = Clock(), io.StringIO()
    bar = log.Progress("Writing /dev/mmcblk0", 2000 << 20, clock=clock, stream=out, tty=True, width=width)
    drive(bar, clock, 500, 50.0)
    frames = out.getvalue().rstrip("\n").split("\r")[1:]
    assert frames and all(len(f) <= width - 1 for f in frames), max(map(len, frames))
    assert "\n" not in out.getvalue().rstrip("\n")
    assert frames[-1].rstrip().endswith("ETA    0 s") and " 100% " in frames[-1]
    if width >= 80:
        assert frames[-1].startswith("Writing /dev/mmcblk0 [" + "#" * 10)


@pytest.mark.unit
def test_the_bar_redraws_at_most_five_times_a_second() -> None:
    clock, out = Clock(), io.StringIO()
    bar = log.Progress("Verifying", 1 << 30, clock=clock, stream=out, tty=True, width=80)
    drive(bar, clock, 10_000, 20.0)             # 500 updates a second
    redraws = out.getvalue().count("\r")
    assert 20 * 5 - 2 <= redraws <= 20 * 5 + 2   # the first and the last are always drawn


@pytest.mark.unit
def test_off_a_tty_the_bar_is_a_line_every_ten_percent() -> None:
    clock, out = Clock(), io.StringIO()
    bar = log.Progress("Writing out.img", 100 << 20, clock=clock, stream=out, tty=False)
    drive(bar, clock, 1000, 10.0)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert [line.split(": ")[1].split("%")[0] for line in lines] == [str(p) for p in range(0, 101, 10)]
    assert lines[-1] == "Writing out.img: 100% (100 of 100 MiB, 10.0 MiB/s)"


@pytest.mark.unit
@pytest.mark.parametrize("debug", [False, True], ids=["quiet", "debug"])
def test_a_quiet_command_has_a_heartbeat_and_its_own_lines_only_with_debug(tmp_path: Path, debug: bool) -> None:
    """The command prints a line, then waits on a FIFO that the test opens once the first heartbeat is said."""
    fifo = tmp_path / "go"
    os.mkfifo(fifo)
    said: list[str] = []
    heard = threading.Event()

    def say(line: str) -> None:
        said.append(line)
        if "still working" in line:
            heard.set()

    def release() -> None:
        if heard.wait(60):
            with open(fifo, "w") as f:
                f.write("done\n")

    helper = threading.Thread(target=release)
    helper.start()
    before = log.DEBUG
    log.set_debug(debug)
    try:
        proc = log._stream(["sh", "-c", f"echo I: extracting; cat {fifo}"], None, None, every=0.05, say=say)
    finally:
        log.set_debug(before)
        if not heard.is_set():
            heard.set()
            with open(fifo, "w"):
                pass
        helper.join()
    assert proc.returncode == 0 and proc.stderr == b"I: extracting\ndone\n"
    own = [line for line in said if line.startswith("  | ")]
    beats = [line for line in said if line not in own]
    assert own == (["  | I: extracting", "  | done"] if debug else [])
    assert beats and set(beats) == {"  … sh still working (0 s)" + ("" if debug else ", last: I: extracting")}


@pytest.mark.unit
def test_a_build_ends_with_what_to_do_next() -> None:
    img = ROOT / "build" / "cubieboard2-booth.img"   # from the checkout, its build/
    assert commands.next_step(img, [], "invoke") == "next: invoke flash /dev/sdX (the card's whole disk)"
    log.again()          # what earlier builds in this process left
    log.warn("the image will have no SSH authorized key, so nobody can log in to it", again=True)
    assert commands.next_step(Path("/srv/out/x.img"), log.again(), "appliance") == (
        "next: appliance flash --image /srv/out/x.img /dev/sdX (the card's whole disk); "
        "WARNING: the image will have no SSH authorized key, so nobody can log in to it")
    assert log.again() == []

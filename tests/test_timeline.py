"""The benchmark's pictures: dom0's units read from `systemctl show`, and the boot and build timelines as SVG."""

import xml.etree.ElementTree as ET

import pytest

from appliance.bench import timeline

pytestmark = pytest.mark.unit

SVG = "{http://www.w3.org/2000/svg}"

# As `systemctl show -p Id -p InactiveExitTimestampMonotonic -p ActiveEnterTimestampMonotonic '*'` prints it.
SHOW = """Id=ssh.service
InactiveExitTimestampMonotonic=20000000
ActiveEnterTimestampMonotonic=26500000

Id=multi-user.target
InactiveExitTimestampMonotonic=1000000
ActiveEnterTimestampMonotonic=90000000

Id=appliance-guest.service
InactiveExitTimestampMonotonic=30000000
ActiveEnterTimestampMonotonic=30200000

Id=systemd-udev-trigger.service
InactiveExitTimestampMonotonic=5000000
ActiveEnterTimestampMonotonic=17000000

Id=never-started.service
InactiveExitTimestampMonotonic=0
ActiveEnterTimestampMonotonic=0

Id=broken.service
InactiveExitTimestampMonotonic=n/a
"""

MILESTONES = {"spl": 0.1, "u-boot": 0.4, "boot.scr": 7.1, "xen": 9.5, "dom0 kernel": 13.9,
              "dom0 initramfs": 17.2, "dom0 systemd": 33.1, "guest started": 80.4,
              "guest HTTP 200 on the bridge": 101.3, "ssh": 171.4}


def test_the_slowest_units_come_first_on_the_power_on_clock():
    got = timeline.units(SHOW, dom0_kernel=13.9, top=2)
    assert [u[0] for u in got] == ["systemd-udev-trigger.service", "ssh.service"]
    name, start, end = got[0]
    assert start == pytest.approx(18.9) and end == pytest.approx(30.9)


def test_targets_and_units_that_never_ran_are_left_out():
    names = [u[0] for u in timeline.units(SHOW, dom0_kernel=0.0)]
    assert "multi-user.target" not in names and "never-started.service" not in names
    assert "broken.service" not in names and "appliance-guest.service" in names


def _texts(root):
    return [t.text for t in root.iter(f"{SVG}text")]


def test_the_boot_picture_has_every_phase_the_boot_reached(tmp_path):
    slow = timeline.units(SHOW, MILESTONES["dom0 kernel"])
    path = timeline.boot_svg(MILESTONES, tmp_path / "boot.svg", slow_units=slow, goal=45)
    root = ET.parse(path).getroot()
    texts = _texts(root)
    for label, took in (("Xen until dom0", "4.4 s"), ("guest: boots until its page", "20.9 s"),
                        ("dom0: systemd until SSH", "138.3 s"), ("unit systemd-udev-trigger.service", "12.0 s")):
        assert label in texts and took in texts
    assert "guest's 200 101.3 s" in texts and "goal 45 s" in texts
    bars = root.findall(f"{SVG}rect")[1:]
    assert len(bars) == len([p for p in timeline.PHASES if p[0] != "visitor"]) + len(slow)
    assert "visitor: joins the wifi" not in texts       # no visitor, no lane
    assert all(float(b.get("x")) + float(b.get("width")) <= timeline.W for b in bars)


VISITOR = {"visitor radio": 35.0, "visitor associated": 41.5, "visitor lease": 44.0, "visitor resolved": 44.8,
           "visitor first page": 52.3}


def test_the_visitor_has_a_lane_from_its_radio_to_its_first_page(tmp_path):
    root = ET.parse(timeline.boot_svg({**MILESTONES, **VISITOR}, tmp_path / "boot.svg", goal=30)).getroot()
    texts = _texts(root)
    for label, took in (("visitor: joins the wifi", "6.5 s"), ("visitor: gets a lease", "2.5 s"),
                        ("visitor: resolves the name", "0.8 s"), ("visitor: loads the page", "7.5 s")):
        assert label in texts and took in texts
    assert "visitor's page 52.3 s" in texts and "goal 30 s" in texts
    bars = [b for b in root.findall(f"{SVG}rect") if b.get("fill") == timeline.COLOURS["visitor"]]
    assert len(bars) == 4
    # one after the other, from the radio to the page
    xs = [float(b.get("x")) for b in bars]
    assert xs == sorted(xs) and len(set(xs)) == 4


def test_a_visitor_that_got_no_lease_draws_only_its_association(tmp_path):
    early = {**MILESTONES, "visitor radio": 35.0, "visitor associated": 41.5}
    root = ET.parse(timeline.boot_svg(early, tmp_path / "boot.svg")).getroot()
    assert len([b for b in root.findall(f"{SVG}rect") if b.get("fill") == timeline.COLOURS["visitor"]]) == 1
    assert not any(t and t.startswith("visitor's page") for t in _texts(root))


def test_a_boot_that_stopped_early_draws_only_what_it_reached(tmp_path):
    early = {k: MILESTONES[k] for k in ("u-boot", "boot.scr", "xen")}
    root = ET.parse(timeline.boot_svg(early, tmp_path / "boot.svg")).getroot()
    texts = _texts(root)
    assert "6.7 s" in texts and "2.4 s" in texts and "Xen until dom0" in texts    # every row is labelled
    assert len(root.findall(f"{SVG}rect")) == 1 + 2                                # but only two bars drawn
    assert not any(t and t.startswith(("guest's 200", "visitor's page")) for t in texts)


def test_names_are_escaped_in_the_picture(tmp_path):
    path = timeline.build_svg({"rootfs <mmdebstrap> & co": 276.0, "image": 12.5}, tmp_path / "build.svg")
    root = ET.parse(path).getroot()
    texts = _texts(root)
    assert "rootfs <mmdebstrap> & co" in texts and "Build steps: 288 s" in texts
    bars = root.findall(f"{SVG}rect")[1:]
    assert [float(b.get("x")) for b in bars][1] > float(bars[0].get("x"))   # one after the other


def test_marks_close_together_keep_their_labels_apart(tmp_path):
    # The README's picture had "goal 35 s" and the first page's label drawn on top of each other.
    marks = {**MILESTONES, "guest HTTP 200 on the bridge": 36.2}
    root = ET.parse(timeline.boot_svg(marks, tmp_path / "boot.svg", goal=35)).getroot()
    labels = {t.text: (float(t.get("x")), float(t.get("y"))) for t in root.iter(f"{SVG}text")
              if t.text and t.text.startswith(("goal", "guest's 200"))}
    (goal_x, goal_y), (page_x, page_y) = labels["goal 35 s"], labels["guest's 200 36.2 s"]
    width = timeline.CHAR_W * len("goal 35 s")
    assert goal_y != page_y or page_x > goal_x + width           # on another line, or clear of each other
    title_y = float(next(t for t in root.iter(f"{SVG}text") if t.get("font-size") == "15").get("y"))
    assert min(goal_y, page_y) - title_y >= timeline.MARK_LINE - 2   # and both below the title


def test_a_mark_near_the_right_edge_ends_inside_the_picture(tmp_path):
    root = ET.parse(timeline.boot_svg(MILESTONES, tmp_path / "boot.svg", goal=171)).getroot()
    goal = next(t for t in root.iter(f"{SVG}text") if t.text == "goal 171 s")
    assert float(goal.get("x")) + timeline.CHAR_W * len(goal.text) <= timeline.W

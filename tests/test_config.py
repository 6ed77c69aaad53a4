"""Unit tier: recipes and boards parse strictly; every bad recipe fails with its exact one-line message."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance import ROOT, build, config
from appliance.build import mirror
from appliance.errors import RecipeError

pytestmark = pytest.mark.unit
BAD = sorted((ROOT / "tests" / "bad-recipes").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_recipe_fails_with_its_message(path: Path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# error: "), f"{path.name} must start with '# error: <message>'"
    with pytest.raises(RecipeError) as err:
        build.verify(str(path.relative_to(ROOT)), None)
    assert str(err.value) == first.removeprefix("# error: ")


def test_there_are_bad_recipes():
    assert len(BAD) >= 10


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "board").glob("*.yaml")))
def test_every_board_loads(name: str):
    b = config.load_board(name)
    assert b.name == name
    assert b.ram.base <= b.load.xen < b.ram.base + b.ram.size


def test_default_recipe_checks_out():
    ctx = build.verify("booth", None)
    assert ctx.cfg.board.name == "cubieboard2"
    assert ctx.cfg.image_name == "cubieboard2-booth"
    assert [b.name for b in ctx.cfg.also] == ["qemu-virt"]


def test_sizes_and_addresses_parse():
    b = config.load_board("cubieboard2")
    assert b.uboot.offset == 8192
    assert b.ram.size == 1 << 30
    assert b.load.dtb_room == 64 << 10
    assert repr(b.load.xen) == "0x42000000"


def test_recipe_digest_changes_with_values(tmp_path: Path):
    text = (ROOT / "recipes/booth.yaml").read_text()
    a = tmp_path / "a.yaml"
    a.write_text(text)
    b = tmp_path / "b.yaml"
    b.write_text(text.replace("hostname: booth", "hostname: other"))
    assert config.load(str(a)).digest != config.load(str(b)).digest
    assert config.load(str(a)).digest == config.load(str(a)).digest


def test_authorized_keys_rejects_a_private_key(tmp_path: Path):
    from appliance.build.configure import authorized_keys

    key = tmp_path / "id"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nabc\n")
    with pytest.raises(RecipeError, match=re.escape(f"{key}:1: not an SSH public key")):
        authorized_keys(str(key), tmp_path)


def test_mirror_comes_from_host_sources(tmp_path: Path):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://security.invalid/debian-security/\nSuites: bookworm-security\nComponents: main\n\n"
        "Enabled: no\nTypes: deb\nURIs: http://disabled.invalid/x\nSuites: bookworm\n")
    (d / "sources.list").write_text("# nothing\n")
    srcs = mirror.sources("bookworm", ("main", "non-free-firmware"), etc=d)
    assert [s.line() for s in srcs] == [
        "deb http://mirror.invalid/debian bookworm main non-free-firmware",
        "deb http://mirror.invalid/debian bookworm-updates main non-free-firmware",
        "deb http://security.invalid/debian-security bookworm-security main non-free-firmware",
    ]


def test_recipe_mirror_wins_and_missing_mirror_is_an_error(tmp_path: Path):
    d = tmp_path / "apt"
    (d / "sources.list.d").mkdir(parents=True)
    (d / "sources.list").write_text("deb [arch=amd64] http://one.invalid/debian bookworm main\n")
    assert mirror.sources("bookworm", ("main",), etc=d)[0].uri == "http://one.invalid/debian"
    assert mirror.sources("bookworm", ("main",), mirror="http://two.invalid/d", etc=d)[0].uri == "http://two.invalid/d"
    with pytest.raises(RecipeError, match="no apt source for 'trixie'"):
        mirror.sources("trixie", ("main",), etc=d)


def test_clean_drops_caches_and_keeps_outputs_unless_all(tmp_path: Path):
    for marker in ("pyproject.toml", "tasks.py"):    # a checkout: its cache is .cache/
        (tmp_path / marker).write_text("")
    (tmp_path / ".cache" / "rootfs" / "k").mkdir(parents=True)
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "x.img").write_bytes(b"img")
    build.clean(root=tmp_path)
    assert not (tmp_path / ".cache" / "rootfs").exists()
    assert (tmp_path / "build" / "x.img").exists()
    build.clean(everything=True, root=tmp_path)
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("board, key, value, message", [
    ("qemu-virt", "disk", "scsi", "qemu.disk: 'scsi' must be 'virtio' or 'sd'"),
    ("cubieboard2", "header", "toc0", "uboot.header: 'toc0' must be 'egon'"),
])
def test_a_boards_choices_are_checked_when_it_is_loaded(tmp_path: Path, board: str, key: str, value: str,
                                                         message: str):
    (tmp_path / "board").mkdir()
    text = (ROOT / "board" / f"{board}.yaml").read_text()
    changed = re.sub(rf"^(\s+{key}:) \S+", rf"\1 {value}", text, count=1, flags=re.M)
    assert changed != text
    (tmp_path / "board" / f"{board}.yaml").write_text(changed)
    with pytest.raises(RecipeError, match=re.escape(f"{tmp_path}/board/{board}.yaml: {message}")):
        config.load_board(board, tmp_path)


def test_the_cache_is_a_setting(tmp_path: Path):
    assert config.load("booth").cache == ROOT / ".cache"
    assert config.load("booth", cache=tmp_path).cache == tmp_path
    assert build.verify("booth", cache=tmp_path).cfg.cache == tmp_path

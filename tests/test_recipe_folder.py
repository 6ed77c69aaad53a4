"""Unit tier: a recipe anywhere finds its overlays, static sites, bundles and passphrase file in its own folder
(the tool's by name); the benchmark's recipe and a folder `init` writes pass the build's checks (--dry-run)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from appliance import ROOT, build, config, starter
from appliance.bench import build as bench_build
from appliance.build import configure
from appliance.errors import RecipeError

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)     # the user is not in the checkout
    monkeypatch.delenv("APPLIANCE_WIFI_PASSPHRASE", raising=False)


def booth_folder(top: Path) -> Path:
    """A booth of one's own: the shipped recipe with an overlay of its own, a static site of its own and WPA2
    with a passphrase file, all beside the recipe."""
    (top / "overlays/mine/etc").mkdir(parents=True)
    (top / "overlays/mine/etc/motd").write_text("my booth\n")
    (top / "mysite").mkdir()
    (top / "mysite/index.html").write_text("<h1>mine</h1>\n")
    (top / "wifi-passphrase").write_text("a passphrase of mine\n")
    data = config.read_yaml(ROOT / "recipes/booth.yaml")
    data.update(name="mine", overlays=["base", "booth", "mine"])
    data["wifi"].update(open=False, passphrase_file="wifi-passphrase")
    data["sites"][1]["static"] = "./mysite"
    (top / "booth.yaml").write_text(config.yaml.safe_dump(data))
    return top / "booth.yaml"


def test_a_booth_folder_outside_the_checkout_passes_the_dry_run(tmp_path: Path) -> None:
    recipe = booth_folder(tmp_path / "my booth")
    assert build.build(str(recipe), dry_run=True) is None
    ctx = build.verify(str(recipe))
    assert configure.overlay_dirs(ctx.cfg) == [ROOT / "overlays/base", ROOT / "overlays/booth",
                                               recipe.parent / "overlays/mine"]
    assert any(r.rel == "etc/motd" and r.data == b"my booth\n" for r in ctx.rendered)
    from appliance.build.guest import static_dir
    assert static_dir(ctx.cfg, 1) == recipe.parent / "mysite"
    assert static_dir(ctx.cfg, 2) == ROOT / "guest/make"          # a bare name: the site the tool ships
    assert config.wifi_passphrase(ctx.cfg.recipe, recipe) == "a passphrase of mine"
    assert ctx.out_dir == recipe.parent / "build"                 # ./build beside a recipe elsewhere


def test_a_recipe_in_the_checkout_builds_into_its_build_folder() -> None:
    assert build.verify("booth").out_dir == ROOT / "build"
    assert build.verify("booth", out_dir=Path("/tmp/x")).out_dir == Path("/tmp/x")


def test_the_recipe_folders_overlay_of_a_shipped_name_wins(tmp_path: Path) -> None:
    recipe = booth_folder(tmp_path)
    (tmp_path / "overlays/base/etc").mkdir(parents=True)
    assert configure.overlay_dirs(config.load(str(recipe)))[0] == tmp_path / "overlays/base"


@pytest.mark.parametrize("inside", [False, True], ids=["elsewhere", "in-build"])
def test_the_benchmarks_recipe_passes_the_dry_run(tmp_path: Path, inside: bool) -> None:
    """`invoke bench` copies the booth recipe into a folder of its own (build/bench/): it must still check out."""
    (ROOT / "build").mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=ROOT / "build" if inside else tmp_path, prefix="bench-") as d:
        path, stamp = bench_build.recipe(Path(d))
        ctx = build.verify(str(path), authorized_keys=None)
        assert stamp.parent.parent in configure.overlay_dirs(ctx.cfg)
        assert any(r.rel == "etc/bench-stamp" for r in ctx.rendered)


def test_the_benchmarks_image_has_a_visitor_from_power_on(tmp_path: Path) -> None:
    """The bench image loads the simulated radios once the booth's early coldplug of USB devices has run and starts the visitor (the one copy in
    appliance/emulate/visitor.py) early, pointed at the default site's first name on the booth's SSID."""
    path, stamp = bench_build.recipe(tmp_path)
    overlay = stamp.parent.parent
    recipe = config.load("booth").recipe
    script = overlay / "usr/local/sbin/appliance-visitor"
    assert script.read_bytes() == (ROOT / "appliance/emulate/visitor.py").read_bytes()
    assert script.stat().st_mode & 0o111
    unit = (overlay / "etc/systemd/system/appliance-bench-visitor.service").read_text()
    assert f'--ssid "{recipe.wifi.ssid}"' in unit and f"--url http://{recipe.sites[0].names[0]}/" in unit
    assert "DefaultDependencies=no" in unit and "ExecStartPre=/sbin/modprobe mac80211_hwsim" in unit
    assert "After=appliance-coldplug-wifi.service" in unit.splitlines()
    link = overlay / "etc/systemd/system/sysinit.target.wants/appliance-bench-visitor.service"
    assert (link.parent / link.readlink()).resolve() == (overlay / "etc/systemd/system/appliance-bench-visitor."
                                                         "service").resolve()
    bench_build.recipe(tmp_path)     # again, as every bench run does: the link is made anew
    assert link.is_symlink()


def test_the_benchmarks_visitor_needs_an_open_network(tmp_path: Path) -> None:
    data = config.read_yaml(ROOT / "recipes/booth.yaml")
    data["wifi"]["open"] = False
    with pytest.raises(RecipeError, match="wifi.open is false"):
        bench_build.visitor_overlay(tmp_path, data)


@pytest.mark.parametrize("overlay, message", [
    ("../../etc", "overlays[2]: '../../etc' leaves the recipe's folder (an overlay is copied into the image, as "
                  "root's)"),
    ("/etc", "overlays[2]: '/etc' leaves the recipe's folder (an overlay is copied into the image, as root's)"),
    ("./nothing", "overlays[2]: no overlay directory nothing"),
    ("boot", "overlays[2]: no overlay 'boot' beside the recipe (overlays/boot/) or among the tool's (base, booth, "
             "emulated-h3); did you mean 'booth'?"),
])
def test_an_overlay_that_leaves_the_folder_or_is_not_there_is_one_line(tmp_path: Path, overlay: str,
                                                                       message: str) -> None:
    (tmp_path / "r.yaml").write_text(f"name: r\nboard: cubieboard2\noverlays: [base, booth, {overlay}]\n"
                                     "wifi: {open: true}\n")
    with pytest.raises(RecipeError) as err:
        build.verify(str(tmp_path / "r.yaml"))
    assert str(err.value) == "r.yaml: " + message


def test_a_symlink_out_of_the_folder_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "etc").symlink_to("/etc")
    (tmp_path / "r.yaml").write_text("name: r\nboard: cubieboard2\noverlays: [./etc]\n")
    with pytest.raises(RecipeError, match=r"^r.yaml: overlays\[0\]: './etc' leaves the recipe's folder "):
        config.load(str(tmp_path / "r.yaml"))


def test_an_unknown_recipe_name_lists_the_recipes() -> None:
    with pytest.raises(RecipeError) as err:
        config.load("boot")
    assert str(err.value) == ("no such recipe 'boot'; did you mean 'booth'? (recipes: booth, booth-orangepi-pc; "
                              "or a path to a .yaml file)")
    with pytest.raises(RecipeError) as err:
        config.load("xyzzy")
    assert str(err.value) == "no such recipe 'xyzzy' (recipes: booth, booth-orangepi-pc; or a path to a .yaml file)"


def test_a_key_written_twice_on_one_line_is_refused(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("name: r\nboard: cubieboard2\nimage: {boot_size: 64MiB, boot_size: 1GiB}\n")
    with pytest.raises(RecipeError) as err:
        config.load(str(tmp_path / "r.yaml"))
    assert str(err.value) == "r.yaml: line 3: key 'boot_size' is already set at line 3 (a key may appear once)"


def test_init_writes_a_folder_that_passes_the_dry_run(tmp_path: Path) -> None:
    recipe = starter.init(Path("My Booth"))           # relative to where the user is
    assert recipe == tmp_path / "My Booth" / "booth.yaml"
    assert sorted(str(p.relative_to(recipe.parent)) for p in recipe.parent.rglob("*")) == [
        "README.md", "booth.yaml", "site", "site/index.html"]
    assert build.build(str(recipe), dry_run=True) is None
    ctx = build.verify(str(recipe))
    assert ctx.cfg.image_name == "cubieboard2-my-booth"
    assert [s.name for s in ctx.cfg.recipe.sites] == ["home", "demo", "about", "make"]
    from appliance.build.guest import static_dir
    assert [static_dir(ctx.cfg, i) for i in range(4)] == [recipe.parent / "site", None, ROOT / "guest/about",
                                                         ROOT / "guest/make"]
    assert not list(tmp_path.glob(".*"))              # no working folder left beside it


def test_init_takes_an_empty_folder_and_refuses_one_with_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    assert starter.init(tmp_path / "empty").is_file()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "notes.txt").write_text("mine\n")
    with pytest.raises(RecipeError) as err:
        starter.init(tmp_path / "used")
    assert str(err.value) == f"{tmp_path}/used: already exists and is not an empty folder (init writes a new booth " \
                             "folder)"
    assert [p.name for p in (tmp_path / "used").iterdir()] == ["notes.txt"]


PACKAGES = """\
Package: hostapd
Version: 2:2.10-12
Architecture: armhf

Package: exim4-daemon-light
Version: 4.96-15
Provides: mail-transport-agent, exim4-localscanapi-6.0
"""


def test_a_package_not_in_the_suites_index_is_refused_when_the_index_is_cached(tmp_path: Path) -> None:
    from appliance.build import rootfs

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nboard: cubieboard2\nmirror: http://mirror.invalid/debian\nwifi: {open: true}\n"
                      "packages: [hostapd, mail-transport-agent, hostpad]\n")
    cfg = config.load(str(recipe), cache=tmp_path / "cache")
    assert not rootfs.check_packages(cfg, rootfs.wanted_sources(cfg))     # never built: nothing to check against
    index = rootfs.index_dir(cfg, rootfs.wanted_sources(cfg))
    (index / "lists").mkdir(parents=True)
    (index / "lists" / "mirror.invalid_debian_dists_bookworm_main_binary-armhf_Packages").write_text(PACKAGES)
    rootfs.keep_names(index)                     # what the build's probe of the index leaves in the cache
    with pytest.raises(RecipeError) as err:
        build.verify(str(recipe), cache=tmp_path / "cache")
    assert str(err.value) == "r.yaml: packages[2]: 'hostpad' is not in bookworm's armhf index (main); did you mean " \
                             "'hostapd'?"
    # a build checks against the index it reads itself (a newer one, maybe), right before installing anything
    build.verify(str(recipe), cache=tmp_path / "cache", dry_run=False)
    recipe.write_text(recipe.read_text().replace(", hostpad", ""))
    assert rootfs.check_packages(config.load(str(recipe), cache=tmp_path / "cache"), rootfs.wanted_sources(cfg))


def test_the_dry_run_ends_with_a_summary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))        # no key of the user's: the summary says so
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    recipe = booth_folder(tmp_path / "mine")
    build.build(str(recipe), dry_run=True)
    err = capsys.readouterr().err.splitlines()
    n = len(rootfs_packages(recipe))
    assert err[-8:-1] == [
        "dry run: the recipe, boards, overlays and templates check out; nothing was built. cubieboard2-mine would be:",
        "  board:    cubieboard2 (also boots qemu-virt)",
        f"  suite:    bookworm armhf (main, non-free-firmware), {n} packages "
        f"({len(config.read_yaml(recipe)['packages'])} of the recipe's)",
        "  sites:    demo (the demo game, on demand), about (static mine/mysite), make (the tool's make site, "
        "on demand)",
        "  wifi:     'Xen Booth', WPA2, channel 6, DE",
        "  login:    none (no key of yours was found: none in ssh-agent, no ~/.ssh/id_*.pub)",
        "  image:    mine/build/cubieboard2-mine.img",
    ]


def rootfs_packages(recipe: Path) -> list[str]:
    from appliance.build import rootfs

    return rootfs.packages(config.load(str(recipe)))


def test_a_boot_partition_too_small_for_its_files_is_refused_before_mkfs(tmp_path: Path) -> None:
    from appliance.build.image import check_boot_room
    from appliance.errors import BuildError

    files = {"xen": tmp_path / "xen", "vmlinuz": tmp_path / "vmlinuz"}
    with open(files["xen"], "wb") as f:
        f.truncate(1 << 20)
    with open(files["vmlinuz"], "wb") as f:
        f.truncate(14 << 20)
    check_boot_room(files, 18 << 20, "r.yaml")
    with pytest.raises(BuildError) as err:
        check_boot_room(files, 17 << 20, "r.yaml")
    assert str(err.value) == ("r.yaml: image.boot_size: 17MiB cannot hold the boot files (Xen, the kernel, the "
                              "initramfs, the DTBs, boot.scr): they need 18MiB")


def test_an_overlay_of_the_folder_that_is_a_symlink_out_of_it_is_refused(tmp_path: Path) -> None:
    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "base").symlink_to("/etc")
    (tmp_path / "r.yaml").write_text("name: r\nboard: cubieboard2\noverlays: [base]\n")
    with pytest.raises(RecipeError) as err:
        config.load(str(tmp_path / "r.yaml"))
    assert str(err.value) == "r.yaml: overlays[0]: 'overlays/base' leaves the recipe's folder (an overlay is copied " \
                             "into the image, as root's)"


def test_the_cold_builds_time_splits_into_mmdebstrap_and_the_rest() -> None:
    steps = {"Checking recipe bench": 0.1, "Installing 120 packages into an armhf bookworm tree (mmdebstrap, qemu-user)":
             120.0, "Making the filesystems and the image": 9.0}
    got = bench_build.split(steps, 160.0)
    assert got == {"cold build: mmdebstrap, s": 120.0, "cold build: the rest, s": 40.0,
                   "cold build: mmdebstrap's share, %": 75.0}
    assert bench_build.split({}, 0.0)["cold build: mmdebstrap's share, %"] == 0.0   # a build with no base to make

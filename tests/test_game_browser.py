"""The demo guest's page in a real browser: headless Chromium (Debian's chromium and chromium-driver) driven by
Selenium, at a phone's size, as a visitor would use it.

The page and its scripts are served from guest/site/ by an HTTP server on loopback. `/cgi-bin/status` there is not
the guest's own CGI script (that one reads the guest's /etc/guest-version and /proc/uptime): it answers a JSON
fixture of the same shape, which a test may change. The real page through the emulated booth is the system tier's.
The game's `?tiles=…` (the first board) and `?seed=N` (the new tiles) make each start known, so a test can force
a merge.
"""

from __future__ import annotations

import functools
import json
import shutil
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from appliance import ROOT

pytestmark = pytest.mark.browser

SITE = ROOT / "guest" / "site"
ARTIFACTS = ROOT / "build" / "test" / "artifacts"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
DEADLINE = 20      # seconds any one thing may take to show in the page (the host may be busy)
STATUS = {"name": "demo", "version": "1.0-0123456789", "kernel": "6.1.0-test-armmp", "uptime": 125}


class _Handler(SimpleHTTPRequestHandler):
    status: dict[str, Any] = {}

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/cgi-bin/status":
            return super().do_GET()
        body = json.dumps(self.status).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, type[_Handler]]]:
    """guest/site/ on a random loopback port: its URL, and the handler class whose `status` it answers."""
    handler = type("Handler", (_Handler,), {"status": dict(STATUS)})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(SITE)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", handler
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    for path in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(path):
            pytest.fail(f"{path} is missing: ./setup.sh installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run"):
        options.add_argument(arg)
    # A phone: its screen's size, a touch screen, and the page's viewport meta honoured.
    options.add_experimental_option("mobileEmulation", {"deviceMetrics": {
        "width": 390, "height": 844, "pixelRatio": 2, "touch": True, "mobile": True}})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(DEADLINE)
    yield driver
    driver.quit()


@pytest.fixture
def page(server: tuple[str, type[_Handler]], browser: WebDriver) -> Callable[..., WebDriver]:
    """Open the page as a first-time visitor (nothing in localStorage), or as one who has seen the how-to."""
    url, handler = server
    handler.status = dict(STATUS)

    def open_page(query: str = "", *, seen_howto: bool = True) -> WebDriver:
        browser.get(url)
        browser.execute_script("localStorage.clear();" + ("localStorage.setItem('2048-howto-seen', '1');"
                                                          if seen_howto else ""))
        browser.get(url + query)
        until(browser, lambda d: len(cells(d)) == 16, "the board has 16 cells")
        return browser

    return open_page


def until(browser: WebDriver, condition: Callable[[WebDriver], Any], what: str) -> Any:
    return WebDriverWait(browser, DEADLINE).until(condition, f"within {DEADLINE} s: {what}")


def cells(browser: WebDriver) -> list[int]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#board [role=gridcell]'), c => Number(c.textContent) || 0)")


def text(browser: WebDriver, id_: str) -> str:
    return browser.find_element(By.ID, id_).text


def press(browser: WebDriver, key: str) -> None:
    webdriver.ActionChains(browser).send_keys(key).perform()


def tiles(*values: int) -> str:
    """A ?tiles= query: the values given from the top-left, row by row, the rest of the 16 cells empty."""
    return "?seed=1&tiles=" + ",".join(str(v) for v in [*values, *[0] * (16 - len(values))])


def swipe(browser: WebDriver, dx: int, dy: int) -> None:
    """A finger down in the middle of the board, moved by (dx, dy) in small steps, and lifted."""
    finger = PointerInput(interaction.POINTER_TOUCH, "finger")
    actions = ActionBuilder(browser, mouse=finger)
    actions.pointer_action.move_to(browser.find_element(By.ID, "board")).pointer_down()
    for _ in range(4):
        actions.pointer_action.move_by(dx // 4, dy // 4)
    actions.pointer_action.pointer_up()
    actions.perform()


def test_howto_on_the_first_visit_only(page: Callable[..., WebDriver]) -> None:
    b = page(seen_howto=False)
    howto = b.find_element(By.ID, "howto")
    until(b, lambda d: howto.is_displayed(), "the how-to shows on the first visit")
    words = howto.text.lower()
    assert "swipe" in words and "arrow keys" in words and "same number" in words and "2048" in words, words
    before = cells(b)
    press(b, Keys.ARROW_LEFT)
    press(b, Keys.ARROW_DOWN)
    assert cells(b) == before, "the tiles moved behind the how-to"
    b.find_element(By.ID, "howto-ok").click()
    until(b, lambda d: not howto.is_displayed(), "the how-to goes once dismissed")
    b.refresh()
    until(b, lambda d: len(cells(d)) == 16, "the board is back after a reload")
    assert not b.find_element(By.ID, "howto").is_displayed(), "the how-to came back after it was dismissed"
    b.find_element(By.ID, "help").click()
    until(b, lambda d: d.find_element(By.ID, "howto").is_displayed(), "'How to play' brings the how-to back")
    press(b, Keys.ESCAPE)
    until(b, lambda d: not d.find_element(By.ID, "howto").is_displayed(), "Escape closes the how-to")


def test_arrow_keys_and_wasd_move_and_merge(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(2, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4))
    assert cells(b) == [2, 2, *[0] * 13, 4]
    assert (text(b, "score"), text(b, "best")) == ("0", "0")
    press(b, Keys.ARROW_LEFT)
    until(b, lambda d: cells(d)[0] == 4 and cells(d)[12] == 4, "ArrowLeft merges 2 and 2 and slides the 4")
    assert sum(v > 0 for v in cells(b)) == 3, f"one new tile after a move: {cells(b)}"
    until(b, lambda d: text(d, "score") == "4", "the merge scores 4")
    assert text(b, "best") == "4"
    assert b.find_element(By.ID, "score").get_attribute("aria-live") == "polite"

    b = page(tiles(2))
    for key, cell in (("s", 12), ("d", 15), ("w", 3), ("a", 0)):
        before = cells(b)
        press(b, key)
        until(b, lambda d, before=before, cell=cell: cells(d) != before and cells(d)[cell] >= 2,
              f"'{key}' slides the tiles towards cell {cell}")

    b.find_element(By.ID, "new").click()
    until(b, lambda d: sum(v > 0 for v in cells(d)) == 2 and text(d, "score") == "0", "a new game: two tiles, 0")


def test_best_score_is_remembered(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(8, 8))
    press(b, Keys.ARROW_RIGHT)
    until(b, lambda d: text(d, "best") == "16", "the merge makes the best score 16")
    b.get(b.current_url.split("?")[0])
    until(b, lambda d: text(d, "best") == "16" and text(d, "score") == "0", "the best score after a reload")


def test_swipe_moves_the_tiles(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(2))
    swipe(b, 0, 0)
    assert cells(b)[0] == 2 and sum(v > 0 for v in cells(b)) == 1, "a tap moved the tiles"
    swipe(b, 160, 0)
    until(b, lambda d: cells(d)[3] == 2, "a swipe to the right slides the tile right")
    swipe(b, 0, 160)
    until(b, lambda d: cells(d)[15] == 2 and sum(v > 0 for v in cells(d)) == 3, "a swipe down slides it down")
    assert b.execute_script("return scrollY") == 0, "the page scrolled while swiping"


def test_win_then_keep_going(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(1024, 1024))
    press(b, Keys.ARROW_LEFT)
    until(b, lambda d: "2048" in text(d, "message"), "a 2048 tile wins")
    keep = b.find_element(By.ID, "keep")
    assert keep.is_displayed()
    board = cells(b)
    press(b, Keys.ARROW_RIGHT)
    assert cells(b) == board, "the tiles moved before 'Keep going'"
    keep.click()
    press(b, Keys.ARROW_RIGHT)
    until(b, lambda d: cells(d)[3] == 2048, "after 'Keep going' the game goes on")
    assert "2048" not in text(b, "message")


def test_game_over_when_no_move_is_left(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(2, 4, 2, 4, 4, 2, 4, 2, 32, 4, 2, 4, 16, 64, 8, 8))
    assert "game over" not in text(b, "message").lower()
    press(b, Keys.ARROW_RIGHT)        # 8 and 8 merge; the new tile (a 2 or a 4) goes in the only empty cell
    until(b, lambda d: "game over" in text(d, "message").lower(), "no move left: game over")
    board = cells(b)
    for key in (Keys.ARROW_LEFT, Keys.ARROW_UP, Keys.ARROW_DOWN):
        press(b, key)
    assert cells(b) == board


def test_footer_shows_the_guests_status(page: Callable[..., WebDriver], server: tuple[str, type[_Handler]]
                                        ) -> None:
    b = page()
    until(b, lambda d: STATUS["version"] in text(d, "guest"), "the footer names the guest's version")
    assert "demo" in text(b, "guest") and STATUS["kernel"] in text(b, "guest")
    until(b, lambda d: "2 min" in text(d, "uptime"), "the footer shows the uptime (125 s and counting)")
    lifetime = b.find_element(By.ID, "lifetime")
    assert not lifetime.is_displayed() and lifetime.get_attribute("textContent") == "", \
        f"lifetime figures that the status lacks: {lifetime.get_attribute('textContent')!r}"

    server[1].status = {**STATUS, "woken": 1_700_000_000, "wake_ms": 420, "requests": 17, "wakes_today": 3}
    b.refresh()
    lifetime = b.find_element(By.ID, "lifetime")
    until(b, lambda d: lifetime.is_displayed(), "the lifetime figures the status has")
    for words in ("Woken at", "0.4 s", "17 requests", "woken 3 times today"):
        assert words in lifetime.text, lifetime.text


def test_fits_a_phone_screenshot(page: Callable[..., WebDriver]) -> None:
    b = page(tiles(2, 2, 4, 8, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 32, 64))
    assert b.title and "2048" in b.title
    press(b, Keys.ARROW_LEFT)
    until(b, lambda d: text(d, "score") == "4", "a merge before the screenshot")
    until(b, lambda d: STATUS["version"] in text(d, "guest"), "the footer filled in")
    until(b, lambda d: d.execute_script("return document.getAnimations().length") == 0, "the new tile popped")
    width = b.execute_script("return innerWidth")
    assert b.execute_script("return document.documentElement.scrollWidth") <= width, "wider than the phone"
    rect = b.execute_script("return document.getElementById('board').getBoundingClientRect().toJSON()")
    assert rect["width"] >= 0.8 * width and rect["right"] <= width, f"the board on a {width} px screen: {rect}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "game.png"
    shot.unlink(missing_ok=True)
    assert b.save_screenshot(str(shot))
    assert Path(shot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"\nscreenshot: {shot}")

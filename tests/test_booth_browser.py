"""The game in a real browser through the emulated booth (system tier): headless Chromium, at a phone's size,
opens the page the board serves (the host's port through dom0's SSH to the game's service address, so the
first visit wakes the sleeping game), as a first-time visitor: the how-to shows, the arrow keys move the
tiles, and the footer has the guest's lifetime figures from dom0's guest manager. The screenshot is kept in
build/test/artifacts/booth-game.png.
"""

from __future__ import annotations

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from test_game_browser import ARTIFACTS, DEADLINE, browser, cells, press, until  # noqa: F401 (a fixture)

pytestmark = pytest.mark.system

WAKE_S = 300       # the first visit may wake the game: a guest boot under TCG


def test_the_game_through_the_emulated_booth(booted_board, browser: WebDriver):  # noqa: F811
    url = f"http://127.0.0.1:{booted_board.http_port}/"
    browser.set_page_load_timeout(WAKE_S)
    try:
        browser.get(url)
        browser.execute_script("localStorage.clear();")
        browser.get(url)
    finally:
        browser.set_page_load_timeout(DEADLINE)
    until(browser, lambda d: len(cells(d)) == 16, "the board has 16 cells")
    howto = browser.find_element(By.ID, "howto")
    until(browser, lambda d: howto.is_displayed(), "the how-to on a first visit")
    browser.find_element(By.ID, "howto-ok").click()
    until(browser, lambda d: not howto.is_displayed(), "the how-to dismissed")
    lifetime = browser.find_element(By.ID, "lifetime")
    until(browser, lambda d: lifetime.is_displayed() and "Woken at" in lifetime.text, "the lifetime figures")
    assert "the wake took" in lifetime.text and "woken" in lifetime.text, lifetime.text
    assert "(status unavailable)" not in browser.find_element(By.ID, "guest").text
    before = cells(browser)
    for key in (Keys.ARROW_LEFT, Keys.ARROW_UP, Keys.ARROW_RIGHT, Keys.ARROW_DOWN):
        press(browser, key)
        if cells(browser) != before:
            break
    assert cells(browser) != before, "no arrow key moved a tile"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "booth-game.png"
    assert browser.save_screenshot(str(shot))
    print(f"\nscreenshot: {shot} ({lifetime.text})")

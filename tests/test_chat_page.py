"""The chat page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a NutriBot server on loopback. A warfarin patient asks about greens: the vitamin K
warning must show above the streamed answer. The screenshot is saved in the test's tmp dir.

Skips, with the reason, where no Chromium or chromedriver is installed. CI's .ci/run installs both and
sets NUTRIBOT_REQUIRE_BROWSER=1, under which a missing browser fails the test instead: a green CI
run means the page was driven."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

from nutribot.server import create_app
from nutribot_helpers import tiny_retriever
from tiny_base import require_embedded_tokenizer

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server_url(tmp_path):
    import uvicorn

    require_browser()  # first: no server is started for a test that skips
    require_embedded_tokenizer()
    retriever = tiny_retriever(tmp_path, "clara", max_new_tokens=12)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(retriever), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("the NutriBot server did not start within 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def require_browser() -> None:
    if CHROMIUM is None or DRIVER is None:
        reason = "no Chromium/chromedriver installed (apt-get install chromium chromium-driver)"
        if os.environ.get("NUTRIBOT_REQUIRE_BROWSER") == "1":
            pytest.fail(f"NUTRIBOT_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)


def test_warfarin_patient_sees_the_vitamin_k_warning_above_the_streamed_answer(server_url, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1400"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server_url + "/")
        assert driver.title == "NutriBot"
        driver.find_element(By.ID, "patient").send_keys("68-year-old on warfarin for atrial fibrillation")
        driver.find_element(By.ID, "question").send_keys("Which greens should I eat more of?")
        driver.find_element(By.ID, "ask").click()
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "" and d.find_element(By.ID, "answer").text)
        warnings = driver.find_element(By.ID, "warnings")
        answer = driver.find_element(By.ID, "answer")
        assert "vitamin k" in warnings.text.lower() and "warfarin" in warnings.text.lower()
        assert warnings.location["y"] < answer.location["y"]
        assert "warfarin" in driver.find_element(By.ID, "contraindications").text.lower()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#documents .doc")) == 5
        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()

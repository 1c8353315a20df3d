"""The chat page in a real browser: headless Chromium (Debian's chromium + chromium-driver, driven by
selenium) against a NutriBot server on loopback, answering with the shipped checkpoint over a few of
the knowledge base's documents. A warfarin patient asks about greens: the vitamin K warning must show
above the answer, before its first word, and the answer must arrive in pieces as it is generated.
The screenshot is saved in the test's tmp dir.

Skips, with the reason, where no Chromium or chromedriver is installed. CI's .ci/run installs both and
sets NUTRIBOT_REQUIRE_BROWSER=1, under which a missing browser fails the test instead: a green CI
run means the page was driven."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from nutribot.retriever import SHIPPED_CHECKPOINT, ClaraRetriever
from nutribot.server import create_app
from tiny_base import require_embedded_tokenizer

CHROMIUM = next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)
DRIVER = shutil.which("chromedriver")
KB = Path(__file__).resolve().parents[1] / "data" / "nutrition_kb"
# The warfarin documents, the greens the patient asks about, and some that have nothing to do with it.
KB_IDS = {"kb-0001", "kb-0002", "kb-0003", "kb-0079", "kb-0080", "kb-0098", "kb-0104", "kb-0105"}
# Records the page after every change the browser renders: the answer so far, how many warnings show.
RECORD_CHANGES = """
window.pageStates = [];
const answer = document.getElementById("answer"), warnings = document.getElementById("warnings");
new MutationObserver(() => window.pageStates.push({answer: answer.textContent, warnings: warnings.children.length}))
  .observe(document.getElementById("answer"), {childList: true, characterData: true, subtree: true});
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def few_documents(folder: Path) -> Path:
    folder.mkdir()
    rows = [line for line in (KB / "documents.jsonl").read_text().splitlines() if json.loads(line)["id"] in KB_IDS]
    (folder / "documents.jsonl").write_text("\n".join(rows) + "\n")
    shutil.copy(KB / "vocabulary.json", folder / "vocabulary.json")
    return folder


@pytest.fixture
def server_url(tmp_path):
    import uvicorn

    require_browser()  # first: no server is started for a test that skips
    require_embedded_tokenizer()  # the shipped checkpoint's base is the embedded SmolLM2
    retriever = ClaraRetriever(few_documents(tmp_path / "kb"), SHIPPED_CHECKPOINT, "clara",
                               cache_dir=tmp_path / "cache", max_new_tokens=24, progress=False)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(retriever), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("the NutriBot server did not start within 60 s")
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
    # The background-networking flags keep Chromium from calling out: on a closed network those calls fail.
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1100,1400",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        driver.get(server_url + "/")
        assert driver.title == "NutriBot"
        driver.execute_script(RECORD_CHANGES)
        driver.find_element(By.ID, "patient").send_keys("68-year-old on warfarin for atrial fibrillation")
        driver.find_element(By.ID, "question").send_keys("Which greens should I eat more of?")
        driver.find_element(By.ID, "ask").click()
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_element(By.ID, "status").text == "" and d.find_element(By.ID, "answer").text)
        warnings = driver.find_element(By.ID, "warnings")
        answer = driver.find_element(By.ID, "answer")
        assert "vitamin k" in warnings.text.lower() and "warfarin" in warnings.text.lower()
        assert warnings.location["y"] < answer.location["y"]
        assert "warfarin" in driver.find_element(By.ID, "contraindications").text.lower()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#documents .doc")) == 5

        # Streamed: the answer grew piece by piece, each state extending the last, warnings already shown.
        states = [s for s in driver.execute_script("return window.pageStates") if s["answer"]]
        growing = [s["answer"] for s in states]
        assert len(set(growing)) >= 3, f"the answer arrived in {len(set(growing))} piece(s)"
        assert all(b.startswith(a) for a, b in zip(growing, growing[1:]))
        assert all(s["warnings"] > 0 for s in states)
        final = answer.text.strip()
        assert final and final != "(no answer generated)" and growing[-1].strip() == final

        shot = tmp_path / "chat_page.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        driver.quit()

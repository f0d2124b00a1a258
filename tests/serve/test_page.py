"""The chat page in headless Chromium (Debian's /usr/bin/chromium driven by Playwright's Python package): type a
prompt, watch coloured tokens stream in, hover one and read its score — the probe's score of that token."""

from __future__ import annotations

import os
import shutil

import pytest
from playwright import sync_api
from waiting import HANG_GUARD

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = HANG_GUARD * 1000  # Playwright's waits (5 s for an expect, 30 s for the rest) are hang guards here too


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail("no Chromium: scripts/setup.sh installs Debian's chromium (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        sync_api.expect.set_options(timeout=WAIT_MS)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=WAIT_MS)
        yield browser
        browser.close()


def test_tokens_stream_in_coloured_and_hover_shows_the_score(browser, live, lm):
    page = browser.new_page()
    page.set_default_timeout(WAIT_MS)
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.goto(live.url + "/")
    sync_api.expect(page.locator("#model")).to_contain_text("tiny")
    sync_api.expect(page.locator("#probe-status")).to_contain_text("probe on block 1")
    page.fill("#max-tokens", "16")
    page.fill("#prompt", "Tell me about Ada.")
    page.click("#send")
    tokens = page.locator(".message.assistant .token")
    sync_api.expect(page.locator(".message.assistant .finish")).to_contain_text("finish: length")
    n = tokens.count()
    assert n >= 8  # tokens whose text is a partial character arrive with the next one

    # the colours and scores are the probe's: compare with the engine on the same conversation
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me about Ada."}], tokenize=True)
    expected = lm.generate([ids], max_new_tokens=16)[0]
    shown = [float(tokens.nth(i).get_attribute("data-score")) for i in range(n)]
    assert all(any(abs(s - e) < 2e-3 for e in expected.scores) for s in shown)
    assert all(tokens.nth(i).evaluate("el => getComputedStyle(el).backgroundColor") != "rgba(0, 0, 0, 0)"
               for i in range(n))
    assert "".join(tokens.nth(i).text_content() for i in range(n)) == expected.text

    tokens.nth(2).hover()
    tip = page.locator("#tooltip")
    sync_api.expect(tip).to_be_visible()
    assert tip.text_content() == f"score {tokens.nth(2).get_attribute('data-score')}"

    # the threshold slider decides which tokens are flagged and which spans are listed
    page.locator("#threshold").fill("0")
    sync_api.expect(page.locator(".message.assistant .token.flagged")).to_have_count(n)
    assert page.locator("#flagged li").count() >= 1
    page.locator("#threshold").fill("1")
    sync_api.expect(page.locator(".message.assistant .token.flagged")).to_have_count(sum(s >= 1 for s in shown))
    assert all(url.startswith(live.url) for url in requests)  # every asset is served locally
    page.close()

"""The chat page at `/` in a real headless Chromium (Debian's, driven by selenium through the
system chromedriver; nothing is downloaded): the page loads, a question about an attached demo
image streams an answer, equal to what `vita_jax.generate` says alone, and a screenshot is
written under the test's tmp dir."""

from __future__ import annotations

import os

import pytest

from tests import serve_helpers
from vita_jax import generate as gen

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)),
    reason=f"needs Debian's chromium and chromedriver ({CHROMIUM}, {DRIVER}); `make setup` "
    "installs them")]
QUESTION, NEW = "What colour is the shape?", 12


@pytest.fixture(scope="module")
def served(tmp_path_factory):
  root = tmp_path_factory.mktemp("serve_browser")
  server, model_dir, tokenizer, media = serve_helpers.start(
      root, "--max_new_tokens=64", "--max_prompt_len=256")
  yield server, model_dir, tokenizer, media["img_00000.png"]
  server.stop()


def test_page_streams_an_answer_about_an_attached_image(served, tmp_path):
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait
  server, model_dir, tokenizer, image = served
  model, tok = gen.load_for_inference(model_dir, tokenizer=tokenizer)
  ids, pixels = gen.build_prompt(model, tok, QUESTION, [image])
  eos = int(model.config.tokens.eos_id)
  want = gen.generate(model, ids, pixels, max_new_tokens=NEW, eos_id=eos)[0].tolist()

  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              "--window-size=1000,800"):
    options.add_argument(arg)
  driver = webdriver.Chrome(service=Service(DRIVER), options=options)
  try:
    driver.get(server.url + "/")
    assert driver.title == "Long-VITA chat"
    driver.find_element(By.ID, "prompt").send_keys(QUESTION)
    driver.find_element(By.ID, "files").send_keys(image)
    field = driver.find_element(By.ID, "max_tokens")
    field.clear()
    field.send_keys(str(NEW))
    # Count the answer's updates: a streamed answer arrives in pieces.
    driver.execute_script(
        "window.updates = 0; new MutationObserver(() => window.updates++).observe("
        "document.getElementById('answer'), {childList: true, characterData: true, "
        "subtree: true});")
    driver.find_element(By.ID, "send").click()
    text = lambda name: driver.execute_script(
        f"return document.getElementById('{name}').textContent")
    WebDriverWait(driver, 600).until(lambda d: "tokens/s" in text("stats") or text("error"))
    assert text("error") == ""
    assert text("answer") == tok.decode([t for t in want if t != eos], skip_special_tokens=True)
    assert f"{ids.shape[1]} prompt tokens, {len(want)} new tokens" in text("stats")
    if text("answer"):
      assert driver.execute_script("return window.updates") >= 1
    shot = tmp_path / "chat.png"
    assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 1000
  finally:
    driver.quit()

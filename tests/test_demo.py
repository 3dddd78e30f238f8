"""`wadi.py demo` (demo.py): its callback draws `sample`'s very images, and the page works in a real headless
browser (selenium driving Debian's chromium and chromedriver). Gradio, selenium and the browser are optional
here (requirements-demo.txt, `apt-get install chromium chromium-driver`): the browser test skips without them,
saying what is missing, but under WADI_CI=1 (.ci/run) a missing piece fails it."""
import importlib.util
import io
import os
import re
import shutil
import socket
import sys
import urllib.request

import numpy as np
import pytest
from PIL import Image

import demo
import wadi
from diffusion import A_T
from pipeline import load_pipeline

PROMPT = "a large red circle at the top left"
CI = os.environ.get("WADI_CI") == "1"


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


def require(pieces):
    """Skip (fail under WADI_CI=1) naming each of `pieces` {what: present} that is missing."""
    missing = [what for what, present in pieces.items() if not present]
    if missing:
        reason = (f"the demo's browser test needs {', '.join(missing)}: pip install -r requirements-demo.txt; "
                  f"apt-get install chromium chromium-driver")
        if CI:
            pytest.fail(f"WADI_CI=1 and {reason}")
        pytest.skip(reason)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_callback_draws_the_images_of_sample(toy, tmp_path):
    images, line = demo.make_generate(toy, A_T, backbone="toy")(PROMPT, 5, 3)
    assert re.fullmatch(r"3 images in \d+\.\d\d s", line), line
    out = tmp_path / "sample"
    assert wadi.main(["sample", "--backbone", "toy", "--prompt", PROMPT, "--num-per-prompt", "3", "--seed", "5",
                      "--out", str(out)]) == 0
    expected = [np.asarray(Image.open(out / f"{i:05d}.png").convert("RGB")) for i in range(3)]
    assert len(images) == 3 and all(a.shape == (32, 32, 3) and a.dtype == np.uint8 for a in images)
    for got, want in zip(images, expected):
        np.testing.assert_array_equal(got, want)  # same pixels, image i from seed 5 + i
    # with a teacher: its 25-step DDIM images beside, and a word the toy never saw is named
    student, _, teacher, teacher_line = demo.make_generate(toy, A_T, toy, 3.0, "toy")("a huge red circle", 0, 1)
    assert len(student) == len(teacher) == 1 and not np.array_equal(student[0], teacher[0])
    assert re.fullmatch(r"1 image in \d+\.\d\d s", teacher_line), teacher_line
    assert "the toy does not know: huge" in demo.make_generate(toy, A_T, backbone="toy")("a huge circle", 0, 1)[1]


def test_without_gradio_the_command_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises ImportError
    assert wadi.main(["demo", "--backbone", "toy"]) == 2
    assert capsys.readouterr().err == "error: the demo needs gradio: pip install -r requirements-demo.txt\n"


def test_page_generates_in_a_headless_browser(toy):
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    require({"gradio": importlib.util.find_spec("gradio"), "selenium": importlib.util.find_spec("selenium"),
             "chromium": chromium, "chromedriver": driver_path})
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = demo.build_app(toy, A_T, backbone="toy")
    port = free_port()
    app.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1024"):
            options.add_argument(flag)
        browser = webdriver.Chrome(options=options, service=Service(driver_path))  # no driver download
        try:
            browser.get(f"http://127.0.0.1:{port}/")
            wait = WebDriverWait(browser, 40, poll_frequency=0.2)
            box = wait.until(lambda b: b.find_element(By.CSS_SELECTOR, "#prompt textarea"))
            box.clear()
            box.send_keys(PROMPT)
            browser.find_element(By.CSS_SELECTOR, "#generate").click()
            width, src = wait.until(lambda b: b.execute_script(
                "const i = document.querySelector('#gallery img');"
                "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.src] : null;"))
            line = wait.until(lambda b: re.search(r"\d+ images? in \d+\.\d\d s",
                                                  b.find_element(By.CSS_SELECTOR, "#time").text))
            assert width == 32  # the toy's image, loaded
            assert line.group().startswith("4 images in ")  # the default count
            assert box.get_attribute("value") == PROMPT
            shown = np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src, timeout=10).read())).convert("RGB"))
            np.testing.assert_array_equal(shown, demo.make_generate(toy, A_T)(PROMPT, 0, 1)[0][0])  # seed 0's
        finally:
            browser.quit()
    finally:
        app.close()

"""The browser in a real headless Chromium (Debian's chromium + chromedriver): click from the runs page to a
planted record through search and see its lineage; an HTML/JS payload renders as inert text. Screenshots of
every step go to tests/artifacts/browse/ (CI keeps them)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.browse.fixture import PLANTED, XSS, BrowseServer, make_runs

ARTIFACTS = Path(__file__).parent / "artifacts" / "browse"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

# `make test` (and so CI) sets DISTILL_REQUIRE_BROWSER=1: there a missing or broken browser is a failure, never a
# silent skip. Elsewhere (a bare `pytest` without the browser installed) the tests skip with the fix.
REQUIRED = os.environ.get("DISTILL_REQUIRE_BROWSER") == "1"
FIX = "install Debian's chromium and chromium-driver with scripts/install-browser.sh (make setup runs it)"


def _unavailable(reason: str):
    if REQUIRED:
        pytest.fail(f"{reason}: {FIX}", pytrace=False)
    pytest.skip(f"{reason}: {FIX}")


@pytest.fixture(scope="module", autouse=True)
def browser_installed():
    if not (CHROMIUM and CHROMEDRIVER):
        _unavailable(f"chromium={CHROMIUM}, chromedriver={CHROMEDRIVER}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    runs = make_runs(tmp_path_factory.mktemp("browse-ui") / "runs")
    with BrowseServer(runs["root"], tmp_path_factory.mktemp("browse-ui-index")) as srv:
        srv.runs = runs
        yield srv


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(flag)
    try:
        drv = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    except Exception as e:  # a broken browser install is an environment problem, said plainly
        _unavailable(f"chromium did not start ({type(e).__name__}: {str(e).splitlines()[0]})")
    drv.set_page_load_timeout(30)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield drv
    drv.quit()


def shot(driver, name: str) -> Path:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 1000
    return path


def find(driver, by, value):
    """Wait for an element of the page a click navigates to (a click does not wait for the load)."""
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, 10).until(EC.presence_of_element_located((by, value)))


def wait_url(driver, part: str) -> None:
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 10).until(EC.url_contains(part))


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException

    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_runs_page_to_planted_record_and_its_lineage(server, driver):
    from selenium.webdriver.common.by import By

    driver.get(server.url + "/")
    shot(driver, "01-runs")
    driver.find_element(By.LINK_TEXT, "r1").click()
    lineage = find(driver, By.ID, "lineage").text
    assert "r1/v2" in lineage and "r1/curated" in lineage and "openai:fake-teacher" in lineage
    shot(driver, "02-run")
    driver.find_element(By.LINK_TEXT, "r1/curated").click()
    box = find(driver, By.ID, "q")
    box.send_keys(PLANTED)
    driver.find_element(By.ID, "go").click()
    wait_url(driver, f"q={PLANTED}")
    results = driver.find_elements(By.CSS_SELECTOR, "#records td.text a")
    assert [r.text for r in results] == [f"Explain why the {PLANTED} collects spoons."]
    shot(driver, "03-search")
    results[0].click()
    assert find(driver, By.ID, "instruction").text == f"Explain why the {PLANTED} collects spoons."
    lineage = driver.find_element(By.ID, "record-lineage").text
    assert "r1/curated" in lineage and "openai:fake-teacher" in lineage and "self_instruct_completion" in lineage
    assert "Task 1: Is there anything I can eat for a breakfast" in driver.find_element(By.ID, "prompt").text
    shot(driver, "04-record")


def test_html_payload_renders_as_inert_text(server, driver):
    from selenium.webdriver.common.by import By

    row = len(server.runs["accepted"]) - 2  # the payload record
    driver.get(f"{server.url}/runs/r1/datasets/curated/records/{row}")
    assert no_alert(driver)
    assert driver.title != "pwned"
    for element_id in ("instruction", "input", "output"):
        el = driver.find_element(By.ID, element_id)
        assert el.text == XSS  # the literal markup, as text
        assert el.find_elements(By.CSS_SELECTOR, "script, img, b") == []  # nothing parsed into elements
    shot(driver, "05-payload-record")
    driver.get(f"{server.url}/runs/r1/datasets/curated?q=pwned")
    assert no_alert(driver) and driver.title != "pwned"
    assert XSS in driver.find_element(By.ID, "records").text
    driver.get(f"{server.url}/runs/r1/eval")
    assert no_alert(driver) and XSS in driver.find_element(By.TAG_NAME, "main").text
    shot(driver, "06-payload-eval")


def test_diff_page_in_browser(server, driver):
    from selenium.webdriver.common.by import By

    driver.get(f"{server.url}/runs/r1/datasets/curated")
    driver.find_element(By.CSS_SELECTOR, "form[action='/diff'] select option[value='r1/v2']").click()
    driver.find_element(By.CSS_SELECTOR, "form[action='/diff'] button").click()
    counts = find(driver, By.ID, "diff-counts").text
    assert "added 1" in counts and "removed 0" not in counts and "changed 1" in counts
    shot(driver, "07-diff")

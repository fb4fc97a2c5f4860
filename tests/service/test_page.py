"""The touch-screen page in a real browser: Debian's headless Chromium driven by selenium.

Skips only where Chromium or its driver is not installed (scripts/system-deps.sh installs both).
The screenshot is kept as a test artefact: in pytest's tmp dir and in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.service.conftest import require_serve_extra

require_serve_extra()

from tests.service.conftest import Service, write_bright_dicom  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (run scripts/system-deps.sh as root)",
)


@pytest.fixture()
def browser(tmp_path: Path) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,800",
        f"--user-data-dir={tmp_path / 'profile'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER)))
    # The viewport itself at 1280 x 800 (a window of that size leaves less for the page).
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride", {"width": 1280, "height": 800, "deviceScaleFactor": 1, "mobile": False}
    )
    try:
        yield driver
    finally:
        driver.quit()


#: Screen pixels between each drawn box and where its box in image pixels lands on the shown picture
#: (``object-fit: contain``: scaled to fit, centred; the radiograph is the picture's left part).
_MISALIGNMENT_JS = """
const img = document.getElementById('picture');
const stage = img.getBoundingClientRect();
const scale = Math.min(stage.width / img.naturalWidth, stage.height / img.naturalHeight);
const left = stage.left + (stage.width - img.naturalWidth * scale) / 2;
const top = stage.top + (stage.height - img.naturalHeight * scale) / 2;
const perPixel = scale * img.naturalHeight / arguments[0];
const drawn = [...document.querySelectorAll('#boxes rect.box')].map(r => r.getBoundingClientRect());
let worst = drawn.length === arguments[1].length ? 0 : Infinity;
arguments[1].forEach((box, i) => {
  const expected = [left + box[0] * perPixel, top + box[1] * perPixel, left + box[2] * perPixel, top + box[3] * perPixel];
  const got = drawn[i] ? [drawn[i].left, drawn[i].top, drawn[i].right, drawn[i].bottom] : [Infinity, 0, 0, 0];
  expected.forEach((v, k) => { worst = Math.max(worst, Math.abs(v - got[k])); });
});
return worst;
"""


def _misalignment(driver: Any, record: dict[str, Any]) -> float:
    """Largest gap (screen px) between a drawn box's outline and its box's place on the picture."""
    # The stroke is centred on the outline: half its width lies outside the box.
    stroke = driver.execute_script(
        "const r = document.querySelector('#boxes rect.box'); const svg = document.getElementById('boxes');"
        "return r ? parseFloat(r.getAttribute('stroke-width')) * svg.getBoundingClientRect().height"
        " / svg.viewBox.baseVal.height / 2 : 0"
    )
    gap = driver.execute_script(_MISALIGNMENT_JS, record["image_size"][0], [d["box"] for d in record["detections"]])
    return float(gap) - float(stroke)


def test_page_uploads_a_dicom_and_shows_the_result(browser: Any, service: Service, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    dicom = write_bright_dicom(tmp_path / "IM0001.dcm")
    driver.get(service.url + "/")
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: d.find_element(By.ID, "service").get_attribute("data-state") == "ready")
    driver.find_element(By.ID, "file").send_keys(str(dicom))
    wait.until(lambda d: d.find_element(By.ID, "decision").text == "Abnormal")

    record = service.worker.recent(1)[0]
    assert record["meta"]["filename"] == "IM0001.dcm" and record["decision"] is True
    n_boxes = len(record["detections"])
    assert n_boxes >= 1
    wait.until(
        lambda d: len([e for e in d.find_elements(By.CSS_SELECTOR, "#boxes rect.box") if e.is_displayed()]) == n_boxes
    )
    labels = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#boxes text.box-label")]
    assert labels == [f"{d['class_name']} {d['score']:.2f}" for d in record["detections"]]
    assert driver.find_element(By.ID, "box-count").text == f"({n_boxes})"
    assert len(driver.find_elements(By.CSS_SELECTOR, "#findings li.finding")) == n_boxes
    assert "Osteophytes" in driver.find_element(By.ID, "findings").text
    probability = driver.find_element(By.ID, "probability").text
    assert f"{record['probability']:.3f}" in probability and "τ = 0.500" in probability
    # The DICOM is shown from the windowed PNG the models saw: decoded at the models' resolution (a JPEG 2000
    # level), so smaller than the original; the boxes, in original pixels, must still land on it.
    wait.until(
        lambda d: d.execute_script("const i = document.getElementById('picture'); return !i.hidden && i.naturalWidth")
    )
    size = driver.execute_script(
        "const i = document.getElementById('picture'); return [i.naturalHeight, i.naturalWidth]"
    )
    assert size == record["decoded_size"] == [s // 2 for s in record["image_size"]]
    first_src = driver.execute_script("return document.getElementById('picture').src")
    assert _misalignment(driver, record) < 2.0

    toggle = driver.find_element(By.ID, "heatmap-toggle")
    assert toggle.is_enabled() and toggle.get_attribute("aria-pressed") == "false"
    toggle.click()
    wait.until(lambda d: d.find_element(By.ID, "heatmap-toggle").get_attribute("aria-pressed") == "true")
    wait.until(lambda d: d.execute_script("return document.getElementById('picture').src") != first_src)
    # The heatmap picture is wider (a colour bar on its right): the boxes must stay on the same anatomy.
    heat_size = driver.execute_script(
        "const i = document.getElementById('picture'); return [i.naturalHeight, i.naturalWidth]"
    )
    assert heat_size[0] == record["decoded_size"][0] and heat_size[1] > record["decoded_size"][1]
    wait.until(lambda d: _misalignment(d, record) < 2.0)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#recent li .chip.abnormal"))

    shot = tmp_path / "kiosk-page.png"
    driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(shot, ARTIFACTS / "kiosk-page.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    toggle.click()  # back to the plain image, for a second screenshot without the heatmap
    wait.until(lambda d: d.find_element(By.ID, "heatmap-toggle").get_attribute("aria-pressed") == "false")
    driver.save_screenshot(str(ARTIFACTS / "kiosk-page-plain.png"))


def test_page_shows_a_refusal_and_an_unreadable_file(browser: Any, service: Service, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    reason = "CT image refused: the bundle judges radiographs (DX, CR, Secondary Capture) only"
    refused = service.worker.append_record(
        {
            "source": "dicom://CT1/1.2.3",
            "status": "refused",
            "error": reason,
            "probability": None,
            "decision": None,
            "threshold": 0.5,
            "detections": [],
            "refusal": {"code": "modality", "reason": reason},
        },
        origin="dicom",
    )
    driver = browser
    driver.get(service.url + "/")
    wait = WebDriverWait(driver, 30)
    row = f"#recent li[data-job='{refused['job_id']}']"
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
    driver.find_element(By.CSS_SELECTOR, row).click()
    wait.until(lambda d: d.find_element(By.ID, "decision").text == "Refused")
    assert driver.find_element(By.ID, "reason").text == reason
    assert not driver.find_element(By.ID, "heatmap-toggle").is_enabled()

    notes = tmp_path / "notes.png"
    notes.write_text("scanned on ward 3, please review\n")
    driver.find_element(By.ID, "file").send_keys(str(notes))
    wait.until(lambda d: d.find_element(By.ID, "decision").text == "Not readable")
    assert "not an image" in driver.find_element(By.ID, "reason").text
    assert driver.find_element(By.ID, "box-count").text == ""
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "kiosk-page-unreadable.png"))


def test_page_asks_for_the_token_once_and_then_works(browser: Any, bundle: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from spine_edge.service.app import AppConfig
    from tests.service.conftest import start_service, stop_service

    service = start_service(bundle, tmp_path / "out", AppConfig(token="kiosk-secret"))
    try:
        driver = browser
        driver.get(service.url + "/")
        wait = WebDriverWait(driver, 30)
        wait.until(lambda d: d.find_element(By.ID, "token-dialog").is_displayed())
        driver.find_element(By.ID, "token-input").send_keys("kiosk-secret")
        driver.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait.until(lambda d: d.find_element(By.ID, "service").get_attribute("data-state") == "ready")
        driver.find_element(By.ID, "file").send_keys(str(write_bright_dicom(tmp_path / "IM0002.dcm")))
        wait.until(lambda d: d.find_element(By.ID, "decision").text == "Abnormal")
        # The picture came through the token too (fetched with the header, shown as a blob).
        wait.until(
            lambda d: d.execute_script(
                "const i = document.getElementById('picture'); return !i.hidden && i.naturalWidth"
            )
        )
    finally:
        stop_service(service)

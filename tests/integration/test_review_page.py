"""The reviewer page in a real browser (Debian's Chromium driven by Playwright) against a real gateway on loopback.

A synthetic drive past four real GTSRB signs is uploaded and labelled by the committed models; the test then
reviews every track with the keyboard only (relabel one, reject one, merge two, accept the rest), reloads the page
and finds every decision still there, exports CVAT XML and checks it, and finally stops the server and checks that
a decision that cannot be saved is reported, not lost silently.

With ``ROADLABEL_DOCS_SCREENSHOTS=1`` the screenshots also go to ``docs/`` (the README shows them).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx2
import pytest

from gateway.exports import read_cvat_video
from tests.integration.test_gateway_server import create_key, free_port, server
from tests.synthvideo import Side, SignSpec, load_background, load_gtsrb_signs, make_road_video

REPO = Path(__file__).resolve().parents[2]
DATA = REPO.parent / "shared" / "data"
N_FRAMES = 64
SIDES: tuple[Side, ...] = ("right", "left", "top", "right")

pytestmark = pytest.mark.skipif(not (DATA / "gtsrb_train").is_dir(), reason="shared data absent")


def shot(page, tmp_path: Path, name: str) -> None:
    page.screenshot(path=str(tmp_path / f"{name}.png"))
    if os.environ.get("ROADLABEL_DOCS_SCREENSHOTS") == "1":
        page.screenshot(path=str(REPO / "docs" / f"{name}.png"), full_page=True)


def statuses(page) -> dict[int, str]:
    items = page.locator("#queue li")
    out = {}
    for i in range(items.count()):
        li = items.nth(i)
        out[int(li.get_attribute("data-track"))] = li.locator("span").nth(3).inner_text()
    return out


def test_review_a_recording_with_the_keyboard(browser, tmp_path):
    signs = load_gtsrb_signs(DATA / "gtsrb_train", (1, 14, 13, 38), per_class=1, seed=0)
    video = make_road_video(
        tmp_path / "drive.mp4",
        width=640,
        height=360,
        n_frames=N_FRAMES,
        signs=[
            SignSpec(class_id=c, crop=crop, roi_xyxy=roi, start_frame=i * 8, end_frame=i * 8 + 32, side=side)
            for i, ((c, crop, roi), side) in enumerate(zip(signs, SIDES, strict=True))
        ],
        background=load_background(DATA / "gtsdb_train", seed=0),
    )
    data = tmp_path / "data"
    uploader = create_key(data, "uploader")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with server(data, port, workers=1) as proc:
        reviewer = httpx2.post(base + "/healthz").status_code and _reviewer_key(data)
        rec = httpx2.post(
            base + "/recordings",
            params={"filename": "drive.mp4"},
            content=video.path.read_bytes(),
            headers={"Authorization": f"Bearer {uploader}", "Content-Type": "video/mp4"},
        ).json()
        rid = rec["id"]
        auth = {"Authorization": f"Bearer {reviewer}"}
        deadline = time.monotonic() + 120
        while httpx2.get(f"{base}/recordings/{rid}", headers=auth).json()["status"] != "done":
            assert time.monotonic() < deadline, "labelling did not finish"
            time.sleep(0.5)
        machine = httpx2.get(f"{base}/recordings/{rid}/labels", params={"view": "machine"}, headers=auth).json()
        assert len(machine["tracks"]) == 4
        boxes = sum(len(t["boxes"]) for t in machine["tracks"])

        page = browser.page
        started = time.perf_counter()
        page.goto(base + "/")
        page.fill("#key", reviewer)
        page.keyboard.press("Enter")
        page.wait_for_selector("#rows tr a")
        assert "drive.mp4" in page.inner_text("#rows")
        shot(page, tmp_path, "review-list")
        page.focus("#rows tr a")
        page.keyboard.press("Enter")
        page.wait_for_selector("#queue li")
        page.wait_for_selector(".crops img[src]")
        shot(page, tmp_path, "review-recording")
        order = [int(x) for x in page.locator("#queue li").evaluate_all("els => els.map(e => e.dataset.track)")]
        first, second, third = order[0], order[1], order[2]

        def selected() -> int:
            return int(page.get_attribute("#queue li[aria-selected=true]", "data-track"))

        # Relabel the selected (least confident) track by typing its new class.
        assert selected() == first
        page.keyboard.press("l")
        page.keyboard.type("speed_limit_60")
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelector('#q-{first}').innerText.includes('relabelled')")
        # Reject the next one (not a sign).
        assert selected() == second
        page.keyboard.press("r")
        page.wait_for_function(f"document.querySelector('#q-{second}').innerText.includes('rejected')")
        # Merge the last remaining track into the third: both are the same sign for this test.
        assert selected() == third
        fourth = next(t for t in order if t not in (first, second, third))
        page.keyboard.press("m")
        page.keyboard.type(str(fourth))
        page.keyboard.press("Enter")
        page.wait_for_function(f"!document.querySelector('#q-{fourth}')")
        assert selected() == third
        page.keyboard.press("a")
        page.wait_for_selector("#summary:not([hidden])")
        review_s = time.perf_counter() - started
        shot(page, tmp_path, "review-done")
        assert "3 tracks, 4 decisions" in page.inner_text("#summary")

        # Survives a reload (and the decisions carry who made them).
        page.reload()
        page.wait_for_selector("#queue li")
        assert statuses(page) == {first: "relabelled", second: "rejected", third: "accepted"}
        labels = httpx2.get(f"{base}/recordings/{rid}/labels", headers=auth).json()
        assert {t["review"]["by"] for t in labels["tracks"]} == {"reviewer"}

        xml = httpx2.get(f"{base}/recordings/{rid}/export", params={"format": "cvat-video"}, headers=auth).content
        cvat = {t.track_id: t for t in read_cvat_video(xml)}
        assert set(cvat) == {first, third}  # the rejected track is left out, the merged one is inside the third
        assert cvat[first].sign_class == "speed_limit_60"
        assert browser.errors == []

        # The server goes away: a decision must be reported as not saved.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        page.keyboard.press("u")
        page.wait_for_selector("#alert:not([hidden])")
        assert "unreachable" in page.inner_text("#alert")
    (tmp_path / "figures.txt").write_text(f"decisions 4, boxes {boxes}, review_s {review_s:.1f}\n")


def _reviewer_key(data: Path) -> str:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gateway", "keys", "create", "reviewer", "--role", "reviewer", "--data-dir", str(data)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    ).stdout.strip()

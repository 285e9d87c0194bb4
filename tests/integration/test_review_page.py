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
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest

from gateway.exports import read_cvat_video
from tests.browser import browser_page
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


@dataclass
class Served:
    base: str
    proc: subprocess.Popen[bytes]
    data: Path
    uploader: str
    reviewer: str
    video: bytes

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.reviewer}"}

    def labelled(self, name: str) -> str:
        """Upload the drive (made unique) and wait for its labels; returns the recording id."""
        rid = httpx2.post(
            self.base + "/recordings",
            params={"filename": name},
            content=self.video + name.encode(),
            headers={"Authorization": f"Bearer {self.uploader}", "Content-Type": "video/mp4"},
        ).json()["id"]
        deadline = time.monotonic() + 120
        while httpx2.get(f"{self.base}/recordings/{rid}", headers=self.auth()).json()["status"] != "done":
            assert time.monotonic() < deadline, "labelling did not finish"
            time.sleep(0.5)
        return str(rid)


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("review")
    signs = load_gtsrb_signs(DATA / "gtsrb_train", (1, 14, 13, 38), per_class=1, seed=0)
    video = make_road_video(
        tmp / "drive.mp4",
        width=640,
        height=360,
        n_frames=N_FRAMES,
        signs=[
            SignSpec(class_id=c, crop=crop, roi_xyxy=roi, start_frame=i * 8, end_frame=i * 8 + 32, side=side)
            for i, ((c, crop, roi), side) in enumerate(zip(signs, SIDES, strict=True))
        ],
        background=load_background(DATA / "gtsdb_train", seed=0),
    )
    data = tmp / "data"
    uploader = create_key(data, "uploader")
    reviewer = create_key(data, "reviewer", role="reviewer")
    port = free_port()
    # Every track goes to the reviewer here: the test reviews each one by hand (auto-accept has its own tests).
    with server(data, port, workers=1, env={"ROADLABEL_AUTO_ACCEPT": "0"}) as proc:
        yield Served(f"http://127.0.0.1:{port}", proc, data, uploader, reviewer, video.path.read_bytes())


def sign_in(page, served: Served) -> None:
    page.goto(served.base + "/")
    page.fill("#key", served.reviewer)
    page.keyboard.press("Enter")
    page.wait_for_selector("#rows tr a")


def open_recording(page, served: Served, rid: str) -> list[int]:
    page.goto(f"{served.base}/ui/#/r/{rid}")
    page.wait_for_selector("#queue li")
    return [int(x) for x in page.locator("#queue li").evaluate_all("els => els.map(e => e.dataset.track)")]


def selected(page) -> int:
    return int(page.get_attribute("#queue li[aria-selected=true]", "data-track"))


def test_review_a_recording_with_the_keyboard(browser, served, tmp_path):
    rid = served.labelled("drive.mp4")
    auth = served.auth()
    machine = httpx2.get(f"{served.base}/recordings/{rid}/labels", params={"view": "machine"}, headers=auth).json()
    assert len(machine["tracks"]) == 4
    boxes = sum(len(t["boxes"]) for t in machine["tracks"])

    page = browser.page
    started = time.perf_counter()
    sign_in(page, served)
    assert "drive.mp4" in page.inner_text("#rows")
    shot(page, tmp_path, "review-list")
    page.focus("#rows tr a")
    page.keyboard.press("Enter")
    page.wait_for_selector("#queue li")
    page.wait_for_selector(".crops img[src]")
    for part in ("#frame", "#timeline", "#card", "#b-accept"):  # at 1280x720 the video and timeline fit unscrolled
        box = page.locator(part).bounding_box()
        assert box is not None
        assert box["y"] >= 0, (part, box)
        assert box["y"] + box["height"] <= 720, (part, box)
        assert box["x"] + box["width"] <= 1280, (part, box)
    shot(page, tmp_path, "review-recording")
    order = [int(x) for x in page.locator("#queue li").evaluate_all("els => els.map(e => e.dataset.track)")]
    first, second, third = order[0], order[1], order[2]

    # Relabel the selected (least confident) track by typing its new class.
    assert selected(page) == first
    page.keyboard.press("l")
    page.keyboard.type("speed_limit_60")
    page.keyboard.press("Enter")
    page.wait_for_function(f"document.querySelector('#q-{first}').innerText.includes('relabelled')")
    # Reject the next one (not a sign).
    assert selected(page) == second
    page.keyboard.press("r")
    page.wait_for_function(f"document.querySelector('#q-{second}').innerText.includes('rejected')")
    # Merge the last remaining track into the third: both are the same sign for this test.
    assert selected(page) == third
    fourth = next(t for t in order if t not in (first, second, third))
    page.keyboard.press("m")
    page.keyboard.type(str(fourth))
    page.keyboard.press("Enter")
    page.wait_for_function(f"!document.querySelector('#q-{fourth}')")
    assert selected(page) == third
    page.keyboard.press("a")
    page.wait_for_selector("#summary:not([hidden])")
    review_s = time.perf_counter() - started
    shot(page, tmp_path, "review-done")
    assert "3 tracks, 4 decisions" in page.inner_text("#summary")

    # Survives a reload (and the decisions carry who made them).
    page.reload()
    page.wait_for_selector("#queue li")
    assert statuses(page) == {first: "relabelled", second: "rejected", third: "accepted"}
    labels = httpx2.get(f"{served.base}/recordings/{rid}/labels", headers=auth).json()
    assert {t["review"]["by"] for t in labels["tracks"]} == {"reviewer"}

    xml = httpx2.get(f"{served.base}/recordings/{rid}/export", params={"format": "cvat-video"}, headers=auth).content
    cvat = {t.track_id: t for t in read_cvat_video(xml)}
    assert set(cvat) == {first, third}  # the rejected track is left out, the merged one is inside the third
    assert cvat[first].sign_class == "speed_limit_60"
    assert browser.errors == []
    (tmp_path / "figures.txt").write_text(f"decisions 4, boxes {boxes}, review_s {review_s:.1f}\n")


def test_split_undo_and_accept_above_on_a_4k_screen(served, tmp_path):
    rid = served.labelled("drive-2.mp4")
    with browser_page(viewport=(3840, 2160)) as browser4k:
        page = browser4k.page
        sign_in(page, served)
        order = open_recording(page, served, rid)
        for part in ("#frame", "#timeline", "#queue", "#card"):  # the whole review layout fits a 4K screen
            box = page.locator(part).bounding_box()
            assert box is not None
            assert box["x"] + box["width"] <= 3840
            assert box["y"] + box["height"] <= 2160
        shot(page, tmp_path, "review-4k")
        track = selected(page)
        lane = next(
            q
            for q in httpx2.get(f"{served.base}/recordings/{rid}/review", headers=served.auth()).json()["queue"]
            if q["track_id"] == track
        )
        # Step to the middle of the track with the arrow keys, then split there.
        for _ in range((lane["last_frame"] - lane["first_frame"]) // 2):
            page.keyboard.press("ArrowRight")
        page.keyboard.press("s")
        page.wait_for_function(f"document.querySelectorAll('#queue li').length === {len(order) + 1}")
        page.keyboard.press("u")  # undo the split
        page.wait_for_function(f"document.querySelectorAll('#queue li').length === {len(order)}")
        page.fill("#bulk-threshold", "0.5")
        page.wait_for_function("document.querySelector('#bulk-preview').textContent.startsWith('4 track')")
        page.focus("#main")
        page.keyboard.press("Shift+A")
        page.wait_for_selector("#summary:not([hidden])")
        assert "the model was right on 4 of 4" in page.inner_text("#summary")
        assert browser4k.errors == []


def test_a_decision_another_reviewer_made_stale_is_refused_and_the_saved_state_shown(browser, served):
    rid = served.labelled("drive-4.mp4")
    page = browser.page
    sign_in(page, served)
    order = open_recording(page, served, rid)
    mine = selected(page)
    keep = next(t for t in order if t != mine)
    # Another reviewer (another tab, say) merges the selected track into another one.
    merged = httpx2.post(
        f"{served.base}/recordings/{rid}/review/actions",
        json={"action": "merge", "track_id": keep, "other_track_id": mine},
        headers=served.auth(),
    )
    assert merged.status_code == 200
    page.keyboard.press("a")  # accept the track this page still shows
    page.wait_for_selector("#alert:not([hidden])")
    alert = page.inner_text("#alert")
    assert "Not saved" in alert
    assert f"got track {mine}" in alert
    page.wait_for_function(f"!document.querySelector('#q-{mine}')")  # the saved state, with the merge, is shown
    assert len(page.locator("#queue li").all()) == len(order) - 1
    state = httpx2.get(f"{served.base}/recordings/{rid}/review", headers=served.auth()).json()
    assert state["decisions"] == 1
    # Chromium reports the refused request itself; nothing else went wrong.
    assert [e for e in browser.errors if "status of 422" not in e] == []


def test_an_unreachable_server_is_reported(browser, served):
    rid = served.labelled("drive-3.mp4")
    page = browser.page
    sign_in(page, served)
    open_recording(page, served, rid)
    os.killpg(served.proc.pid, signal.SIGKILL)  # last test of the module: the server goes away
    served.proc.wait()
    page.keyboard.press("a")
    page.wait_for_selector("#alert:not([hidden])")
    assert "unreachable" in page.inner_text("#alert")
    assert "decisions already saved are safe" in page.inner_text("#alert")

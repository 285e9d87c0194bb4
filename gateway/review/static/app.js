// roadlabel reviewer page: vanilla ES module, no build step. Talks to the gateway's HTTP API only.
// Every decision is sent at once and shown as saved only when the server confirms it; failures stay visible.

const $ = (sel, root = document) => root.querySelector(sel);
const main = $("#main");
const CLASS_NAMES = ["speed_limit_20", "speed_limit_30", "speed_limit_50", "speed_limit_60", "speed_limit_70",
  "speed_limit_80", "end_of_speed_limit_80", "speed_limit_100", "speed_limit_120", "no_overtaking",
  "no_overtaking_by_trucks", "priority_at_next_intersection", "priority_road", "yield", "stop", "no_vehicles",
  "no_trucks", "no_entry", "general_danger", "dangerous_curve_left", "dangerous_curve_right", "double_curve",
  "bumpy_road", "slippery_road", "road_narrows_on_the_right", "road_works", "traffic_signals", "pedestrians",
  "children_crossing", "bicycles_crossing", "ice_snow", "wild_animals_crossing", "end_of_all_limits",
  "turn_right_ahead", "turn_left_ahead", "ahead_only", "go_straight_or_right", "go_straight_or_left", "keep_right",
  "keep_left", "roundabout", "end_of_no_overtaking", "end_of_no_overtaking_by_trucks"];

// ---- API ------------------------------------------------------------------------------------------------------
function key() { return sessionStorage.getItem("roadlabel-key"); }

function showError(message) {
  const box = $("#alert");
  box.textContent = message;
  box.hidden = !message;
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key()}` } });
  } catch (err) {
    const down = new Error(`the server is unreachable (${err.message}); decisions already saved are safe, retry when it is back`);
    showError(`The ${down.message}.`);
    throw down;
  }
  if (response.status === 401) {
    sessionStorage.removeItem("roadlabel-key");
    showError("Your API key was not accepted. Sign in again.");
    route();
    throw new Error("unauthorized");
  }
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try { const body = await response.json(); message = body.error ? body.error.message : message; } catch { /* not JSON */ }
    const err = new Error(message);
    err.status = response.status;
    throw err;
  }
  return response;
}
const getJSON = async (path) => (await api(path)).json();

async function blobURL(path) {
  return URL.createObjectURL(await (await api(path)).blob());
}

// ---- routing ----------------------------------------------------------------------------------------------------
let teardown = () => {};
function route() {
  teardown();
  teardown = () => {};
  showError("");
  $("#logout").hidden = !key();
  if (!key()) return loginView();
  const m = location.hash.match(/^#\/r\/([0-9a-f]+)/);
  if (m) return recordingView(m[1]);
  return listView();
}
window.addEventListener("hashchange", route);
$("#logout").addEventListener("click", () => { sessionStorage.removeItem("roadlabel-key"); location.hash = "#/"; route(); });

function loginView() {
  main.replaceChildren($("#login-tpl").content.cloneNode(true));
  $("#key").focus();
  $("#login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem("roadlabel-key", $("#key").value.trim());
    route();
  });
}

// ---- recordings list ------------------------------------------------------------------------------------------
async function listView() {
  main.innerHTML = `<h1>Recordings</h1><table aria-label="recordings"><thead><tr><th>Recording</th><th>Status</th>
    <th>Progress</th><th>Tracks</th><th>To review</th></tr></thead><tbody id="rows"></tbody></table>`;
  let timer = null;
  const load = async () => {
    let data;
    try { data = await getJSON("/recordings?limit=200"); showError(""); } catch { timer = setTimeout(load, 5000); return; }
    const rows = await Promise.all(data.items.map(async (rec) => {
      const job = rec.job || { progress: { frames_done: 0 } };
      const total = job.progress.frames_total || 0;
      const pct = total ? Math.round(100 * job.progress.frames_done / total) : (rec.status === "done" ? 100 : 0);
      let pending = "";
      if (rec.status === "done") {
        try { const r = await getJSON(`/recordings/${rec.id}/review`); pending = r.reviewed ? "reviewed" : String(r.pending); } catch { pending = "?"; }
      }
      return `<tr><td><a href="#/r/${rec.id}">${escapeHTML(rec.source_name)}</a></td><td>${rec.status}</td>
        <td><div class="bar" role="progressbar" aria-valuenow="${pct}" aria-valuemin="0" aria-valuemax="100"><span style="width:${pct}%"></span></div></td>
        <td>${job.tracks ?? ""}</td><td>${pending}</td></tr>`;
    }));
    $("#rows").innerHTML = rows.join("") || `<tr><td colspan="5">No recordings yet: upload one with POST /recordings.</td></tr>`;
    if (data.items.some((r) => r.status === "queued" || r.status === "running")) timer = setTimeout(load, 2000);
  };
  teardown = () => clearTimeout(timer);
  load();
}

function escapeHTML(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

function hue(classId) { return classId < 0 ? 0 : (classId * 47) % 360; }

// ---- one recording -----------------------------------------------------------------------------------------------
async function recordingView(id) {
  main.innerHTML = `
    <h1 id="title">Recording</h1>
    <div class="review">
      <section aria-label="video">
        <div class="viewer">
          <video id="video" muted playsinline preload="auto" aria-label="the recording"></video>
          <canvas id="frame" width="1280" height="720" aria-label="current frame with boxes"></canvas>
        </div>
        <div class="controls">
          <button id="play" type="button" aria-keyshortcuts="Space">Play <kbd>Space</kbd></button>
          <label for="time">Time</label>
          <input id="time" type="range" min="0" step="0.01" value="0" aria-label="time in seconds">
          <output id="clock">0.00 s</output>
          <button id="zoom-in" type="button" aria-label="zoom timeline in">+</button>
          <button id="zoom-out" type="button" aria-label="zoom timeline out">−</button>
        </div>
        <canvas id="timeline" width="1600" height="240" aria-label="timeline, one lane per track"></canvas>
      </section>
      <aside class="side">
        <div class="card" id="card" aria-live="polite"></div>
        <div class="controls" aria-label="decisions">
          <button id="b-accept" type="button" aria-keyshortcuts="a">Accept <kbd>a</kbd></button>
          <button id="b-reject" type="button" aria-keyshortcuts="r">Not a sign <kbd>r</kbd></button>
          <button id="b-relabel" type="button" aria-keyshortcuts="l">Relabel <kbd>l</kbd></button>
          <button id="b-merge" type="button" aria-keyshortcuts="m">Merge <kbd>m</kbd></button>
          <button id="b-split" type="button" aria-keyshortcuts="s">Split here <kbd>s</kbd></button>
          <button id="b-undo" type="button" aria-keyshortcuts="u">Undo <kbd>u</kbd></button>
        </div>
        <form id="relabel" class="controls" hidden>
          <label for="relabel-input">Class</label>
          <input id="relabel-input" list="class-list" autocomplete="off" aria-label="new class, type to search">
          <datalist id="class-list">${[...CLASS_NAMES, "unknown"].map((n) => `<option value="${n}">`).join("")}</datalist>
          <button type="submit">Set</button>
        </form>
        <form id="merge" class="controls" hidden>
          <label for="merge-input">Merge into this track: track #</label>
          <input id="merge-input" type="number" min="1" aria-label="track to merge into the selected one">
          <button type="submit">Merge</button>
        </form>
        <form id="bulk" class="controls">
          <label for="bulk-threshold">Accept all above</label>
          <input id="bulk-threshold" type="number" min="0" max="1" step="0.01" value="0.97">
          <output id="bulk-preview"></output>
          <button type="submit">Accept <kbd>Shift+A</kbd></button>
        </form>
        <p id="queue-count" class="keys" aria-live="polite"></p>
        <div class="queue"><ul id="queue" role="listbox" aria-label="review queue, least confident first"></ul></div>
        <p class="keys"><kbd>j</kbd>/<kbd>k</kbd> next/previous · <kbd>a</kbd> accept · <kbd>r</kbd> not a sign ·
          <kbd>l</kbd> relabel · <kbd>m</kbd> merge · <kbd>s</kbd> split at the current time · <kbd>u</kbd> undo ·
          <kbd>←</kbd>/<kbd>→</kbd> step in time</p>
        <div id="summary" class="card summary" hidden></div>
      </aside>
    </div>`;
  const view = { id, state: null, tl: null, selected: null, time: 0, zoom: 1, offset: 0, boxes: new Map(), frameSeq: 0, busy: false };
  try {
    view.tl = await getJSON(`/recordings/${id}/timeline`);
  } catch (err) {
    if (err.status === 409) { main.innerHTML = `<p>This recording is not labelled yet: ${escapeHTML(err.message)}</p><p><a href="#/">Back</a></p>`; return; }
    showError(err.message); return;
  }
  $("#title").textContent = view.tl.recording.source;
  const rec = view.tl.recording;
  if (rec.width > 0 && rec.height > 0) $(".viewer").style.setProperty("--ar", String(rec.width / rec.height));
  await setupVideo(view);
  const slider = $("#time");
  slider.max = String(view.tl.recording.duration_s);
  await refreshState(view);
  selectTrack(view, view.state.queue[0]?.track_id ?? null);

  slider.addEventListener("input", () => seek(view, Number(slider.value)));
  $("#zoom-in").addEventListener("click", () => { view.zoom = Math.min(view.zoom * 2, 4096); drawTimeline(view); });
  $("#zoom-out").addEventListener("click", () => { view.zoom = Math.max(view.zoom / 2, 1); drawTimeline(view); });
  $("#timeline").addEventListener("click", (ev) => timelineClick(view, ev));
  $("#queue").addEventListener("click", (ev) => {
    const li = ev.target.closest("li[data-track]");
    if (li) selectTrack(view, Number(li.dataset.track));
  });
  $("#timeline").addEventListener("wheel", (ev) => { ev.preventDefault(); view.zoom = Math.min(Math.max(view.zoom * (ev.deltaY < 0 ? 1.25 : 0.8), 1), 4096); drawTimeline(view); }, { passive: false });
  $("#b-accept").addEventListener("click", () => decide(view, { action: "accept", track_id: view.selected }));
  $("#b-reject").addEventListener("click", () => decide(view, { action: "reject", track_id: view.selected }));
  $("#b-relabel").addEventListener("click", () => openForm("#relabel", "#relabel-input"));
  $("#b-merge").addEventListener("click", () => openForm("#merge", "#merge-input"));
  $("#b-split").addEventListener("click", () => split(view));
  $("#b-undo").addEventListener("click", () => undo(view));
  $("#play").addEventListener("click", () => togglePlay(view));
  $("#relabel").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("#relabel-input").value.trim();
    const classId = name === "unknown" ? -1 : CLASS_NAMES.indexOf(name);
    if (classId === -1 && name !== "unknown") { showError(`"${name}" is not a class: pick one from the list.`); return; }
    $("#relabel").hidden = true;
    decide(view, { action: "relabel", track_id: view.selected, class_id: classId });
  });
  $("#merge").addEventListener("submit", (ev) => {
    ev.preventDefault();
    $("#merge").hidden = true;
    decide(view, { action: "merge", track_id: view.selected, other_track_id: Number($("#merge-input").value) });
  });
  const preview = () => {
    // The same rule as the server's accept_above: undecided tracks with a class and confidence >= X.
    const x = Number($("#bulk-threshold").value);
    const n = view.state.queue.filter((q) => q.review.status === "pending" && q.class_id >= 0 && q.confidence >= x).length;
    $("#bulk-preview").textContent = `${n} track(s)`;
  };
  $("#bulk-threshold").addEventListener("input", preview);
  view.preview = preview;
  preview();
  $("#bulk").addEventListener("submit", (ev) => { ev.preventDefault(); decide(view, { action: "accept_above", threshold: Number($("#bulk-threshold").value) }); });

  const onKey = (ev) => {
    if (ev.target.closest("input, select, textarea")) { if (ev.key === "Escape") { ev.target.closest("form").hidden = true; $("#main").focus(); } return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    const k = ev.key;
    const handled = {
      j: () => step(view, 1), ArrowDown: () => step(view, 1), k: () => step(view, -1), ArrowUp: () => step(view, -1),
      a: () => decide(view, { action: "accept", track_id: view.selected }),
      A: () => $("#bulk").requestSubmit(),
      r: () => decide(view, { action: "reject", track_id: view.selected }),
      l: () => openForm("#relabel", "#relabel-input"),
      m: () => openForm("#merge", "#merge-input"),
      s: () => split(view),
      u: () => undo(view),
      " ": () => togglePlay(view),
      ArrowRight: () => seek(view, view.time + 1 / (view.tl.recording.fps || 25)),
      ArrowLeft: () => seek(view, Math.max(0, view.time - 1 / (view.tl.recording.fps || 25))),
    }[k];
    if (handled) { ev.preventDefault(); handled(); }
  };
  document.addEventListener("keydown", onKey);
  const onResize = () => drawTimeline(view);
  window.addEventListener("resize", onResize);
  teardown = () => { document.removeEventListener("keydown", onKey); window.removeEventListener("resize", onResize); };
  $("#main").focus();
}

function openForm(form, input) {
  $(form).hidden = false;
  $(input).value = "";
  $(input).focus();
}

async function refreshState(view, state, reshaped = true) {
  view.state = state || await getJSON(`/recordings/${view.id}/review`);
  if (reshaped) {
    // A merge, split or undo changes which tracks exist and their boxes: fetch the lanes and boxes again.
    view.tl = await getJSON(`/recordings/${view.id}/timeline`);
    view.boxes.clear();
  } else {
    // Accept, reject and relabel change only decisions: the queue items carry them.
    const byId = new Map(view.state.queue.map((q) => [q.track_id, q]));
    for (const lane of view.tl.lanes) {
      const q = byId.get(lane.track_id);
      if (!q) continue;
      lane.status = q.review.status;
      lane.class_id = q.review.status === "relabelled" ? q.review.class_id : q.class_id;
      lane.class_name = q.review.status === "relabelled" ? q.review.class_name : q.class_name;
    }
  }
  renderQueue(view);
  renderSummary(view);
  drawTimeline(view);
  if (view.preview) view.preview();
}

// The queue shows a window of QUEUE_WINDOW items around the selected track: a 2-hour recording has thousands of
// tracks, and laying all of them out again after every decision would make each keystroke wait for the browser.
const QUEUE_WINDOW = 120;

function renderQueue(view) {
  const queue = view.state.queue;
  const at = Math.max(0, queue.findIndex((q) => q.track_id === view.selected));
  const start = Math.max(0, Math.min(at - 20, queue.length - QUEUE_WINDOW));
  const end = Math.min(queue.length, start + QUEUE_WINDOW);
  view.queueRange = [start, end];
  const more = (n, where) => n > 0 ? `<li class="more" aria-disabled="true">${n} more ${where}</li>` : "";
  $("#queue").innerHTML = more(start, "above") + queue.slice(start, end).map((q) => `
    <li role="option" id="q-${q.track_id}" data-track="${q.track_id}" data-status="${q.review.status}" aria-selected="${q.track_id === view.selected}">
      <span>#${q.track_id}</span><span>${escapeHTML(q.review.status === "relabelled" ? q.review.class_name : q.class_name)}</span>
      <span>${(q.confidence * 100).toFixed(1)}%</span><span class="status-${q.review.status}">${q.review.status}${(q.review.by || "").startsWith("auto:") ? " (auto)" : ""}</span></li>`).join("")
    + more(queue.length - end, "below");
  const auto = view.state.auto_accepted ? `; ${view.state.auto_accepted} accepted automatically (the model is sure of them)` : "";
  $("#queue-count").textContent = `${view.state.pending} of ${view.state.tracks} tracks to review${auto}`;
}

function renderSummary(view) {
  const s = view.state;
  const box = $("#summary");
  box.hidden = !s.reviewed;
  if (!s.reviewed) return;
  box.innerHTML = `<h2>Reviewed</h2><p>${s.tracks} tracks, ${s.decisions} decisions in ${Math.round(s.time_spent_s)} s;
    the model was right on ${s.model_right} of ${s.tracks}${s.auto_accepted ? ` (${s.auto_accepted} accepted automatically)` : ""}.</p>
    <p>Export: <button type="button" data-fmt="cvat-video">CVAT video</button> <button type="button" data-fmt="mot">MOT</button>
    <button type="button" data-fmt="label-studio">Label Studio</button></p>`;
  for (const b of box.querySelectorAll("button")) b.addEventListener("click", () => download(view, b.dataset.fmt));
}

async function download(view, fmt) {
  try {
    const url = await blobURL(`/recordings/${view.id}/export?format=${fmt}`);
    const a = document.createElement("a");
    a.href = url; a.download = `${view.tl.recording.source}.${fmt}`; a.click();
  } catch (err) { showError(`Export failed: ${err.message}`); }
}

async function selectTrack(view, trackId) {
  $(`#q-${view.selected}`)?.setAttribute("aria-selected", "false");
  view.selected = trackId;
  if (!$(`#q-${trackId}`) && view.state.queue.length > QUEUE_WINDOW) renderQueue(view); // outside the window shown
  $(`#q-${trackId}`)?.setAttribute("aria-selected", "true");
  $(`#q-${trackId}`)?.scrollIntoView({ block: "nearest" });
  const q = view.state.queue.find((t) => t.track_id === trackId);
  const card = $("#card");
  if (!q) { card.innerHTML = "<p>No track selected.</p>"; return; }
  const name = q.review.status === "relabelled" ? q.review.class_name : q.class_name;
  card.innerHTML = `<h2>Track #${q.track_id}: ${escapeHTML(name)}</h2>
    <p>Confidence ${(q.confidence * 100).toFixed(1)}% · frames ${q.first_frame}–${q.last_frame} · ${q.boxes} boxes ·
      <span class="status-${q.review.status}">${q.review.status}${q.review.by ? ` by ${escapeHTML(q.review.by)}` : ""}</span></p>
    <p>${q.uncertainty.length ? `Uncertain: ${q.uncertainty.join(", ").replaceAll("_", " ")}` : "The model is sure of this one."}</p>
    <p>Next likely: ${q.top_classes.slice(1, 4).map((c) => `${escapeHTML(c.class_name)} ${(c.p * 100).toFixed(1)}%`).join(", ") || "none"}</p>
    <div class="crops" aria-label="best crops"></div>`;
  const crops = card.querySelector(".crops");
  const lane = view.laneById?.get(trackId) ?? view.tl.lanes.find((l) => l.track_id === trackId);
  for (let n = 0; n < (lane ? lane.crops : 0); n++) {
    const img = document.createElement("img");
    img.alt = `crop ${n + 1} of track ${trackId}`;
    crops.append(img);
    blobURL(`/recordings/${view.id}/tracks/${trackId}/crops/${n}.jpg`).then((u) => { img.src = u; }).catch(() => {});
  }
  seek(view, q.start_s);
}

function step(view, delta) {
  const ids = view.state.queue.map((q) => q.track_id);
  const i = ids.indexOf(view.selected);
  const next = ids[Math.min(Math.max(i + delta, 0), ids.length - 1)];
  if (next !== undefined) selectTrack(view, next);
}

async function decide(view, body) {
  if (view.busy) return;
  if (body.track_id === null) { showError("Select a track first."); return; }
  view.busy = true;
  try {
    const state = await (await api(`/recordings/${view.id}/review/actions`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
    })).json();
    showError("");
    const before = view.selected;
    await refreshState(view, state, body.action === "split" || body.action === "merge");
    const pending = state.queue.find((q) => q.review.status === "pending");
    const keep = state.queue.find((q) => q.track_id === before);
    // After a decision, move on to the next undecided track; after a split or merge, stay on the track.
    selectTrack(view, body.action === "split" || body.action === "merge" ? (keep ? before : pending?.track_id ?? null) : (pending?.track_id ?? before));
  } catch (err) {
    if (err.status === 409 || err.status === 422) {
      // Refused against the saved state: another reviewer may have decided meanwhile, so show what is saved now.
      showError(`Not saved: ${err.message}. The decision was not recorded; the saved decisions are shown.`);
      try {
        await refreshState(view, null, true);
        const still = view.state.queue.find((q) => q.track_id === view.selected);
        selectTrack(view, still ? view.selected : (view.state.queue.find((q) => q.review.status === "pending")?.track_id ?? null));
      } catch { /* the alert already says the decision was not recorded */ }
    } else {
      showError(`Not saved: ${err.message}. The decision was not recorded; try again.`);
    }
  } finally {
    view.busy = false;
  }
}

async function undo(view) {
  try {
    const state = await (await api(`/recordings/${view.id}/review/undo`, { method: "POST" })).json();
    showError("");
    await refreshState(view, state);
    selectTrack(view, view.selected);
  } catch (err) { showError(`Undo failed: ${err.message}`); }
}

function split(view) {
  const q = view.state.queue.find((t) => t.track_id === view.selected);
  if (!q) return;
  const fps = view.tl.recording.fps || 25;
  const frame = Math.round(q.first_frame + (view.time - q.start_s) * fps);
  decide(view, { action: "split", track_id: view.selected, frame: Math.max(frame, q.first_frame + 1) });
}

// ---- frame, boxes, timeline --------------------------------------------------------------------------------------
async function boxesNear(view, t) {
  const bucket = Math.floor(t / 30);
  let boxes = view.boxes.get(bucket);
  if (boxes === undefined) {
    boxes = getJSON(`/recordings/${view.id}/boxes?from_s=${bucket * 30}&to_s=${bucket * 30 + 30}`).catch(() => []);
    // Scrubbing a long recording must not pile up every box in the page: keep the 16 latest windows (8 min).
    if (view.boxes.size >= 16) view.boxes.delete(view.boxes.keys().next().value);
  } else {
    view.boxes.delete(bucket); // re-insert: most recently used last
  }
  view.boxes.set(bucket, boxes);
  return boxes;
}

async function seek(view, t) {
  view.time = t;
  $("#time").value = String(t);
  $("#clock").textContent = `${t.toFixed(2)} s`;
  drawTimeline(view);
  if (view.video) {
    // The browser decodes the video itself; boxes are drawn when the frame at the new time is shown.
    if (Math.abs(view.video.currentTime - t) > 1e-3) view.video.currentTime = t;
    else drawBoxes(view, t);
    return;
  }
  const seq = ++view.frameSeq;
  await new Promise((r) => setTimeout(r, 60)); // scrubbing: only the latest position is fetched
  if (seq !== view.frameSeq) return;
  let url;
  try { url = await blobURL(`/recordings/${view.id}/frame.jpg?t_s=${t.toFixed(4)}&max_w=1280`); } catch { return; }
  if (seq !== view.frameSeq) return;
  const img = new Image();
  img.src = url;
  await img.decode();
  const canvas = $("#frame");
  canvas.width = img.width; canvas.height = img.height;
  canvas.getContext("2d").drawImage(img, 0, 0);
  await drawBoxes(view, t, true);
  URL.revokeObjectURL(url);
}

async function setupVideo(view) {
  const video = $("#video");
  try {
    const { url } = await (await api(`/recordings/${view.id}/video-url`, { method: "POST" })).json();
    video.src = url;
    await new Promise((resolve, reject) => {
      video.addEventListener("loadeddata", resolve, { once: true });
      video.addEventListener("error", () => reject(new Error("this browser cannot play the recording")), { once: true });
    });
  } catch {
    video.remove(); // JPEG frames cut by the server instead
    return;
  }
  view.video = video;
  $("#frame").classList.add("overlay");
  video.addEventListener("seeked", () => drawBoxes(view, video.currentTime));
  const onFrame = () => {
    if (video.paused) return;
    view.time = video.currentTime;
    $("#time").value = String(view.time);
    $("#clock").textContent = `${view.time.toFixed(2)} s`;
    drawBoxes(view, view.time);
    drawTimeline(view);
    video.requestVideoFrameCallback(onFrame);
  };
  video.addEventListener("play", () => { $("#play").textContent = "Pause"; video.requestVideoFrameCallback(onFrame); });
  video.addEventListener("pause", () => { $("#play").textContent = "Play"; });
}

function togglePlay(view) {
  if (!view.video) return;
  if (view.video.paused) view.video.play(); else view.video.pause();
}

async function drawBoxes(view, t, overFrame = false) {
  const canvas = $("#frame");
  const rec = view.tl.recording;
  if (!overFrame) {
    canvas.width = view.video.videoWidth || rec.width;
    canvas.height = view.video.videoHeight || rec.height;
  }
  const ctx = canvas.getContext("2d");
  const scale = canvas.width / rec.width;
  const fps = rec.fps || 25;
  const shown = (await boxesNear(view, t)).filter((b) => Math.abs(b.t_s - t) <= 0.6 / fps);
  for (const b of shown) {
    const lane = view.laneById?.get(b.track_id);
    const selected = b.track_id === view.selected;
    ctx.strokeStyle = `hsl(${hue(lane ? lane.class_id : -1)} 90% 60%)`;
    ctx.lineWidth = selected ? 4 : 2;
    const [x1, y1, x2, y2] = b.xyxy.map((v) => v * scale);
    ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
    ctx.fillStyle = ctx.strokeStyle;
    ctx.font = `${Math.max(12, 14 * scale)}px system-ui`;
    ctx.fillText(`#${b.track_id} ${lane ? lane.class_name : ""}`, x1, Math.max(12, y1 - 4));
  }
  if (Math.abs(t - view.time) < 1e-3) canvas.dataset.drawn = t.toFixed(3); // what is on screen (tests, benches)
}

function visibleWindow(view) {
  const dur = Math.max(view.tl.recording.duration_s, 1e-3);
  const span = dur / view.zoom;
  const start = Math.min(Math.max(view.time - span / 2, 0), Math.max(dur - span, 0));
  return [start, start + span];
}

// One lane per track while they fit; on long recordings tracks that do not overlap in time share a row, so
// thousands of tracks stay readable. Recomputed only when the timeline data changes.
function layoutLanes(view, height) {
  const lanes = view.tl.lanes;
  view.laneById = new Map(lanes.map((l) => [l.track_id, l]));
  const fits = lanes.length * 6 <= height - 16;
  const rowEnds = [];
  for (const lane of [...lanes].sort((a, b) => a.start_s - b.start_s || a.track_id - b.track_id)) {
    let row = fits ? rowEnds.length : rowEnds.findIndex((end) => end < lane.start_s - 0.5);
    if (row < 0) row = rowEnds.length;
    rowEnds[row] = lane.end_s;
    lane.row = row;
  }
  view.rows = Math.max(rowEnds.length, 1);
  view.layoutFor = view.tl;
}

function drawTimeline(view) {
  const canvas = $("#timeline");
  if (!canvas || !view.tl) return;
  const rect = canvas.getBoundingClientRect();
  const dpr = window.devicePixelRatio || 1;
  canvas.width = Math.max(1, Math.round(rect.width * dpr));
  canvas.height = Math.max(1, Math.round(rect.height * dpr));
  const ctx = canvas.getContext("2d");
  ctx.scale(dpr, dpr);
  ctx.clearRect(0, 0, rect.width, rect.height);
  const [t0, t1] = visibleWindow(view);
  const x = (t) => ((t - t0) / (t1 - t0)) * rect.width;
  if (view.layoutFor !== view.tl) layoutLanes(view, rect.height);
  const laneH = Math.max(3, Math.min(18, (rect.height - 16) / view.rows));
  view.laneH = laneH;
  for (const lane of view.tl.lanes) {
    if (lane.end_s < t0 || lane.start_s > t1) continue; // only what is visible is drawn
    const alpha = 0.25 + 0.75 * lane.confidence;
    const y = 8 + lane.row * laneH;
    ctx.fillStyle = lane.status === "rejected" ? `rgba(242,139,130,0.35)` : `hsla(${hue(lane.class_id)} 80% 55% / ${alpha})`;
    ctx.fillRect(x(lane.start_s), y, Math.max(2, x(lane.end_s) - x(lane.start_s)), Math.max(1, laneH - 2));
    if (lane.track_id === view.selected) {
      ctx.strokeStyle = "#fdd663"; ctx.lineWidth = 2;
      ctx.strokeRect(x(lane.start_s), y, Math.max(2, x(lane.end_s) - x(lane.start_s)), Math.max(1, laneH - 2));
    }
  }
  ctx.fillStyle = "#fff";
  ctx.fillRect(x(view.time), 0, 2, rect.height);
}

function timelineClick(view, ev) {
  const rect = ev.target.getBoundingClientRect();
  const [t0, t1] = visibleWindow(view);
  const t = t0 + ((ev.clientX - rect.left) / rect.width) * (t1 - t0);
  const row = Math.floor((ev.clientY - rect.top - 8) / (view.laneH || 10));
  const slack = Math.max(0.2, 4 * ((t1 - t0) / rect.width)); // a bar is at least a few pixels wide
  const lane = view.tl.lanes.find((l) => l.row === row && t >= l.start_s - slack && t <= l.end_s + slack);
  if (lane) selectTrack(view, lane.track_id);
  else seek(view, Math.max(0, t));
}

route();

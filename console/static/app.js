// Ansimi console page: live alerts over server-sent events, actions through the console
// (never straight to the gateway: the browser holds a session cookie, not the gateway's
// token), door-camera video over WHEP through the console. No external assets.
"use strict";

const TEXT = {
  ko: {
    title: "Ansimi 관제 콘솔", offline: "연결 끊김", online: "실시간", audit: "감사 기록 CSV",
    logout: "로그아웃", signin: "운영자 로그인", name: "이름", password: "비밀번호",
    signin_button: "로그인", active_alerts: "활성 경보", no_alerts: "활성 경보가 없습니다",
    live_video: "실시간 영상", close_video: "영상 닫기", device_events: "장치 이벤트",
    acknowledge: "접수", dispatch: "경찰 출동", close: "종료", watch: "현관 영상 보기",
    lang_other: "English", new_alert: "새 경보!", wrong_login: "이름 또는 비밀번호가 틀립니다",
    stage_delivered: "미접수", stage_acknowledged: "접수됨", stage_dispatched: "출동",
    stage_closed: "종료", no_address: "주소 미등록", cancelled: "사용자 취소",
    registry_stale: "장치 목록을 게이트웨이에서 받지 못했습니다: 새 장치의 경보를 확인할 수 없습니다",
    refused: "건의 전달이 거부되었습니다 (콘솔 로그 확인)",
    video_connecting: "연결 중…", video_playing: "재생 중", video_failed: "영상 연결 실패",
    recording: "녹화 보기", play_reason: "재생 이유", play: "재생",
    no_recording: "녹화 없음", play_need_reason: "이유를 먼저 적어 주세요",
    talk: "눌러서 말하기", talk_reason: "말하는 이유", talking: "말하는 중…",
    talk_failed: "말하기 실패", talk_need_reason: "이유를 먼저 적어 주세요",
    ago_s: "초 전", ago_m: "분 전", ago_h: "시간 전",
    t_press: "비상벨", t_long_press: "비상벨 (길게)", t_duress: "강압 신호",
    t_doorbell_ring: "초인종", t_tamper: "장치 훼손", t_tamper_cleared: "훼손 해제",
    t_power_loss: "정전", t_power_restored: "전원 복구", t_offline: "장치 오프라인",
    t_online: "장치 온라인", t_battery: "배터리 전원", t_mains: "상용 전원",
    t_cancel: "경보 취소", urgent: "긴급", silent: "무음",
  },
  en: {
    title: "Ansimi control console", offline: "disconnected", online: "live",
    audit: "Audit log CSV", logout: "Sign out", signin: "Operator sign-in", name: "Name",
    password: "Password", signin_button: "Sign in", active_alerts: "Active alerts",
    no_alerts: "No active alerts", live_video: "Live video", close_video: "Close video",
    device_events: "Device events", acknowledge: "Acknowledge", dispatch: "Dispatch police",
    close: "Close", watch: "Watch door camera", lang_other: "한국어", new_alert: "NEW ALERT!",
    wrong_login: "Wrong name or password", stage_delivered: "new",
    stage_acknowledged: "acknowledged", stage_dispatched: "police dispatched",
    stage_closed: "closed", no_address: "no address on file", cancelled: "cancelled by user",
    registry_stale: "the device list could not be fetched from the gateway: alerts from new devices cannot be verified",
    refused: "deliveries refused (see the console's log)",
    video_connecting: "connecting…", video_playing: "playing", video_failed: "video failed",
    recording: "Recording", play_reason: "why you play it", play: "Play",
    no_recording: "no recording", play_need_reason: "say why first",
    talk: "Hold to talk", talk_reason: "why you speak", talking: "talking…",
    talk_failed: "talk-back failed", talk_need_reason: "say why first",
    ago_s: "s ago", ago_m: "min ago", ago_h: "h ago",
    t_press: "Emergency bell", t_long_press: "Emergency bell (long press)", t_duress: "Duress",
    t_doorbell_ring: "Doorbell", t_tamper: "Tamper", t_tamper_cleared: "Tamper cleared",
    t_power_loss: "Power lost", t_power_restored: "Power restored", t_offline: "Device offline",
    t_online: "Device online", t_battery: "On battery", t_mains: "On mains power",
    t_cancel: "Alert cancelled", urgent: "URGENT", silent: "silent",
  },
};

const state = {
  lang: localStorage.getItem("ansimi.lang") || "ko",
  csrf: "",
  alerts: new Map(), // event_id -> alert json
  addresses: new Map(), // device_id -> address | null (fetched once per page load)
  source: null,
  audio: null,
  flash: null,
  video: null, // {pc, location, device}
  cancelled: new Set(),
  health: null,
};

const $ = (id) => document.getElementById(id);
const t = (key) => TEXT[state.lang][key] ?? TEXT.en[key] ?? key;

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  $("lang").textContent = t("lang_other");
  if (!state.flash) document.title = t("title");
  renderAlerts();
}

async function api(method, path, body, headers = {}) {
  // keepalive: a DELETE sent as the page closes still reaches the console
  const init = { method, headers: { ...headers }, credentials: "same-origin", keepalive: true };
  if (method !== "GET") init.headers["X-CSRF-Token"] = state.csrf;
  if (body !== undefined && typeof body !== "string") {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  } else if (body !== undefined) {
    init.body = body;
  }
  return fetch(path, init);
}

// ---- sign-in ---------------------------------------------------------------------------

async function start() {
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "ko" ? "en" : "ko";
    localStorage.setItem("ansimi.lang", state.lang);
    applyLanguage();
  });
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", logout);
  $("video-close").addEventListener("click", closeVideo);
  // push-to-talk: the microphone is live only while the button is held
  $("talk").addEventListener("pointerdown", startTalk);
  for (const end of ["pointerup", "pointerleave", "pointercancel"]) {
    $("talk").addEventListener(end, stopTalk);
  }
  // browsers allow sound only after a gesture: a page reopened with a live session has
  // had none, so the first click or key anywhere unlocks the alarm sound
  document.addEventListener("pointerdown", unlockAudio);
  document.addEventListener("keydown", unlockAudio);
  window.addEventListener("pagehide", closeVideo); // leave the gateway's viewer slot free
  applyLanguage();
  const me = await fetch("/api/me", { credentials: "same-origin" });
  if (me.ok) await signedIn(await me.json());
  else showSignIn();
  setInterval(tickAges, 1000);
}

function showSignIn() {
  $("signin").hidden = false;
  $("desk").hidden = true;
  $("logout").hidden = true;
  $("audit").hidden = true;
  $("who").textContent = "";
}

async function login(ev) {
  ev.preventDefault();
  unlockAudio(); // a click: the browser now lets the page make sound
  const response = await api("POST", "/api/login", {
    name: $("login-name").value, password: $("login-password").value,
  });
  if (!response.ok) {
    $("login-error").textContent = response.status === 401 ? t("wrong_login")
      : (await response.json()).error;
    return;
  }
  $("login-password").value = "";
  $("login-error").textContent = "";
  await signedIn(await response.json());
}

async function logout() {
  await api("POST", "/api/logout");
  if (state.source) state.source.close();
  closeVideo();
  state.alerts.clear();
  state.addresses.clear();
  showSignIn();
}

async function signedIn(me) {
  state.csrf = me.csrf;
  $("who").textContent = me.name;
  $("signin").hidden = true;
  $("desk").hidden = false;
  $("logout").hidden = false;
  $("audit").hidden = false;
  document.body.dataset.operator = me.name;
  await reload();
  connect();
  showHealth(me);
  if (!state.health) state.health = setInterval(checkHealth, 30000);
}

async function checkHealth() {
  const response = await fetch("/api/me", { credentials: "same-origin" });
  if (response.ok) showHealth(await response.json());
}

function showHealth(me) {
  // what would keep alerts off this page must be on it
  const problems = [];
  if (me.registry && !me.registry.synced) problems.push(t("registry_stale"));
  if (me.refused > 0) problems.push(`${me.refused} ${t("refused")}`);
  $("warning").textContent = problems.join(" · ");
  $("warning").hidden = problems.length === 0;
}

// ---- live events -----------------------------------------------------------------------

async function reload() {
  const response = await fetch("/api/alerts", { credentials: "same-origin" });
  if (response.status === 401) return showSignIn();
  const data = await response.json();
  state.alerts.clear();
  for (const a of data.alerts) state.alerts.set(a.event_id, a);
  $("events").replaceChildren();
  for (const e of data.events.slice().reverse()) addDeviceEvent(e);
  renderAlerts();
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/stream");
  state.source = source;
  source.addEventListener("hello", () => {
    setLink(true);
    document.body.dataset.live = "1";
  });
  source.addEventListener("event", (msg) => onEvent(JSON.parse(msg.data)));
  source.addEventListener("stage", (msg) => onStage(JSON.parse(msg.data)));
  source.onerror = async () => {
    setLink(false);
    // it reconnects by itself; what happened meanwhile comes from a fresh list
    if (source.readyState === EventSource.CLOSED) {
      setTimeout(async () => { await reload(); connect(); }, 2000);
    } else {
      source.addEventListener("hello", reload, { once: true });
    }
  };
}

function setLink(up) {
  const el = $("link");
  el.className = "link " + (up ? "up" : "down");
  el.dataset.i18n = up ? "online" : "offline";
  el.textContent = t(el.dataset.i18n);
}

function onEvent(e) {
  if (e.type === "cancel") state.cancelled.add(String(e.body.alert_id));
  if (e.active) {
    if (state.alerts.has(e.event_id)) return;
    e.fresh = true;
    state.alerts.set(e.event_id, e);
    renderAlerts();
    announce(e);
  } else {
    addDeviceEvent(e);
    if (e.type === "cancel") renderAlerts();
  }
}

function onStage(s) {
  const a = state.alerts.get(s.event_id);
  if (!a) return;
  const order = ["delivered", "acknowledged", "dispatched", "closed"];
  if (order.indexOf(s.stage) > order.indexOf(a.stage)) a.stage = s.stage;
  a.stages = [...(a.stages || []), s];
  if (a.stage === "closed") state.alerts.delete(s.event_id);
  renderAlerts();
}

// ---- rendering -------------------------------------------------------------------------

function whatOf(e) {
  if (e.type === "alert") return t("t_" + e.body.trigger);
  if (e.type === "status") return t("t_" + e.body.state);
  if (e.type === "heartbeat") return t("t_" + e.body.power);
  if (e.type === "cancel") return t("t_cancel");
  return e.type;
}

function sortKey(a) {
  return [a.urgency, a.stage === "delivered" ? 0 : 1, a.received_ms];
}

function compare(x, y) {
  const a = sortKey(x), b = sortKey(y);
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return 0;
}

function renderAlerts() {
  const list = $("alerts");
  if (!list) return;
  const alerts = [...state.alerts.values()].filter((a) => a.stage !== "closed").sort(compare);
  const template = $("alert-template");
  const items = alerts.map((a) => {
    const li = template.content.firstElementChild.cloneNode(true);
    li.dataset.eventId = a.event_id;
    li.dataset.deviceId = a.device_id;
    li.dataset.stage = a.stage;
    li.classList.add("u" + a.urgency);
    if (a.fresh) li.classList.add("fresh");
    if (a.cancelled || state.cancelled.has(a.event_id)) li.classList.add("cancelled");
    for (const el of li.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
    let what = whatOf(a);
    if (a.body.urgent) what = `${t("urgent")} · ${what}`;
    if (a.body.silent) what += ` (${t("silent")})`;
    if (a.body.presses > 1) what += ` ×${a.body.presses}`;
    li.querySelector(".what").textContent = what;
    const stage = li.querySelector(".stage");
    stage.textContent = t("stage_" + a.stage);
    stage.classList.add(a.stage);
    // who moved it, and when: on hover
    stage.title = (a.stages || []).map((m) =>
      `${t("stage_" + m.stage)}: ${m.operator} ${new Date(m.at_ms).toLocaleTimeString()}`).join("\n");
    li.querySelector(".age").dataset.ms = a.received_ms;
    li.querySelector(".label").textContent = a.label || a.kind || "";
    li.querySelector(".device").textContent = a.device_id;
    li.querySelector(".district").textContent = a.district || "—";
    const address = state.addresses.get(a.device_id);
    li.querySelector(".address").textContent =
      address === undefined ? "…" : address === null ? t("no_address") : address;
    if (address === undefined) fetchAddress(a.device_id);
    li.querySelector(".ack").disabled = a.stage !== "delivered";
    li.querySelector(".dispatch").disabled = a.stage === "dispatched";
    for (const button of li.querySelectorAll(".act")) {
      button.addEventListener("click", () => act(a, button.dataset.stage, li));
    }
    if (a.kind === "doorbell") {
      const watch = li.querySelector(".watch");
      watch.hidden = false;
      watch.addEventListener("click", () => openVideo(a.device_id));
      const recording = li.querySelector(".recording");
      recording.hidden = false;
      recording.addEventListener("click", () => openRecording(a.event_id));
    }
    if (!li.dataset.shownMs) li.dataset.shownMs = a.shown_ms || (a.shown_ms = Date.now());
    return li;
  });
  for (const a of alerts) a.fresh = false;
  list.replaceChildren(...items);
  $("alert-count").textContent = String(alerts.length);
  $("no-alerts").hidden = alerts.length > 0;
  tickAges();
}

const pendingAddress = new Set();

async function fetchAddress(deviceId) {
  // personal data, fetched only for a signed-in operator; the console audits each view
  if (pendingAddress.has(deviceId)) return;
  pendingAddress.add(deviceId);
  try {
    const response = await fetch(`/api/devices/${encodeURIComponent(deviceId)}`,
      { credentials: "same-origin" });
    const info = response.ok ? await response.json() : { address: null };
    const shown = info.address ? [info.address, info.floor].filter(Boolean).join(", ") : null;
    state.addresses.set(deviceId, shown);
    for (const el of document.querySelectorAll(`.alert[data-device-id="${deviceId}"] .address`)) {
      el.textContent = shown ?? t("no_address");
    }
  } finally {
    pendingAddress.delete(deviceId);
  }
}

function addDeviceEvent(e) {
  const li = document.createElement("li");
  li.className = "u" + e.urgency;
  li.dataset.type = e.type;
  li.dataset.deviceId = e.device_id;
  const time = document.createElement("time");
  time.textContent = new Date(e.received_ms).toLocaleTimeString();
  const what = document.createElement("span");
  what.className = "what";
  what.textContent = `${whatOf(e)} · ${e.label || e.device_id} (${e.device_id}) · ${e.district || "—"}`;
  li.append(time, what);
  $("events").prepend(li);
  while ($("events").children.length > 200) $("events").lastChild.remove();
}

function tickAges() {
  const now = Date.now();
  for (const el of document.querySelectorAll(".age[data-ms]")) {
    const s = Math.max(0, Math.round((now - Number(el.dataset.ms)) / 1000));
    el.textContent = s < 60 ? `${s}${t("ago_s")}`
      : s < 3600 ? `${Math.floor(s / 60)}${t("ago_m")}` : `${Math.floor(s / 3600)}${t("ago_h")}`;
  }
}

// ---- actions ---------------------------------------------------------------------------

async function act(alert, stage, li) {
  const error = li.querySelector(".error");
  error.textContent = "";
  for (const b of li.querySelectorAll("button")) b.disabled = true;
  const response = await api("POST", `/api/alerts/${encodeURIComponent(alert.event_id)}/${stage}`);
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error; } catch (_) { /* not JSON */ }
    error.textContent = message;
    renderAlerts();
    return;
  }
  stopFlash();
  // the stage also comes back over the stream (to every page); apply it here at once
  onStage({ event_id: alert.event_id, stage, operator: $("who").textContent, at_ms: Date.now() });
}

// ---- sound and title flash ---------------------------------------------------------------

function unlockAudio() {
  try {
    state.audio = state.audio || new AudioContext();
    if (state.audio.state === "suspended") state.audio.resume();
  } catch (_) { state.audio = null; }
}

function beep() {
  // two short tones made here: no sound file to ship or fetch
  const ctx = state.audio;
  if (!ctx) return;
  const now = ctx.currentTime;
  for (const [i, freq] of [[0, 880], [1, 660], [2, 880]]) {
    const osc = ctx.createOscillator();
    const gain = ctx.createGain();
    osc.type = "square";
    osc.frequency.value = freq;
    gain.gain.setValueAtTime(0.0001, now + i * 0.25);
    gain.gain.exponentialRampToValueAtTime(0.2, now + i * 0.25 + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, now + i * 0.25 + 0.2);
    osc.connect(gain).connect(ctx.destination);
    osc.start(now + i * 0.25);
    osc.stop(now + i * 0.25 + 0.22);
  }
  document.body.dataset.beeps = String(Number(document.body.dataset.beeps || 0) + 1);
}

function announce(alert) {
  beep();
  stopFlash();
  let on = false;
  let count = 0;
  state.flash = setInterval(() => {
    on = !on;
    document.title = on ? `🔴 ${t("new_alert")} ${whatOf(alert)}` : t("title");
    if (++count >= 30) stopFlash();
  }, 500);
  document.title = `🔴 ${t("new_alert")} ${whatOf(alert)}`;
}

function stopFlash() {
  if (state.flash) clearInterval(state.flash);
  state.flash = null;
  document.title = t("title");
}

// ---- live video (WHEP through the console) -------------------------------------------------

async function openVideo(deviceId) {
  closeVideo();
  $("video-panel").hidden = false;
  $("video-device").textContent = deviceId;
  const status = $("video-status");
  status.textContent = t("video_connecting");
  const video = $("video");
  delete video.dataset.firstFrameMs;
  // loopback and LAN only: no STUN server, so the browser asks nothing outside
  const pc = new RTCPeerConnection({ iceServers: [] });
  state.video = { pc, location: null, device: deviceId };
  pc.addTransceiver("video", { direction: "recvonly" });
  // a send slot for talk-back, empty until push-to-talk: the microphone is asked for then,
  // and put in place without a new offer (WHEP has no renegotiation);
  // both ways: the door's microphone comes back on it when the doorbell has one switched on
  state.video.audio = pc.addTransceiver("audio", { direction: "sendrecv" });
  pc.ontrack = (ev) => {
    if (ev.track.kind === "audio") {
      $("door-audio").srcObject = new MediaStream([ev.track]);
      return;
    }
    video.srcObject = ev.streams[0] || new MediaStream([ev.track]);
    const mark = () => {
      video.dataset.firstFrameMs = String(Date.now());
      status.textContent = t("video_playing");
    };
    if (video.requestVideoFrameCallback) video.requestVideoFrameCallback(mark);
    else video.addEventListener("loadeddata", mark, { once: true });
  };
  try {
    await pc.setLocalDescription(await pc.createOffer());
    // the gateway does not take trickled candidates: wait for all of ours (bounded)
    await new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      const done = () => { if (pc.iceGatheringState === "complete") resolve(); };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, 2000);
    });
    // A doorbell starts streaming when it raises the alert, a moment after the operator
    // may already have clicked: while the gateway says "not streaming" (404), ask again.
    const giveUp = Date.now() + 15000;
    let response, text;
    for (;;) {
      response = await api("POST", `/api/whep/${encodeURIComponent(deviceId)}`,
        pc.localDescription.sdp, { "Content-Type": "application/sdp" });
      text = await response.text();
      if (response.status !== 404 || Date.now() > giveUp || state.video?.pc !== pc) break;
      await new Promise((r) => setTimeout(r, 300));
    }
    if (state.video?.pc !== pc) return;
    if (response.status !== 201) throw new Error(text.trim() || `HTTP ${response.status}`);
    if (state.video && state.video.pc === pc) state.video.location = response.headers.get("Location");
    await pc.setRemoteDescription({ type: "answer", sdp: text });
  } catch (err) {
    status.textContent = `${t("video_failed")}: ${err.message}`;
    $("video-panel").dataset.error = err.message;
  }
}

// ---- an alert's recording, with its timeline (audited playback) ---------------------------

async function openRecording(eventId) {
  $("recording-panel").hidden = false;
  $("recording-alert").textContent = eventId;
  const status = $("recording-status");
  const timeline = $("recording-timeline");
  const list = $("recording-list");
  timeline.replaceChildren();
  list.replaceChildren();
  status.textContent = "…";
  const response = await api("GET", `/api/alerts/${encodeURIComponent(eventId)}/recordings`);
  const body = await response.json();
  if (response.status !== 200) { status.textContent = body.error || `HTTP ${response.status}`; return; }
  for (const step of body.timeline) {
    const li = document.createElement("li");
    li.textContent = `${new Date(step.at * 1000).toLocaleTimeString()} ${step.what} (${step.by})`;
    timeline.append(li);
  }
  status.textContent = body.recordings.length ? "" : t("no_recording");
  for (const r of body.recordings) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "play";
    button.textContent = `${t("play")} ${new Date(r.started * 1000).toLocaleTimeString()}`;
    button.addEventListener("click", () => {
      const reason = $("recording-reason").value.trim();
      if (!reason) { status.textContent = t("play_need_reason"); return; }
      const q = new URLSearchParams({ index: String(r.index), reason });
      $("recording").src = `/api/alerts/${encodeURIComponent(eventId)}/play?${q}`;
      status.textContent = "";
    });
    list.append(button);
  }
}

async function startTalk(ev) {
  const v = state.video;
  if (!v || !v.location || v.talking) return;
  ev.preventDefault();
  const reason = $("talk-reason").value.trim();
  const status = $("video-status");
  if (!reason) { status.textContent = t("talk_need_reason"); return; }
  v.talking = true;
  try {
    if (!v.mic) {
      const media = await navigator.mediaDevices.getUserMedia({ audio: true });
      v.mic = media.getAudioTracks()[0];
      await v.audio.sender.replaceTrack(v.mic);
    }
    v.mic.enabled = true;
    const response = await api("POST", `${v.location}/talk`, { on: true, reason });
    if (response.status !== 200) throw new Error((await response.text()).trim());
    if (!v.talking) return stopTalk(); // released while the request was on its way
    status.textContent = t("talking");
    $("talk").dataset.talking = "1";
  } catch (err) {
    v.talking = false;
    if (v.mic) v.mic.enabled = false;
    status.textContent = `${t("talk_failed")}: ${err.message}`;
  }
}

function stopTalk() {
  const v = state.video;
  if (!v || !v.talking) return;
  v.talking = false;
  if (v.mic) v.mic.enabled = false; // silence at once, whatever the network does
  delete $("talk").dataset.talking;
  $("video-status").textContent = t("video_playing");
  if (v.location) api("POST", `${v.location}/talk`, { on: false });
}

function closeVideo() {
  const v = state.video;
  state.video = null;
  if (!v) return;
  if (v.mic) v.mic.stop();
  v.pc.close();
  if (v.location) api("DELETE", v.location);
  $("video").srcObject = null;
  $("door-audio").srcObject = null;
  $("video-panel").hidden = true;
}

document.addEventListener("DOMContentLoaded", start);

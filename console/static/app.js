// Ansimi console page: live alerts over server-sent events, actions through the console
// (never straight to the gateway: the browser holds a session cookie, not the gateway's
// token), door-camera video over WHEP through the console. No external assets.
"use strict";

// One language per page: every word the page shows comes from here.
const TEXT = {
  ko: {
    title: "Ansimi 관제 콘솔", offline: "연결 끊김", online: "실시간", audit: "감사 기록 CSV",
    logout: "로그아웃", signin: "운영자 로그인", name: "이름", password: "비밀번호",
    signin_button: "로그인", open_incidents: "진행 중 사건", no_incidents: "진행 중인 사건이 없습니다",
    ack_hint: "A: 맨 위 사건 접수",
    live_video: "실시간 영상", close_video: "영상 닫기", device_events: "장치 이벤트",
    acknowledge: "접수", dispatch: "출동 요청", close: "종료", watch: "현관 영상 보기",
    outcome: "종료 사유", outcome_pick: "선택…", close_confirm: "종료 확인",
    o_real: "실제 긴급 상황", o_false_alarm: "오경보", o_test: "시험",
    o_cancelled_by_user: "사용자 취소", o_duress: "강압 상황",
    history: "사건 기록", procedure: "절차", escalated: "상향 보고", map_attribution: "구 경계",
    lang_other: "English", new_alert: "새 사건!", wrong_login: "이름 또는 비밀번호가 틀립니다",
    stage_new: "미접수", stage_acknowledged: "접수됨", stage_dispatched: "출동",
    stage_closed: "종료", no_address: "주소 미등록", cancelled: "사용자 취소",
    floor: "층", victim: "피해자", guardian: "보호자", other: "연락처",
    now_online: "온라인", now_offline: "오프라인", now_mains: "상용 전원", now_battery: "배터리",
    now_heard: "마지막 수신", now_unknown: "상태 미상", presses: "회 누름",
    registry_stale: "장치 목록을 게이트웨이에서 받지 못했습니다: 새 장치의 경보를 확인할 수 없습니다",
    refused: "건의 전달이 거부되었습니다 (콘솔 로그 확인)",
    video_connecting: "연결 중…", video_playing: "재생 중", video_failed: "영상 연결 실패",
    recording: "녹화 보기", play_reason: "재생 이유", play: "재생",
    no_recording: "녹화 없음", play_need_reason: "이유를 먼저 적어 주세요",
    talk: "눌러서 말하기", talk_reason: "말하는 이유", talking: "말하는 중…",
    talk_failed: "말하기 실패", talk_need_reason: "이유를 먼저 적어 주세요",
    ago_s: "초 전", ago_m: "분 전", ago_h: "시간 전",
    k_duress: "강압 신호", k_store_robbery: "매장 강도 (무음)", k_stalking_urgent: "스토킹 비상벨 (긴급)",
    k_stalking: "스토킹 비상벨", k_doorbell_emergency: "초인종 비상", k_tamper: "장치 훼손",
    k_power_lost: "정전", k_offline: "장치 오프라인", k_doorbell_ring: "초인종",
    k_district_outage: "구역 장애 (여러 장치 오프라인)",
    h_event: "이벤트", h_stage: "단계", h_escalation: "상향 보고", h_procedure: "절차", h_kind: "유형 변경",
    t_press: "비상벨", t_long_press: "비상벨 (길게)", t_duress: "강압 신호",
    t_doorbell_ring: "초인종", t_tamper: "장치 훼손", t_tamper_cleared: "훼손 해제",
    t_power_loss: "정전", t_power_restored: "전원 복구", t_offline: "장치 오프라인",
    t_online: "장치 온라인", t_battery: "배터리 전원", t_mains: "상용 전원",
    t_cancel: "경보 취소", t_escalation: "상향 보고", urgent: "긴급", silent: "무음",
    t_test: "시험 누름 (점검)",
    t_secondary_path_down: "예비 경로(SMS) 불가", t_secondary_path_up: "예비 경로(SMS) 복구",
    t_disk_low: "게이트웨이 디스크 부족", t_disk_ok: "게이트웨이 디스크 정상",
    t_district_outage: "구역 장애", t_district_restored: "구역 복구",
  },
  en: {
    title: "Ansimi control console", offline: "disconnected", online: "live",
    audit: "Audit log CSV", logout: "Sign out", signin: "Operator sign-in", name: "Name",
    password: "Password", signin_button: "Sign in", open_incidents: "Open incidents",
    no_incidents: "No open incidents", ack_hint: "A: acknowledge the top incident",
    live_video: "Live video", close_video: "Close video",
    device_events: "Device events", acknowledge: "Acknowledge", dispatch: "Request dispatch",
    close: "Close", watch: "Watch door camera", outcome: "Outcome", outcome_pick: "choose…",
    close_confirm: "Confirm close", o_real: "Real emergency", o_false_alarm: "False alarm",
    o_test: "Test", o_cancelled_by_user: "Cancelled by user", o_duress: "Duress",
    history: "Incident history", procedure: "Procedure", escalated: "escalated",
    map_attribution: "District outlines",
    lang_other: "한국어", new_alert: "NEW INCIDENT!",
    wrong_login: "Wrong name or password", stage_new: "new",
    stage_acknowledged: "acknowledged", stage_dispatched: "dispatched",
    stage_closed: "closed", no_address: "no address on file", cancelled: "cancelled by user",
    floor: "floor", victim: "victim", guardian: "guardian", other: "contact",
    now_online: "online", now_offline: "offline", now_mains: "mains", now_battery: "battery",
    now_heard: "last heard", now_unknown: "state unknown", presses: "presses",
    registry_stale: "the device list could not be fetched from the gateway: alerts from new devices cannot be verified",
    refused: "deliveries refused (see the console's log)",
    video_connecting: "connecting…", video_playing: "playing", video_failed: "video failed",
    recording: "Recording", play_reason: "why you play it", play: "Play",
    no_recording: "no recording", play_need_reason: "say why first",
    talk: "Hold to talk", talk_reason: "why you speak", talking: "talking…",
    talk_failed: "talk-back failed", talk_need_reason: "say why first",
    ago_s: "s ago", ago_m: "min ago", ago_h: "h ago",
    k_duress: "Duress", k_store_robbery: "Store robbery (silent)",
    k_stalking_urgent: "Stalking bell (urgent)", k_stalking: "Stalking bell",
    k_doorbell_emergency: "Doorbell emergency", k_tamper: "Tamper", k_power_lost: "Power lost",
    k_offline: "Bell offline", k_doorbell_ring: "Doorbell ring",
    k_district_outage: "District outage (many bells offline)",
    h_event: "event", h_stage: "stage", h_escalation: "escalation", h_procedure: "procedure",
    h_kind: "kind changed",
    t_press: "Emergency bell", t_long_press: "Emergency bell (long press)", t_duress: "Duress",
    t_doorbell_ring: "Doorbell", t_tamper: "Tamper", t_tamper_cleared: "Tamper cleared",
    t_power_loss: "Power lost", t_power_restored: "Power restored", t_offline: "Device offline",
    t_online: "Device online", t_battery: "On battery", t_mains: "On mains power",
    t_cancel: "Alert cancelled", t_escalation: "Escalation", urgent: "URGENT", silent: "silent",
    t_test: "Test press (check)",
    t_secondary_path_down: "Backup path (SMS) down", t_secondary_path_up: "Backup path (SMS) back",
    t_disk_low: "Gateway disk low", t_disk_ok: "Gateway disk ok",
    t_district_outage: "District outage", t_district_restored: "District restored",
  },
};

// Each kind's mark, told apart without colour too: a shape and its words. Colours in app.css.
const ICONS = {
  duress: "⚠", store_robbery: "◆", stalking_urgent: "▲", stalking: "△",
  doorbell_emergency: "⌂!", tamper: "✂", power_lost: "⚡", offline: "⊘", doorbell_ring: "⌂",
  district_outage: "⊘⊘",
};
// The alarm by priority: more urgent is higher, faster, more tones, repeated sooner.
function soundOf(priority) {
  if (priority <= 2) return { name: "critical", tones: [988, 740, 988, 740], every_ms: 4000 };
  if (priority <= 5) return { name: "high", tones: [880, 660], every_ms: 8000 };
  return { name: "low", tones: [523], every_ms: 15000 };
}

const state = {
  lang: localStorage.getItem("ansimi.lang") || "ko",
  csrf: "",
  incidents: new Map(), // incident id -> summary (GET /api/incidents)
  details: new Map(), // incident id -> {history, procedure}, refetched when it changes
  devices: new Map(), // device id -> its card data (personal, audited): once per page load
  closing: new Map(), // incident id -> the outcome chosen so far, while its form is open
  historyOpen: new Set(),
  source: null,
  audio: null,
  flash: null,
  alarm: null, // the repeating sound while an incident is unacknowledged
  video: null, // {pc, location, device}
  health: null,
  map: null, // {map, layer, markers, districts}
  tileUrl: "",
  reloading: null,
  rendering: null,
  renderedAt: 0,
  cards: new Map(), // incident id -> {key, li}: the card built, and from what (cardKey)
};

const $ = (id) => document.getElementById(id);
const t = (key) => TEXT[state.lang][key] ?? TEXT.en[key] ?? key;
const locale = () => (state.lang === "ko" ? "ko-KR" : "en-GB");
const timeOf = (ms) => new Date(ms).toLocaleTimeString(locale());

function applyLanguage() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of document.querySelectorAll("[data-i18n-placeholder]")) {
    el.placeholder = t(el.dataset.i18nPlaceholder);
  }
  $("lang").textContent = t("lang_other");
  if (!state.flash) document.title = t("title");
  renderIncidents();
  for (const li of $("events").children) li.querySelector(".what").textContent = eventWords(li.event);
  for (const li of $("events").children) li.querySelector("time").textContent = timeOf(li.event.received_ms);
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
  document.addEventListener("keydown", shortcut);
  window.addEventListener("pagehide", closeVideo); // leave the gateway's viewer slot free
  applyLanguage();
  const me = await fetch("/api/me", { credentials: "same-origin" });
  if (me.ok) await signedIn(await me.json());
  else showSignIn();
  setInterval(tickTimers, 1000);
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
  stopAlarm();
  state.incidents.clear();
  state.details.clear();
  state.devices.clear();
  drawMap(); // no incident of the last operator stays on the map
  showSignIn();
}

async function signedIn(me) {
  state.csrf = me.csrf;
  state.tileUrl = me.tile_url || "";
  $("who").textContent = me.name;
  $("signin").hidden = true;
  $("desk").hidden = false;
  $("logout").hidden = false;
  $("audit").hidden = false;
  document.body.dataset.operator = me.name;
  setUpMap();
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
  const response = await fetch("/api/incidents", { credentials: "same-origin" });
  if (response.status === 401) return showSignIn();
  const data = await response.json();
  const before = new Set(state.incidents.keys());
  const first = state.incidents.size === 0 && !document.body.dataset.loaded;
  const previous = new Map(state.incidents);
  state.incidents.clear();
  for (const i of data.incidents) {
    const was = previous.get(i.id);
    if (was) i.shown_ms = was.shown_ms; // a new card is stamped when it is drawn
    // what changed since the last look is fetched again: history, checklist
    if (!was || was.updated_ms !== i.updated_ms || was.state !== i.state
      || was.escalation_level !== i.escalation_level) state.details.delete(i.id);
    state.incidents.set(i.id, i);
  }
  $("events").replaceChildren();
  for (const e of data.events.slice().reverse()) addDeviceEvent(e);
  document.body.dataset.loaded = "1";
  renderIncidents();
  const fresh = data.incidents.filter((i) => !before.has(i.id));
  if (!first && fresh.length) announce(fresh[0]);
  updateAlarm();
}

const STAGE_ORDER = ["new", "acknowledged", "dispatched", "closed"];

function applyIncident(i) {
  // one incident as it is now, pushed by the console when it changed: that card only,
  // not the whole desk fetched again (200 open incidents made each event cost a reload)
  const was = state.incidents.get(i.id);
  if (was) {
    i.shown_ms = was.shown_ms;
    // stages only go forward: one applied here already (act) is not undone by a push
    if (STAGE_ORDER.indexOf(was.state) > STAGE_ORDER.indexOf(i.state)) i.state = was.state;
  }
  if (i.state === "closed") state.incidents.delete(i.id);
  else state.incidents.set(i.id, i);
  if (!was || was.updated_ms !== i.updated_ms || was.state !== i.state
    || was.escalation_level !== i.escalation_level) state.details.delete(i.id);
  scheduleRender();
  if (!was && i.state !== "closed") announce(i);
  updateAlarm();
}

function applyStage(data) {
  // a stage set at this console (by any of its pages)
  const i = state.incidents.get(data.id);
  if (!i) return;
  if (STAGE_ORDER.indexOf(data.stage) > STAGE_ORDER.indexOf(i.state)) {
    state.incidents.set(i.id, { ...i, state: data.stage,
      stages: { ...i.stages, [data.stage]: { at_ms: data.at_ms, actor: data.operator } } });
  }
  if (data.stage === "closed") state.incidents.delete(i.id);
  state.details.delete(i.id);
  scheduleRender();
  updateAlarm();
}

function scheduleRender() {
  // a desk of 200 incidents fetches 200 details and 200 cards' data on its first look:
  // at most one full render per 50 ms for such a burst, not one per answer (quadratic);
  // a lone answer is rendered at once
  if (state.rendering) return;
  const wait = Math.max(0, state.renderedAt + 50 - Date.now());
  state.rendering = setTimeout(() => {
    state.rendering = null;
    renderIncidents();
  }, wait);
}

function scheduleReload() {
  // a burst of events (three presses, an offline) is one fetch of the grouped list
  if (state.reloading) return;
  state.reloading = setTimeout(async () => {
    state.reloading = null;
    await reload();
  }, 50);
}

function connect() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/stream");
  state.source = source;
  source.addEventListener("hello", () => {
    setLink(true);
    document.body.dataset.live = "1";
  });
  source.addEventListener("event", (msg) => {
    // an incident's event comes with the incident itself (below); one outside any
    // incident joins the device events; an older gateway's needs the list grouped again
    const e = JSON.parse(msg.data);
    if (e.loose) addDeviceEvent(e);
    else if (!e.incident_id) scheduleReload();
  });
  source.addEventListener("incident", (msg) => applyIncident(JSON.parse(msg.data)));
  source.addEventListener("incident_stage", (msg) => applyStage(JSON.parse(msg.data)));
  source.addEventListener("incident_tick", (msg) => {
    state.details.delete(JSON.parse(msg.data).id); // its checklist is fetched again
    scheduleRender();
  });
  source.addEventListener("stage", () => scheduleReload()); // an alert route's stage
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

// ---- rendering -------------------------------------------------------------------------

function eventWords(e) {
  let what = e.type;
  if (e.type === "alert") what = t("t_" + e.body.trigger);
  if (e.type === "status") what = t("t_" + e.body.state);
  if (e.type === "heartbeat") what = t("t_" + e.body.power);
  if (e.type === "cancel") what = t("t_cancel");
  if (e.type === "escalation") what = t("t_escalation");
  if (e.device_id) what += ` · ${e.label || e.device_id} (${e.device_id}) · ${e.district || "—"}`;
  return what;
}

function compare(x, y) {
  // the desk's order: priority (1 first), then the oldest
  return x.priority - y.priority || x.opened_ms - y.opened_ms || (x.id < y.id ? -1 : 1);
}

function sortedIncidents() {
  return [...state.incidents.values()].filter((i) => i.state !== "closed").sort(compare);
}

function renderIncidents() {
  const list = $("alerts");
  if (!list) return;
  const incidents = sortedIncidents();
  const template = $("alert-template");
  // a card is built again only when what it shows changed: rebuilding 200 cards for each
  // arrival kept the desk of 200 open incidents seconds behind (bench/console.py)
  const cards = new Map();
  const items = incidents.map((i) => {
    // stamped when its card is first drawn (bench/console.py reads it)
    if (i.shown_ms === undefined) i.shown_ms = Date.now();
    const key = cardKey(i);
    const kept = state.cards.get(i.id);
    const li = kept && kept.key === key ? kept.li : renderCard(template, i);
    cards.set(i.id, { key, li });
    return li;
  });
  state.cards = cards;
  place(list, items);
  $("alert-count").textContent = String(incidents.length);
  $("no-alerts").hidden = incidents.length > 0;
  tickTimers();
  drawMap();
  state.renderedAt = Date.now();
}

function place(list, items) {
  // the list made to hold `items` in order, touching only what moved, came or went: the
  // cards that stay where they were are not moved (moving all 200 laid the desk out again)
  const wanted = new Set(items);
  for (const node of [...list.children]) if (!wanted.has(node)) node.remove();
  let at = list.firstElementChild;
  for (const li of items) {
    if (li === at) at = at.nextElementSibling;
    else list.insertBefore(li, at);
  }
}

function cardKey(i) {
  // everything renderCard reads
  return JSON.stringify([state.lang, i, state.devices.get(i.device_id) ?? null,
    state.details.get(i.id) ?? null, state.closing.has(i.id), state.closing.get(i.id) ?? null,
    state.historyOpen.has(i.id)]);
}

function renderCard(template, i) {
  const li = template.content.firstElementChild.cloneNode(true);
  li.dataset.id = i.id;
  li.dataset.eventId = i.first_alert_id; // the alert that opened it (the bench finds it so)
  li.dataset.deviceId = i.device_id;
  li.dataset.kind = i.kind;
  li.dataset.priority = String(i.priority);
  li.dataset.stage = i.state;
  li.dataset.shownMs = String(i.shown_ms);
  li.classList.add("k-" + i.kind);
  if (i.cancelled) li.classList.add("cancelled");
  for (const el of li.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  li.querySelector(".icon").textContent = ICONS[i.kind] || "●";
  let what = t("k_" + i.kind);
  if (i.presses > 1) what += ` · ${i.presses}${state.lang === "ko" ? "" : " "}${t("presses")}`;
  if (i.cancelled) what += ` · ${t("cancelled")}`;
  li.querySelector(".what").textContent = what;
  const stage = li.querySelector(".stage");
  stage.textContent = t("stage_" + i.state);
  stage.classList.add(i.state);
  stage.title = Object.entries(i.stages || {}).map(([name, m]) =>
    `${t("stage_" + name)}: ${m.actor} ${timeOf(m.at_ms)}`).join("\n");
  if (i.escalation_level > 0) {
    const mark = li.querySelector(".escalation");
    mark.hidden = false;
    mark.textContent = `⇧ ${t("escalated")} ${i.escalation_level}: ${i.escalated_to.join(" → ")}`;
  }
  li.querySelector(".offline-mark").hidden = !i.offline;
  li.querySelector(".timer").dataset.ms = String(i.opened_ms);
  li.querySelector(".district").textContent = i.district || "—";
  li.querySelector(".device").textContent = i.device_id;
  showDevice(li, i);
  showDetail(li, i);
  const ack = li.querySelector(".ack");
  ack.disabled = i.state !== "new";
  li.querySelector(".dispatch").disabled = i.state === "dispatched";
  ack.addEventListener("click", () => act(i, "acknowledged", li));
  li.querySelector(".dispatch").addEventListener("click", () => act(i, "dispatched", li));
  const form = li.querySelector(".outcome");
  const choice = form.querySelector("select");
  form.hidden = !state.closing.has(i.id);
  // every render rebuilds the card: the operator's choice must survive it
  choice.value = state.closing.get(i.id) || "";
  choice.addEventListener("change", () => state.closing.set(i.id, choice.value));
  li.querySelector(".close").addEventListener("click", () => {
    // closing asks why: the outcome is the incident's record
    if (!state.closing.has(i.id)) state.closing.set(i.id, "");
    form.hidden = false;
    choice.focus();
  });
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const outcome = form.querySelector("select").value;
    if (outcome) act(i, "closed", li, { outcome });
  });
  const history = li.querySelector(".history");
  history.open = state.historyOpen.has(i.id);
  history.addEventListener("toggle", () => {
    if (history.open) state.historyOpen.add(i.id); else state.historyOpen.delete(i.id);
  });
  const device = state.devices.get(i.device_id);
  if ((device && device.kind === "doorbell") || i.kind.startsWith("doorbell")) {
    const watch = li.querySelector(".watch");
    watch.hidden = false;
    watch.addEventListener("click", () => openVideo(i.device_id));
    // the incident's recording (pre-alarm, then live), keyed on the alert that opened it
    const recording = li.querySelector(".recording");
    recording.hidden = false;
    recording.addEventListener("click", () => openRecording(i.first_alert_id));
  }
  return li;
}

function showDevice(li, i) {
  if (i.kind === "district_outage") {
    // the district's incident, told about its first bell: not that bell's person, so no
    // one's address or phones (fetching them would audit a view nobody needed)
    li.querySelector(".address").textContent = `${t("k_district_outage")} · ${i.district || "—"}`;
    return;
  }
  const device = state.devices.get(i.device_id);
  if (device === undefined) {
    li.querySelector(".address").textContent = "…";
    fetchDevice(i.device_id);
    return;
  }
  li.querySelector(".label").textContent = device.label || device.kind || "";
  li.querySelector(".address").textContent = addressOf(device);
  const phones = li.querySelector(".phones");
  phones.replaceChildren(...(device.phones || []).map((p) => {
    const item = document.createElement("li");
    item.className = "phone " + p.role;
    const role = document.createElement("span");
    role.textContent = `${t(p.role)}${p.name ? " " + p.name : ""}`;
    const number = document.createElement("a");
    number.href = `tel:${p.number}`;
    number.textContent = p.number;
    item.append(role, " ", number);
    return item;
  }));
  const notes = li.querySelector(".notes");
  notes.textContent = device.notes || "";
  notes.hidden = !device.notes;
  // the bell's state now: the gateway's (it hears every heartbeat) where it says, else
  // what this console last received
  const fromGateway = (state.details.get(i.id) || {}).device;
  const now = fromGateway ? { online: fromGateway.online, power: fromGateway.power,
    last_heard_ms: fromGateway.last_seen_ms } : (device.now || {});
  const parts = [];
  if (now.online === true) parts.push(t("now_online"));
  if (now.online === false) parts.push(t("now_offline"));
  if (now.power) parts.push(t("now_" + now.power));
  if (now.last_heard_ms) parts.push(`${t("now_heard")} ${timeOf(now.last_heard_ms)}`);
  li.querySelector(".now").textContent = parts.join(" · ") || t("now_unknown");
}

function addressOf(device) {
  // "17 Seongmisan-ro, 4F-402" or "서울 마포구 … 4층": a floor is a floor, not ", 15"
  if (!device.address) return t("no_address");
  if (!device.floor) return device.address;
  const floor = /^-?[0-9]+$/.test(device.floor)
    ? (state.lang === "ko" ? `${device.floor}${t("floor")}` : `${t("floor")} ${device.floor}`)
    : device.floor;
  return `${device.address} (${floor})`;
}

function showDetail(li, i) {
  const detail = state.details.get(i.id);
  if (detail === undefined) {
    fetchDetail(i.id);
    return;
  }
  const steps = li.querySelector(".procedure");
  steps.replaceChildren(...(detail.procedure || []).map((p) => {
    const item = document.createElement("li");
    item.dataset.step = p.step;
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.checked = Boolean(p.done);
    box.disabled = Boolean(p.done);
    box.addEventListener("change", () => tick(i, p.step, li));
    label.append(box, " ", p[state.lang] || p.en || p.step);
    item.append(label);
    if (p.done) {
      const who = document.createElement("small");
      who.textContent = ` ${p.done.actor} ${timeOf(p.done.at_ms)}`;
      item.append(who);
    }
    return item;
  }));
  const history = li.querySelector(".history ol");
  history.replaceChildren(...(detail.history || []).map((h) => {
    const item = document.createElement("li");
    const d = h.detail || {};
    let what = t("h_" + h.what);
    if (h.what === "event") what = eventWords({ type: d.type, body: d.body || {} });
    if (h.what === "stage") what = `${t("h_stage")}: ${t("stage_" + d.stage)}${d.outcome ? " (" + t("o_" + d.outcome) + ")" : ""}`;
    if (h.what === "escalation") what = `${t("h_escalation")} ${d.level}: ${d.to}`;
    if (h.what === "procedure") what = `${t("h_procedure")}: ${d.step}`;
    if (h.what === "kind") what = `${t("h_kind")}: ${t("k_" + d.from)} → ${t("k_" + d.to)}`;
    item.textContent = `${timeOf(h.at_ms)} ${what} · ${h.actor}`;
    return item;
  }));
}

const pending = new Set();

async function once(key, work) {
  if (pending.has(key)) return;
  pending.add(key);
  try { await work(); } finally { pending.delete(key); }
}

function fetchDevice(deviceId) {
  // personal data, fetched only for a signed-in operator; the console audits each view
  return once("d:" + deviceId, async () => {
    const response = await fetch(`/api/devices/${encodeURIComponent(deviceId)}`,
      { credentials: "same-origin" });
    state.devices.set(deviceId, response.ok ? await response.json() : { address: null });
    scheduleRender();
  });
}

function fetchDetail(id) {
  return once("i:" + id, async () => {
    const response = await fetch(`/api/incidents/${encodeURIComponent(id)}`,
      { credentials: "same-origin" });
    state.details.set(id, response.ok ? await response.json() : { history: [], procedure: [] });
    scheduleRender();
  });
}

function addDeviceEvent(e) {
  const li = document.createElement("li");
  li.event = e;
  li.className = "u" + e.urgency;
  li.dataset.type = e.type;
  li.dataset.deviceId = e.device_id;
  // a bell proving its path: marked as a test, never an incident (docs/incidents.md)
  if (e.type === "alert" && e.body.trigger === "test") li.classList.add("test");
  const time = document.createElement("time");
  time.textContent = timeOf(e.received_ms);
  const what = document.createElement("span");
  what.className = "what";
  what.textContent = eventWords(e);
  li.append(time, what);
  $("events").prepend(li);
  while ($("events").children.length > 200) $("events").lastChild.remove();
}

function tickTimers() {
  // the time since the press, on every open incident: mm:ss, then h:mm:ss
  const now = Date.now();
  for (const el of document.querySelectorAll(".timer[data-ms]")) {
    const s = Math.max(0, Math.floor((now - Number(el.dataset.ms)) / 1000));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    const two = (n) => String(n).padStart(2, "0");
    const text = hh ? `${hh}:${two(mm)}:${two(ss)}` : `${two(mm)}:${two(ss)}`;
    // written only when it changed: a render between two seconds leaves 200 timers alone
    if (el.textContent !== text) {
      el.textContent = text;
      el.dateTime = `PT${s}S`;
    }
  }
}

// ---- actions ---------------------------------------------------------------------------

async function act(incident, stage, li, body) {
  const error = li.querySelector(".error");
  error.textContent = "";
  for (const b of li.querySelectorAll("button")) b.disabled = true;
  const response = await api("POST",
    `/api/incidents/${encodeURIComponent(incident.id)}/${stage}`, body ?? {});
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error; } catch (_) { /* not JSON */ }
    error.textContent = message;
    for (const b of li.querySelectorAll("button")) b.disabled = false;
    return;
  }
  stopFlash();
  state.closing.delete(incident.id);
  // the stage also comes back over the stream (to every page); apply it here at once
  applyStage({ id: incident.id, stage, at_ms: Date.now(), operator: document.body.dataset.operator });
}

async function tick(incident, step, li) {
  const response = await api("POST",
    `/api/incidents/${encodeURIComponent(incident.id)}/procedure/${encodeURIComponent(step)}`);
  if (!response.ok) {
    let message = `HTTP ${response.status}`;
    try { message = (await response.json()).error; } catch (_) { /* not JSON */ }
    li.querySelector(".error").textContent = message;
  }
  state.details.delete(incident.id);
  renderIncidents();
}

function shortcut(ev) {
  // A acknowledges the most urgent incident not yet acknowledged (never while typing)
  if (ev.key !== "a" && ev.key !== "A") return;
  if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
  if (ev.target.closest && ev.target.closest("input, select, textarea")) return;
  if ($("desk").hidden) return;
  const top = sortedIncidents().find((i) => i.state === "new");
  if (!top) return;
  const li = document.querySelector(`.incident[data-id="${CSS.escape(top.id)}"]`);
  if (li) { ev.preventDefault(); act(top, "acknowledged", li); }
}

// ---- sound and title flash ---------------------------------------------------------------

function unlockAudio() {
  try {
    state.audio = state.audio || new AudioContext();
    if (state.audio.state === "suspended") state.audio.resume();
  } catch (_) { state.audio = null; }
}

function beep(sound) {
  // tones made here: no sound file to ship or fetch
  document.body.dataset.beeps = String(Number(document.body.dataset.beeps || 0) + 1);
  document.body.dataset.sound = sound.name;
  const ctx = state.audio;
  if (!ctx) return;
  const now = ctx.currentTime;
  sound.tones.forEach((freq, i) => {
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
  });
}

function updateAlarm() {
  // the sound of the most urgent unacknowledged incident, again and again until it is
  // acknowledged; silent when every incident has been
  const waiting = sortedIncidents().find((i) => i.state === "new");
  const sound = waiting ? soundOf(waiting.priority) : null;
  if (state.alarm && (!sound || state.alarm.name !== sound.name)) stopAlarm();
  if (sound && !state.alarm) {
    state.alarm = { name: sound.name, timer: setInterval(() => beep(sound), sound.every_ms) };
  }
  document.body.dataset.alarm = sound ? sound.name : "";
}

function stopAlarm() {
  if (state.alarm) clearInterval(state.alarm.timer);
  state.alarm = null;
}

function announce(incident) {
  beep(soundOf(incident.priority));
  stopFlash();
  let on = false;
  let count = 0;
  const words = t("k_" + incident.kind);
  state.flash = setInterval(() => {
    on = !on;
    document.title = on ? `🔴 ${t("new_alert")} ${words}` : t("title");
    if (++count >= 30) stopFlash();
  }, 500);
  document.title = `🔴 ${t("new_alert")} ${words}`;
}

function stopFlash() {
  if (state.flash) clearInterval(state.flash);
  state.flash = null;
  document.title = t("title");
}

// ---- the map ---------------------------------------------------------------------------

function setUpMap() {
  if (state.map || typeof L === "undefined") return;
  const map = L.map("map", { zoomControl: true, attributionControl: false })
    .setView([37.5665, 126.978], 11);
  const districts = L.geoJSON(null, { className: "district-outline", style: () => ({}) });
  const showOutlines = async () => {
    // where no tiles are reachable: Seoul's 25 districts, shipped with the page
    if (map.hasLayer(districts)) return;
    const response = await fetch("/static/vendor/seoul/districts.geojson");
    if (response.ok) districts.addData(await response.json());
    districts.addTo(map);
    if (!state.tileUrl) map.fitBounds(districts.getBounds()); // the whole city in view
    $("map").dataset.fallback = "1";
    drawMap();
  };
  if (state.tileUrl) {
    const tiles = L.tileLayer(state.tileUrl, { maxZoom: 19 }).addTo(map);
    tiles.once("tileerror", showOutlines);
  } else {
    showOutlines();
  }
  state.map = { map, markers: new Map(), districts };
}

function drawMap() {
  const m = state.map;
  if (!m) return;
  // one marker per located open incident, kept while it is open (made again, Leaflet's
  // permanent labels of removed markers would pile up)
  const hot = new Set();
  const wanted = new Set();
  for (const i of sortedIncidents()) {
    const device = state.devices.get(i.device_id);
    hot.add((i.district || "").toLowerCase());
    if (!device || typeof device.lat !== "number" || typeof device.lon !== "number") continue;
    const text = `${ICONS[i.kind] || "●"} ${t("k_" + i.kind)} · ${device.label || i.device_id}`;
    const key = `${i.id}|${i.kind}`;
    wanted.add(key);
    const kept = m.markers.get(key);
    if (kept) {
      // its label set again only when its words changed (the language): each set lays
      // the label out again, 200 of them on every render
      if (kept.words !== text) kept.setTooltipContent(labelOf(text));
      kept.words = text;
      continue;
    }
    const words = labelOf(text);
    const marker = L.circleMarker([device.lat, device.lon], {
      radius: 14 - Math.min(i.priority, 8), className: `marker k-${i.kind}`,
    });
    marker.bindTooltip(words, { permanent: true, direction: "right", className: "marker-label" });
    marker.words = text;
    marker.addTo(m.map);
    const el = marker.getElement && marker.getElement();
    if (el) el.dataset.incident = i.id;
    m.markers.set(key, marker);
  }
  for (const [key, marker] of m.markers) {
    if (wanted.has(key)) continue;
    marker.remove();
    m.markers.delete(key);
  }
  // the districts with an open incident stand out, located or not; a district's code is
  // its English name without "-gu" (ansimi/districts.py): a whole name, not a prefix, or
  // Jung-gu's incident would light Jungnang-gu too
  m.districts.eachLayer((layer) => {
    const name = String(layer.feature.properties.name_eng || "").toLowerCase();
    const el = layer.getElement && layer.getElement();
    if (el) el.classList.toggle("hot", hot.has(name.replace(/-gu$/, "")));
  });
}

function labelOf(text) {
  // an element, not a string: Leaflet puts a string in as HTML, and a label is not ours
  const words = document.createElement("span");
  words.textContent = text;
  return words;
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
    status.textContent = t("video_failed");
    status.title = err.message; // the browser's own words: on hover, not in the page's language
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
    // the page's language, not the browser's (one language per page)
    li.textContent = `${timeOf(step.at * 1000)} ${step.what} (${step.by})`;
    timeline.append(li);
  }
  status.textContent = body.recordings.length ? "" : t("no_recording");
  for (const r of body.recordings) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "play";
    button.textContent = `${t("play")} ${timeOf(r.started * 1000)}`;
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

// The fleet view: every bell of the operator's districts, sortable, filterable by district,
// with the reasons it needs a visit. Data: GET /api/fleet (the gateway's GET /fleet).
"use strict";

const WORDS = {
  ko: {
    title: "기기 현황", desk: "관제 화면", district: "구", all: "전체", visits_only: "방문 필요만",
    device: "기기", link: "연결", battery: "배터리 %", signal: "신호 %", outbox: "대기 메시지",
    drift: "시계 오차 (초)", cert: "인증서 만료", firmware: "펌웨어", config: "설정",
    needs_visit: "방문 필요", online: "연결됨", offline: "끊김", unknown: "모름",
    test_failed: "시험 실패", cert_expiring: "인증서 만료 임박", clock_drift: "시계 오차",
    low_battery: "배터리 부족", outbox_backlog: "메시지 적체", in_sync: "일치", drift_state: "불일치",
    summary: (n, v) => `기기 ${n}대, 방문 필요 ${v}대`, signin: "먼저 관제 화면에서 로그인하세요",
    lang: "English",
  },
  en: {
    title: "Fleet", desk: "Desk", district: "District", all: "All", visits_only: "Needs a visit only",
    device: "Device", link: "Link", battery: "Battery %", signal: "Signal %", outbox: "Outbox",
    drift: "Clock drift (s)", cert: "Certificate expires", firmware: "Firmware", config: "Config",
    needs_visit: "Needs a visit", online: "online", offline: "offline", unknown: "unknown",
    test_failed: "test failed", cert_expiring: "certificate expiring", clock_drift: "clock drift",
    low_battery: "low battery", outbox_backlog: "outbox backlog", in_sync: "in sync", drift_state: "drift",
    summary: (n, v) => `${n} devices, ${v} need a visit`, signin: "Sign in on the desk first",
    lang: "한국어",
  },
};

const state = {
  lang: localStorage.getItem("ansimi.lang") || "ko",
  devices: [],
  sortKey: "needs_visit",
  descending: true,
};

const $ = (id) => document.getElementById(id);
const t = (key) => (WORDS[state.lang] || WORDS.ko)[key] ?? key;

function translate() {
  document.documentElement.lang = state.lang;
  for (const el of document.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  $("lang").textContent = t("lang");
}

function sortValue(device, key) {
  const value = device[key];
  if (key === "needs_visit") return value.length;
  if (key === "online") return value === true ? 1 : value === false ? 0 : -1;
  return value ?? "";
}

function compare(a, b) {
  const x = sortValue(a, state.sortKey);
  const y = sortValue(b, state.sortKey);
  const order = x < y ? -1 : x > y ? 1 : a.device_id < b.device_id ? -1 : 1;
  return state.descending ? -order : order;
}

function cell(text) {
  const td = document.createElement("td");
  td.textContent = text;
  return td;
}

function render() {
  const district = $("district").value;
  const visitsOnly = $("visits-only").checked;
  const shown = state.devices
    .filter((d) => !district || d.district === district)
    .filter((d) => !visitsOnly || d.needs_visit.length > 0)
    .sort(compare);
  const body = document.querySelector("#fleet-table tbody");
  body.replaceChildren();
  for (const d of shown) {
    const row = document.createElement("tr");
    row.dataset.device = d.device_id;
    row.className = d.needs_visit.length ? "needs-visit" : "";
    const link = d.online === true ? t("online") : d.online === false ? t("offline") : t("unknown");
    const drift = d.clock_drift_ms == null ? "" : (d.clock_drift_ms / 1000).toFixed(1);
    const cert = d.cert_not_after_ms == null ? "" : new Date(d.cert_not_after_ms).toISOString().slice(0, 10);
    const config = d.config === "drift" ? t("drift_state") : t(d.config);
    row.append(
      cell(d.device_id), cell(d.district), cell(link), cell(d.battery_pct ?? ""),
      cell(d.link_quality ?? ""), cell(d.outbox_depth ?? ""), cell(drift), cell(cert),
      cell(d.firmware ?? ""), cell(config), cell(d.needs_visit.map(t).join(", ")),
    );
    body.append(row);
  }
  const visits = shown.filter((d) => d.needs_visit.length > 0).length;
  $("fleet-summary").textContent = t("summary")(shown.length, visits);
  for (const th of document.querySelectorAll("#fleet-table th")) {
    th.setAttribute("aria-sort", th.dataset.key !== state.sortKey ? "none" : state.descending ? "descending" : "ascending");
  }
}

function fillDistricts() {
  const select = $("district");
  const chosen = select.value;
  const names = [...new Set(state.devices.map((d) => d.district))].sort();
  for (const option of [...select.options].slice(1)) option.remove();
  for (const name of names) {
    const option = document.createElement("option");
    option.value = name;
    option.textContent = name;
    select.append(option);
  }
  select.value = names.includes(chosen) ? chosen : "";
}

async function load() {
  const response = await fetch("/api/fleet", { credentials: "same-origin" });
  const error = $("fleet-error");
  if (response.status === 401) {
    error.textContent = t("signin");
    error.hidden = false;
    return;
  }
  const data = await response.json();
  if (!response.ok) {
    error.textContent = data.error || `HTTP ${response.status}`;
    error.hidden = false;
    return;
  }
  error.hidden = true;
  state.devices = data.devices;
  fillDistricts();
  render();
}

function start() {
  translate();
  for (const th of document.querySelectorAll("#fleet-table th")) {
    th.addEventListener("click", () => {
      state.descending = state.sortKey === th.dataset.key ? !state.descending : false;
      state.sortKey = th.dataset.key;
      render();
    });
  }
  $("district").addEventListener("change", render);
  $("visits-only").addEventListener("change", render);
  $("lang").addEventListener("click", () => {
    state.lang = state.lang === "ko" ? "en" : "ko";
    localStorage.setItem("ansimi.lang", state.lang);
    translate();
    render();
  });
  load();
  setInterval(load, 30_000);
}

start();

// featcache's page: search, classify, browse and check, through the public HTTP API only.
// No framework and no build step. Views are chosen by the URL hash (#search, #browse, #check),
// so the back button and links work. The API key, when the server needs one, is asked once
// and kept in sessionStorage (this tab, until it closes).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "featcache-api-key";
const THUMB = 160;
const PAGE = 48;
const state = { info: null, needsKey: false, query: null, browse: { label: null, page: 0 },
                check: { which: "wrong", page: 0, dupPage: 0 } };

// ---- API ---------------------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, error, message) { super(message); this.status = status; this.error = error; }
  toString() { return `${this.error} (HTTP ${this.status}): ${this.message}`; }
}

function apiKey() { return sessionStorage.getItem(KEY_STORE); }

async function api(path, { form, raw } = {}) {
  const headers = {};
  const key = apiKey();
  if (key) headers["X-API-Key"] = key;
  let resp;
  try {
    resp = await fetch(path, form ? { method: "POST", body: form, headers } : { headers });
  } catch (e) {
    throw new ApiError(0, "NetworkError", `the server did not answer (${e.message})`);
  }
  if (!resp.ok) {
    let body = null;
    try { body = await resp.json(); } catch { /* not JSON */ }
    const err = new ApiError(resp.status, body?.error || resp.statusText || "Error",
                             body?.message || `request to ${path} failed`);
    if (resp.status === 401) askForKey(err.message);
    throw err;
  }
  return raw ? resp : resp.json();
}

function formOf(fields) {
  const f = new FormData();
  for (const [k, v] of Object.entries(fields)) if (v !== undefined && v !== null) f.append(k, v);
  return f;
}

function showError(err) {
  const box = $("error");
  if (!err) { box.hidden = true; box.textContent = ""; return; }
  box.textContent = err instanceof ApiError ? err.toString() : String(err.message || err);
  box.hidden = false;
}

// ---- thumbnails: fetched with the key, kept as object URLs for the session --------------------
const thumbs = new Map();  // "sha-size" -> Promise<object URL>
const THUMBS_KEPT = 3000;

function thumbUrl(sha, size = THUMB) {
  const id = `${sha}-${size}`;
  let p = thumbs.get(id);
  if (!p) {
    p = api(`/v1/images/${sha}/thumbnail?size=${size}`, { raw: true })
      .then((r) => r.blob()).then((b) => URL.createObjectURL(b));
    p.catch(() => thumbs.delete(id));
    thumbs.set(id, p);
    if (thumbs.size > THUMBS_KEPT) {
      const [oldId, old] = thumbs.entries().next().value;
      thumbs.delete(oldId);
      old.then(URL.revokeObjectURL, () => {});
    }
  }
  return p;
}

async function loadThumb(img, sha) {
  try {
    img.src = await thumbUrl(sha);
    await img.decode();
    if (img.naturalWidth < 64) img.classList.add("small");
  } catch (e) {
    img.alt = e instanceof ApiError ? `${e.error}: ${e.message}` : "no thumbnail";
    img.title = img.alt;
  }
}

// ---- cards and grids -------------------------------------------------------------------------
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const c of children) if (c) e.append(c);
  return e;
}

// The end of a key (file name and its folder): what tells images apart in a grid; the title has all of it.
function shortKey(key) {
  const parts = key.split(/[\\/]/).filter(Boolean);
  return parts.slice(-2).join("/") || key;
}

// One image card: thumbnail, label line (with a right-hand figure), key; a click searches its neighbours.
function card(item, right = "", note = null) {
  const img = el("img", { alt: item.key, loading: "eager" });
  const c = el("div", { class: "card", title: `${item.key}\n${item.sha256}`, "data-key": item.key, "data-sha": item.sha256 },
    img,
    el("div", { class: "meta" }, el("span", { class: "label", text: item.label ?? "(unlabelled)" }),
       el("span", { class: "num", text: right })),
    note,
    el("div", { class: "key", text: shortKey(item.key) }));
  c.addEventListener("click", () => go("search", { key: item.key, sha: item.sha256, label: item.label ?? "" }));
  return { node: c, ready: loadThumb(img, item.sha256) };
}

// Fill a grid with cards; once every thumbnail is decoded, mark it ready (grid.dataset.state = "ready").
// Resolves false when a newer fill replaced these cards meanwhile (then this one marks nothing).
async function fillGrid(grid, cards, emptyText) {
  const token = {};
  grid.fillToken = token;
  grid.dataset.state = "loading";
  grid.replaceChildren(...cards.map((c) => c.node));
  if (!cards.length) grid.append(el("p", { class: "empty", text: emptyText }));
  await Promise.all(cards.map((c) => c.ready));
  if (grid.fillToken !== token) return false;
  grid.dataset.state = "ready";
  return true;
}

// Call at the start of a request's work; the function it returns says whether no newer one of the same name began.
const generation = {};
function latest(name) {
  const mine = (generation[name] = (generation[name] || 0) + 1);
  return () => generation[name] === mine;
}

function pager(box, page, total, size, onPage) {
  const pages = Math.max(1, Math.ceil(total / size));
  const prev = el("button", { type: "button", text: "‹ prev" });
  const next = el("button", { type: "button", text: "next ›" });
  prev.disabled = page <= 0;
  next.disabled = page >= pages - 1;
  prev.onclick = () => onPage(page - 1);
  next.onclick = () => onPage(page + 1);
  box.replaceChildren(prev, el("span", { class: "muted", text: `page ${page + 1} of ${pages} (${total.toLocaleString()})` }), next);
}

// ---- search and classify ---------------------------------------------------------------------
function kValue() {
  const k = Math.min(100, Math.max(1, parseInt($("k").value, 10) || 24));
  $("k").value = k;
  return k;
}

function setQuery(src, caption) {
  $("query").hidden = false;
  $("query-img").src = src || "";
  $("query-caption").textContent = caption;
}

async function runSearch(query) {
  state.query = query;
  const current = latest("search");  // a newer search wins over a slower older one
  showError(null);
  performance.mark("search-start");
  const grid = $("results");
  const k = kValue();
  const form = query.file ? formOf({ image: query.file, k }) : formOf({ key: query.key, k });
  // An upload is embedded for both requests, side by side; a cached image is classified after its grid
  // (its cached vector needs no model), so the grid the person waits for goes first.
  if (query.file) classify(query);
  try {
    const res = await api("/v1/search", { form });
    if (!current()) return;
    $("results-title").textContent = `${res.hits.length} nearest neighbours`;
    $("results-note").textContent = `of ${query.file ? query.file.name : shortKey(query.key)}`;
    grid.dataset.query = query.key || query.file.name;
    if (!(await fillGrid(grid, res.hits.map((h) => card(h, h.score.toFixed(3))), "no neighbours"))) return;
    performance.mark("search-ready");
    performance.measure("search", "search-start", "search-ready");
  } catch (e) {
    if (!current()) return;
    grid.replaceChildren();
    grid.dataset.state = "error";
    showError(e);
  }
  if (!query.file && current()) classify(query);
}

async function classify(query) {
  const heads = state.info?.heads || [];
  $("classify").hidden = !heads.length;
  if (!heads.length) return;
  const list = $("classes");
  list.replaceChildren(el("li", { class: "muted", text: "…" }));
  const fields = { head: $("head-select").value, top_k: 5 };
  if (query.file) fields.image = query.file; else fields.sha256 = query.sha;
  try {
    const res = await api("/v1/classify", { form: formOf(fields) });
    if (state.query !== query) return;  // another image was chosen meanwhile
    list.replaceChildren(...res.top.map((t) => {
      const bar = el("div", { class: "bar" }, el("span"), el("b", { text: t.label }));
      bar.firstChild.style.width = `${(t.probability * 100).toFixed(1)}%`;
      return el("li", {}, bar, el("span", { class: "num", text: t.probability.toFixed(3) }));
    }));
  } catch (e) {
    if (state.query !== query) return;
    list.replaceChildren(el("li", { class: "wrong", text: e instanceof ApiError ? e.toString() : String(e) }));
  }
}

function searchFile(file) {
  if (!file) return;
  if (location.hash.split("?")[0] !== "#search") history.pushState(null, "", "#search");
  show("search");
  if (state.queryUrl) URL.revokeObjectURL(state.queryUrl);
  state.queryUrl = URL.createObjectURL(file);
  setQuery(state.queryUrl, `${file.name} (uploaded)`);
  runSearch({ file });
}

async function searchKey(key, sha, label) {
  setQuery("", `${shortKey(key)}${label ? ` — ${label}` : ""}`);
  if (sha) thumbUrl(sha).then((u) => { if (state.query?.key === key) $("query-img").src = u; }, () => {});
  await runSearch({ key, sha });
}

// ---- browse ----------------------------------------------------------------------------------
async function loadLabels() {
  const res = await api("/v1/labels");
  const all = el("a", { href: "#browse", text: "" });
  all.append(el("span", { text: "all" }), el("span", { class: "muted", text: res.images.toLocaleString() }));
  const items = [el("li", {}, all)];
  for (const l of res.labels) {
    const a = el("a", { href: `#browse?label=${encodeURIComponent(l.label)}`, "data-label": l.label });
    a.append(el("span", { text: l.label || "(unlabelled)" }), el("span", { class: "muted", text: l.count.toLocaleString() }));
    items.push(el("li", {}, a));
  }
  $("labels").replaceChildren(...items);
}

async function browse(label, page) {
  const current = latest("browse");
  state.browse = { label, page };
  for (const a of $("labels").querySelectorAll("a")) a.classList.toggle("active", (a.dataset.label ?? null) === label);
  const q = new URLSearchParams({ offset: page * PAGE, limit: PAGE });
  if (label !== null) q.set("label", label);
  const res = await api(`/v1/images?${q}`);
  if (!current()) return;
  $("browse-title").textContent = label === null ? "All images" : `Label: ${label || "(unlabelled)"}`;
  pager($("browse-pager"), page, res.total, PAGE, (p) => go("browse", { ...(label !== null && { label }), page: p }));
  await fillGrid($("browse-grid"), res.images.map((i) => card(i)), "no images");
}

// ---- check: mistakes and near-duplicates -----------------------------------------------------
async function check(head, which, page) {
  const current = latest("check");
  state.check = { ...state.check, which, page };
  for (const a of document.querySelectorAll(".tabs a")) a.classList.toggle("active", a.dataset.which === which);
  if (!head) {
    $("check-summary").textContent = "This server has no head: start it with --head NAME=HEAD_DIR to check one.";
    $("check-grid").replaceChildren();
    return;
  }
  $("check-head").value = head;
  $("check-summary").textContent = "cross-validating the head over the labelled images…";
  $("check-grid").dataset.state = "loading";
  const size = 24;
  const res = await api(`/v1/heads/${encodeURIComponent(head)}/review?which=${which}&offset=${page * size}&limit=${size}`);
  if (!current()) return;
  $("check-summary").textContent = `${res.head}: out-of-fold accuracy ${(res.accuracy * 100).toFixed(1)}% over `
    + `${res.rows.toLocaleString()} labelled images (${res.folds}-fold cross-validation of the head's type and `
    + `parameters, ${res.seconds.toFixed(1)} s). ${which === "wrong" ? `${res.total} mistakes, most confident first`
    : "least confident predictions first"}.`;
  pager($("check-pager"), page, res.total, size, (p) => go("check", { head, which, page: p }));
  const cards = res.items.map((i) => card(i, `p ${i.label_probability.toFixed(2)}`,
    el("div", { class: `meta ${i.predicted !== i.label ? "wrong" : ""}` },
       el("span", { text: `→ ${i.predicted}` }), el("span", { class: "num", text: i.probability.toFixed(2) }))));
  await fillGrid($("check-grid"), cards, which === "wrong" ? "no mistakes" : "nothing to show");
}

async function duplicates(page) {
  const current = latest("duplicates");
  state.check.dupPage = page;
  const threshold = parseFloat($("dup-threshold").value) || 0.97;
  const size = 10;
  $("dup-summary").textContent = "finding near-duplicates…";
  const res = await api(`/v1/duplicates?threshold=${threshold}&offset=${page * size}&limit=${size}`);
  if (!current()) return;
  $("dup-summary").textContent = `${res.total} groups, ${res.duplicates} duplicate images among `
    + `${res.images.toLocaleString()} at cosine ≥ ${res.threshold}. Click an image to search its neighbours.`;
  pager($("dup-pager"), page, res.total, size, (p) => duplicates(p).catch(showError));
  const box = $("dup-groups");
  box.replaceChildren();
  const ready = [];
  for (const g of res.groups) {
    const cards = g.images.map((i) => card(i));
    const grid = el("div", { class: "grid" });
    ready.push(fillGrid(grid, cards, ""));
    box.append(el("div", { class: "group" },
      el("div", { class: "muted", text: `${g.size} images, lowest cosine ${g.min_cosine.toFixed(3)}` }), grid));
  }
  if (!res.groups.length) box.append(el("p", { class: "empty", text: "no near-duplicates at this threshold" }));
  await Promise.all(ready);
}

// ---- views and routing -----------------------------------------------------------------------
function show(view) {
  for (const s of document.querySelectorAll("main > section")) s.hidden = s.dataset.view !== view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
}

function go(view, params = {}) {
  const q = new URLSearchParams(params).toString();
  location.hash = `#${view}${q ? `?${q}` : ""}`;
}

async function route() {
  const [view0, qs] = location.hash.slice(1).split("?");
  const view = ["search", "browse", "check"].includes(view0) ? view0 : "search";
  const p = new URLSearchParams(qs || "");
  show(view);
  if (!state.info) return;  // waiting for the key or the server
  showError(null);
  try {
    if (view === "search" && p.get("key")) await searchKey(p.get("key"), p.get("sha"), p.get("label"));
    else if (view === "browse") {
      if (!$("labels").childElementCount) await loadLabels();
      await browse(p.has("label") ? p.get("label") : null, parseInt(p.get("page") || "0", 10));
    } else if (view === "check") {
      const head = p.get("head") || $("check-head").value || state.info.heads[0]?.name;
      await Promise.all([check(head, p.get("which") || "wrong", parseInt(p.get("page") || "0", 10)),
                         duplicates(state.check.dupPage)]);
    }
  } catch (e) { showError(e); }
}

// ---- start: learn whether a key is needed (the open schema says), then load ------------------
function askForKey(message) {
  state.needsKey = true;
  state.info = null;
  sessionStorage.removeItem(KEY_STORE);
  $("key-form").hidden = false;
  $("key-forget").hidden = true;
  $("server-info").textContent = message || "this server needs an API key";
  $("key-input").focus();
}

async function start() {
  showError(null);
  try {
    const schema = await (await fetch("/openapi.json")).json();
    state.needsKey = Boolean(schema.components?.securitySchemes);
    if (state.needsKey && !apiKey()) { askForKey("this server needs an API key (sent as X-API-Key)"); return; }
    $("key-form").hidden = true;
    $("key-forget").hidden = !state.needsKey;
    state.info = await api("/v1/info");
  } catch (e) {
    showError(e);  // a wrong key too: the form is back, the banner says why
    return;
  }
  const info = state.info;
  $("server-info").textContent = `${info.images.toLocaleString()} images · ${info.backbone} · `
    + `${info.heads.length} head${info.heads.length === 1 ? "" : "s"} · `
    + (info.index ? `index ${info.index.kind} (${info.index.count.toLocaleString()})` : "no index");
  for (const sel of [$("head-select"), $("check-head")]) {
    sel.replaceChildren(...info.heads.map((h) => el("option", { value: h.name, text: h.name })));
  }
  if (!info.index) $("results-note").textContent = "this server has no index: start it with --index INDEX_DIR to search";
  document.body.dataset.ready = "true";
  await route();
}

function wire() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); searchFile(e.dataTransfer.files[0]); });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => { e.preventDefault(); if (e.dataTransfer.files[0]) searchFile(e.dataTransfer.files[0]); });
  $("k").addEventListener("change", () => { if (state.query) runSearch(state.query); });
  $("head-select").addEventListener("change", () => { if (state.query) classify(state.query); });
  $("check-head").addEventListener("change", (e) => go("check", { head: e.target.value, which: state.check.which }));
  $("dup-threshold").addEventListener("change", () => duplicates(0).catch(showError));
  for (const a of document.querySelectorAll(".tabs a")) {
    a.addEventListener("click", (e) => { e.preventDefault(); go("check", { head: $("check-head").value, which: a.dataset.which }); });
  }
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    showError(null);
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    start();
  });
  $("key-forget").addEventListener("click", () => { sessionStorage.removeItem(KEY_STORE); location.reload(); });
  window.addEventListener("hashchange", route);
}

wire();
start();

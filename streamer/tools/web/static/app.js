// streamer's live page: draws what the server sends (streamer/tools/web/server.py).
// Live mode: Server-Sent Events from /api/events (the browser reconnects by itself; the
// first event after a (re)connection carries the whole history). File mode: a time slider
// over the surfaces of a replay's output, /api/view?step=i and /api/history.
// IVs arrive as fractions and are shown in percent; strikes in USD; times in UTC.
"use strict";

const page = {
  info: null,
  mode: "live",
  key: "",
  view: null,
  fits: [],
  tenors: [],
  historyMax: 3000,
  events: null,
  retry: null,
  clockOffset: 0, // server ms - browser ms
  steps: 0,
  step: 0,
  stepTimer: null,
  param: "",
  pending: null,
  shards: null,
  renderTimer: null,
  renderMs: 0,
  lastRender: -1e9,
  lastHistory: -1e9,
};

const $ = (id) => document.getElementById(id);
const pct = (x) => (x === null || x === undefined ? null : 100 * x);
const fmt = (x, digits = 2) => (x === null || x === undefined || !isFinite(x) ? "–" : Number(x).toFixed(digits));
const utc = (ms) => (ms ? new Date(ms).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC") : "–");
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const PLOT_CONFIG = { displaylogo: false, responsive: true, modeBarButtonsToRemove: ["lasso2d", "select2d"] };
const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

function baseLayout(extra) {
  return Object.assign(
    {
      margin: { l: 56, r: 12, t: 10, b: 44 },
      hovermode: "closest",
      showlegend: true,
      legend: { orientation: "h", y: -0.22, font: { size: 11 } },
      font: { size: 11 },
      paper_bgcolor: "#fff",
      plot_bgcolor: "#fff",
    },
    extra
  );
}

// ---------------------------------------------------------------- connection

function setConn(text, cls) {
  const el = $("conn");
  el.textContent = text;
  el.className = "badge " + (cls || "");
}

async function getJSON(url) {
  const r = await fetch(url, { cache: "no-store" });
  if (!r.ok) throw new Error(url + ": HTTP " + r.status);
  return r.json();
}

function connectLive() {
  if (page.events) page.events.close();
  clearTimeout(page.retry);
  const url = "/api/events" + (page.key ? "?key=" + encodeURIComponent(page.key) : "");
  const es = new EventSource(url);
  page.events = es;
  es.addEventListener("open", () => setConn("live", "ok"));
  es.addEventListener("error", () => {
    setConn("reconnecting…", "warn");
    if (es.readyState === EventSource.CLOSED) {
      page.retry = setTimeout(connectLive, 2000); // the browser gave up: try again ourselves
    }
  });
  es.addEventListener("hello", (e) => {
    const info = JSON.parse(e.data);
    syncClock(info.now_ms);
    page.historyMax = info.history || page.historyMax;
    setKeys(info.keys);
    renderShards(info.shards);
  });
  es.addEventListener("keys", (e) => setKeys(JSON.parse(e.data)));
  es.addEventListener("shards", (e) => renderShards(JSON.parse(e.data)));
  es.addEventListener("view", (e) => {
    const msg = JSON.parse(e.data);
    syncClock(msg.now_ms);
    const h = msg.history;
    if (msg.reset) {
      page.fits = h.fits;
      page.tenors = h.tenors;
    } else {
      page.fits = page.fits.concat(h.fits);
      page.tenors = page.tenors.concat(h.tenors);
    }
    if (page.fits.length > page.historyMax) page.fits = page.fits.slice(-page.historyMax);
    if (page.tenors.length > page.historyMax) page.tenors = page.tenors.slice(-page.historyMax);
    page.pending = msg.view;
    scheduleRender();
  });
}

// Live updates are drawn at most every RENDER_GAP_MS (longer when drawing is slow: the
// browser stays responsive on a busy machine); the history charts at most every
// HISTORY_GAP_MS. Only the newest view is drawn.
const RENDER_GAP_MS = 1000;
const HISTORY_GAP_MS = 3000;

function scheduleRender() {
  if (page.renderTimer !== null) return;
  const gap = Math.max(RENDER_GAP_MS, 3 * page.renderMs);
  const wait = Math.max(0, page.lastRender + gap - performance.now());
  page.renderTimer = setTimeout(() => {
    page.renderTimer = null;
    const view = page.pending;
    page.pending = null;
    if (!view) return;
    const t0 = performance.now();
    const withHistory = t0 - page.lastHistory >= HISTORY_GAP_MS || page.view === null || page.view.key !== view.key;
    render(view, page.fits, page.tenors, withHistory);
    const t1 = performance.now();
    if (withHistory) page.lastHistory = t1;
    page.renderMs = t1 - t0;
    page.lastRender = t1;
    if (page.pending) scheduleRender();
  }, wait);
}

function syncClock(serverMs) {
  if (serverMs) page.clockOffset = serverMs - Date.now();
}

function setKeys(keys) {
  const sel = $("key");
  const current = page.key;
  const have = Array.from(sel.options).map((o) => o.value);
  if (keys.length && (keys.length !== have.length || keys.some((k, i) => k !== have[i]))) {
    sel.innerHTML = keys.map((k) => `<option value="${esc(k)}">${esc(k.replaceAll("/", " · "))}</option>`).join("");
  }
  if (!keys.length) return;
  if (!current || !keys.includes(current)) {
    const wanted = new URLSearchParams(location.hash.slice(1)).get("key");
    chooseKey(keys.includes(wanted) ? wanted : keys[0]);
  } else {
    sel.value = current;
  }
}

function chooseKey(key) {
  if (key === page.key) return;
  page.key = key;
  $("key").value = key;
  history.replaceState(null, "", "#key=" + encodeURIComponent(key));
  page.fits = [];
  page.tenors = [];
  page.param = "";
  page.pending = null;
  if (page.mode === "live") connectLive();
  else loadFileKey();
}

// ---------------------------------------------------------------- file mode

async function loadFileKey() {
  const steps = (page.info.steps || {})[page.key] || 0;
  page.steps = steps;
  const slider = $("slider");
  slider.max = String(Math.max(steps - 1, 0));
  slider.value = slider.max;
  const h = await getJSON("/api/history?key=" + encodeURIComponent(page.key));
  page.fits = h.fits;
  page.tenors = h.tenors;
  await showStep(steps - 1);
}

async function showStep(step) {
  step = Math.max(0, Math.min(step, page.steps - 1));
  page.step = step;
  $("slider").value = String(step);
  const msg = await getJSON(`/api/view?key=${encodeURIComponent(page.key)}&step=${step}`);
  if (msg.step !== page.step) return; // a newer request is on its way
  const ts = msg.view.surface ? msg.view.surface.ts_ms : 0;
  $("steplabel").textContent = `surface ${step + 1} / ${msg.steps} · ${utc(ts)}`;
  const fits = page.fits.filter((r) => r.n <= step + 1);
  const tenors = page.tenors.filter((r) => r.ts_ms <= ts);
  renderShards(msg.shards);
  render(msg.view, fits, tenors);
}

function setupFileMode() {
  $("timebar").hidden = false;
  setConn("file", "");
  const slider = $("slider");
  slider.addEventListener("input", () => {
    clearTimeout(page.stepTimer);
    const step = Number(slider.value);
    page.stepTimer = setTimeout(() => showStep(step).catch(report), 80);
  });
  $("prev").addEventListener("click", () => showStep(page.step - 1).catch(report));
  $("next").addEventListener("click", () => showStep(page.step + 1).catch(report));
  setKeys(page.info.keys);
}

function report(err) {
  setConn("error: " + err.message, "bad");
}

// ---------------------------------------------------------------- rendering

// At most MAX_POINTS points per history series are drawn (every k-th row, the newest kept).
const MAX_POINTS = 600;

function thin(rows) {
  if (rows.length <= MAX_POINTS) return rows;
  const step = Math.ceil(rows.length / MAX_POINTS);
  const out = [];
  for (let i = (rows.length - 1) % step; i < rows.length; i += step) out.push(rows[i]);
  return out;
}

function render(view, fits, tenors, withHistory = true) {
  page.view = view;
  renderHead(view);
  renderFit(view);
  renderSmiles(view);
  renderTerm(view, fits, tenors);
  renderTenors(view.tenors);
  if (withHistory) {
    renderTenorHistory(thin(fits), thin(tenors));
    renderDiagnostics(fits);
    renderParams(thin(fits));
  }
}

function renderHead(view) {
  const el = $("head");
  const s = view.surface;
  if (!s) {
    el.textContent = "no surface yet";
    el.dataset.seq = "";
    return;
  }
  el.dataset.seq = String(s.seq);
  el.dataset.status = s.status;
  let age = "";
  if (page.mode === "live" && s.received_ms) {
    const secs = (Date.now() + page.clockOffset - s.received_ms) / 1000;
    age = ` · received ${secs < 1 ? "now" : Math.round(secs) + " s ago"}`;
  }
  el.innerHTML = `seq <b>${s.seq}</b> · <span class="status ${esc(s.status)}">${esc(s.status)}</span> · ${utc(s.ts_ms)}${age}`;
}

function renderFit(view) {
  const el = $("fitsummary");
  const s = view.surface;
  if (!s || !s.fit) {
    el.textContent = "no surface yet";
    return;
  }
  const f = s.fit;
  const params = Object.entries(s.params || {}).map(([k, v]) => `${esc(k)} ${fmt(v, 4)}`).join(", ");
  el.classList.remove("muted");
  el.innerHTML =
    `rmse <b>${fmt(pct(f.rmse_iv), 3)}</b> vol pts · in band <b>${fmt(pct(f.in_band), 1)} %</b> of ${f.n_quotes} quotes · ` +
    `${fmt(f.elapsed_ms, 2)} ms · ${f.nfev} evaluations · ${f.warm ? "warm" : "cold"} start` +
    `${f.regime_shift ? ' · <span class="status stale">regime shift</span>' : ""} · penalty ${fmt(f.penalty, 4)}` +
    (params ? ` · surface parameters: ${params}` : "");
}

function smileBox(expiry) {
  const id = "smile-" + expiry;
  let box = document.getElementById(id);
  if (!box) {
    box = document.createElement("div");
    box.id = id;
    box.className = "smile";
    box.dataset.expiry = expiry;
    box.innerHTML = '<div class="smile-head"></div><div class="plot"></div>';
  }
  return box;
}

function renderSmiles(view) {
  const container = $("smiles");
  const wanted = view.expiries.map((e) => "smile-" + e.expiry);
  for (const child of Array.from(container.children)) {
    if (!wanted.includes(child.id)) {
      Plotly.purge(child.querySelector(".plot"));
      child.remove();
    }
  }
  view.expiries.forEach((e, i) => {
    const box = smileBox(e.expiry);
    if (container.children[i] !== box) container.insertBefore(box, container.children[i] || null);
    drawSmile(box, e);
  });
}

function drawSmile(box, e) {
  const q = e.quality;
  const head = box.querySelector(".smile-head");
  box.dataset.status = e.status;
  box.dataset.fitted = String(e.fitted);
  const band = q.n ? `model ${q.model}/${q.n}, mark ${q.mark}/${q.n} in band` : "no two-sided OTM quotes";
  head.innerHTML =
    `<b>${esc(e.expiry)}</b> <span class="status ${esc(e.status)}">${esc(e.status)}</span>` +
    `<span>${e.fitted ? "fitted" : "not fitted: from the surface around it"}</span>` +
    `<span>${fmt(e.days, 1)} d · F ${fmt(e.forward, 0)}</span>` +
    `<span>ATM ${fmt(pct(e.atm_iv), 2)} %</span>` +
    `<span title="fit: share of this expiry's fitted quotes inside bid-ask; model/mark: the quality measure (two-sided OTM quotes, T >= 2 h)">in band: fit ${fmt(pct(e.fit_in_band), 0)} % · ${band}</span>`;
  const m = e.market;
  const two = { x: [], y: [], plus: [], minus: [], text: [] };
  const one = { x: [], y: [], sym: [], text: [] };
  const mark = { x: [], y: [], text: [] };
  for (let i = 0; i < m.strike.length; i++) {
    const bid = m.bid[i], ask = m.ask[i], mid = m.mid[i];
    const text =
      `${m.instrument[i]}<br>bid ${fmt(pct(bid))} % · ask ${fmt(pct(ask))} %<br>` +
      `mid ${fmt(pct(mid))} % · mark ${fmt(pct(m.mark[i]))} % · model ${fmt(pct(m.model[i]))} %`;
    if (mid !== null) {
      two.x.push(m.strike[i]);
      two.y.push(pct(mid));
      two.plus.push(pct(ask - mid));
      two.minus.push(pct(mid - bid));
      two.text.push(text);
    } else if (bid !== null || ask !== null) {
      one.x.push(m.strike[i]);
      one.y.push(pct(bid !== null ? bid : ask));
      one.sym.push(bid !== null ? "triangle-up" : "triangle-down");
      one.text.push(text);
    }
    if (m.mark[i] !== null) {
      mark.x.push(m.strike[i]);
      mark.y.push(pct(m.mark[i]));
      mark.text.push(text);
    }
  }
  const traces = [
    {
      name: "bid–ask (mid)",
      x: two.x,
      y: two.y,
      text: two.text,
      mode: "markers",
      type: "scatter",
      marker: { size: 4, color: "#4a5568" },
      error_y: { type: "data", symmetric: false, array: two.plus, arrayminus: two.minus, width: 0, thickness: 2, color: "#8a94a6" },
      hovertemplate: "strike %{x:,.0f}<br>%{text}<extra></extra>",
    },
    {
      name: "one-sided quote",
      x: one.x,
      y: one.y,
      text: one.text,
      mode: "markers",
      type: "scatter",
      marker: { size: 6, symbol: one.sym, color: "#a0aec0" },
      hovertemplate: "strike %{x:,.0f}<br>%{text}<extra></extra>",
      visible: one.x.length ? true : "legendonly",
    },
    {
      name: "Deribit mark",
      x: mark.x,
      y: mark.y,
      text: mark.text,
      mode: "markers",
      type: "scatter",
      marker: { size: 5, symbol: "x-thin", line: { width: 1.5, color: "#dd6b20" }, color: "#dd6b20" },
      hovertemplate: "strike %{x:,.0f}<br>%{text}<extra></extra>",
    },
  ];
  const curve = e.curve;
  if (curve) {
    traces.push({
      name: e.fitted ? `fit (${page.view.model})` : `${page.view.model}, interpolated`,
      x: curve.strike,
      y: curve.iv.map(pct),
      mode: "lines",
      type: "scatter",
      line: { color: "#2b6cb0", width: 2, dash: e.fitted ? "solid" : "dash" },
      hovertemplate: "strike %{x:,.0f}<br>model %{y:.2f} %<extra>fit</extra>",
    });
  }
  // y range from what matters (mids, marks, curve): capped far asks do not squash the smile
  const ys = two.y.concat(mark.y, curve ? curve.iv.map(pct).filter((v) => v !== null) : []);
  const layout = baseLayout({
    xaxis: { title: { text: "strike (USD)" }, zeroline: false, hoverformat: ",.0f" },
    yaxis: { title: { text: "implied vol (%)" }, zeroline: false },
    shapes: e.forward
      ? [{ type: "line", x0: e.forward, x1: e.forward, yref: "paper", y0: 0, y1: 1, line: { color: "#cbd5e0", width: 1, dash: "dot" } }]
      : [],
  });
  if (ys.length) {
    const lo = Math.min(...ys), hi = Math.max(...ys);
    const pad = Math.max((hi - lo) * 0.15, 1);
    layout.yaxis.range = [Math.max(lo - pad, 0), hi + pad];
  }
  Plotly.react(box.querySelector(".plot"), traces, layout, PLOT_CONFIG);
}

function renderTerm(view, fits, tenors) {
  const t = view.term;
  const traces = [
    {
      name: "ATM per expiry",
      x: t.days,
      y: t.atm_iv.map(pct),
      text: t.expiry,
      mode: "lines+markers",
      type: "scatter",
      line: { color: "#2b6cb0" },
      hovertemplate: "%{text}: %{x:.1f} d<br>ATM %{y:.2f} %<extra></extra>",
    },
  ];
  if (view.tenors && Array.isArray(view.tenors.tenors)) {
    const rows = view.tenors.tenors.filter((r) => r.atm_iv !== null && r.atm_iv !== undefined);
    traces.push({
      name: "tenors",
      x: rows.map((r) => r.days),
      y: rows.map((r) => pct(r.atm_iv)),
      mode: "markers",
      type: "scatter",
      marker: { symbol: "diamond", size: 8, color: "#dd6b20" },
      hovertemplate: "%{x} d tenor<br>ATM %{y:.2f} %<extra></extra>",
    });
  }
  if (fits.length > 1) {
    const first = fits[0];
    const ex = Object.keys(first.atm);
    const byDays = view.expiries.reduce((acc, e) => ((acc[e.expiry] = e.days), acc), {});
    const pts = ex.filter((k) => byDays[k] !== undefined && first.atm[k] !== null);
    traces.push({
      name: "first surface of the session",
      x: pts.map((k) => byDays[k]),
      y: pts.map((k) => pct(first.atm[k])),
      text: pts,
      mode: "lines",
      type: "scatter",
      line: { color: "#a0aec0", dash: "dot" },
      hovertemplate: "%{text} at " + utc(first.ts_ms) + "<br>ATM %{y:.2f} %<extra></extra>",
    });
  }
  Plotly.react(
    $("term"),
    traces,
    baseLayout({
      xaxis: { title: { text: "days to expiry (log scale)" }, type: "log" },
      yaxis: { title: { text: "ATM implied vol (%)" } },
    }),
    PLOT_CONFIG
  );
}

function renderTenors(tenors) {
  const el = $("tenors");
  if (!tenors || !Array.isArray(tenors.tenors)) {
    el.className = "tenors muted";
    el.textContent = "no tenors topic for this surface (streamer.tenors/1 is published with each surface by daemons that have it)";
    el.dataset.tenors = "0";
    return;
  }
  el.className = "tenors";
  el.dataset.tenors = String(tenors.tenors.length);
  const vp = (x) => fmt(pct(x), 2);
  const rows = tenors.tenors
    .map(
      (r) =>
        `<tr data-days="${r.days}"><td class="num">${r.days}</td><td class="num">${fmt(r.forward, 0)}</td>` +
        `<td class="num">${vp(r.atm_iv)}</td><td class="num">${vp(r.rr25)}</td><td class="num">${vp(r.bf25)}</td>` +
        `<td class="num">${vp(r.rr10)}</td><td class="num">${vp(r.bf10)}</td></tr>`
    )
    .join("");
  el.innerHTML =
    `<div>30-day vol index <b>${vp(tenors.vol_index_30d)} %</b> · seq ${tenors.seq} · <span class="status ${esc(tenors.status)}">${esc(tenors.status)}</span></div>` +
    `<table class="table"><thead><tr><th class="num">days</th><th class="num">forward (USD)</th><th class="num">ATM (%)</th>` +
    `<th class="num">RR25 (vol pts)</th><th class="num">BF25 (vol pts)</th><th class="num">RR10 (vol pts)</th><th class="num">BF10 (vol pts)</th></tr></thead>` +
    `<tbody>${rows}</tbody></table>`;
}

function renderTenorHistory(fits, tenors) {
  const el = $("tenor-history");
  const title = $("tenor-history-title");
  const traces = [];
  let layout;
  if (tenors.length) {
    title.firstChild.textContent = "Tenor history ";
    const days = Object.keys(tenors[tenors.length - 1].tenors);
    const x = tenors.map((r) => r.ts_ms);
    days.forEach((d, i) => {
      const color = COLORS[i % COLORS.length];
      [["atm_iv", "y"], ["rr25", "y2"], ["bf25", "y3"]].forEach(([field, axis], j) => {
        traces.push({
          name: `${d} d`,
          legendgroup: d,
          showlegend: j === 0,
          x,
          y: tenors.map((r) => (r.tenors[d] ? pct(r.tenors[d][field]) : null)),
          yaxis: axis,
          mode: "lines",
          type: "scatter",
          line: { color, width: 1.5 },
          hovertemplate: `${d} d ${field}: %{y:.2f}<extra></extra>`,
        });
      });
    });
    layout = baseLayout({
      xaxis: { type: "date", title: { text: "time (UTC)" }, anchor: "y3" },
      yaxis: { title: { text: "ATM (%)" }, domain: [0.68, 1] },
      yaxis2: { title: { text: "RR25 (vol pts)" }, domain: [0.36, 0.64] },
      yaxis3: { title: { text: "BF25 (vol pts)" }, domain: [0, 0.32] },
      legend: { orientation: "v", x: 1.01, y: 1 },
      margin: { l: 60, r: 90, t: 10, b: 44 },
    });
  } else {
    title.firstChild.textContent = "ATM history per expiry (no tenors topic) ";
    const last = fits.length ? Object.keys(fits[fits.length - 1].atm) : [];
    last.forEach((ex, i) => {
      traces.push({
        name: ex,
        x: fits.map((r) => r.ts_ms),
        y: fits.map((r) => (r.atm[ex] === undefined ? null : pct(r.atm[ex]))),
        mode: "lines",
        type: "scatter",
        line: { color: COLORS[i % COLORS.length], width: 1.5 },
        hovertemplate: `${ex} ATM %{y:.2f} %<extra></extra>`,
      });
    });
    layout = baseLayout({
      xaxis: { type: "date", title: { text: "time (UTC)" } },
      yaxis: { title: { text: "ATM implied vol (%)" } },
      legend: { orientation: "v", x: 1.01, y: 1 },
      margin: { l: 60, r: 90, t: 10, b: 44 },
    });
  }
  Plotly.react(el, traces, layout, PLOT_CONFIG);
}

function renderDiagnostics(all) {
  const shifts = all.filter((r) => r.regime_shift); // every one, however long the session
  const fits = thin(all);
  const x = fits.map((r) => r.ts_ms);
  const color = fits.map((r) => (r.warm ? "#2b6cb0" : "#dd6b20"));
  const text = fits.map(
    (r) => `seq ${r.seq} · ${r.status} · ${r.warm ? "warm" : "cold"}${r.regime_shift ? " · regime shift" : ""}<br>${r.n_quotes} quotes, ${r.nfev} evaluations`
  );
  const traces = [
    {
      name: "rmse (vol pts)",
      x,
      y: fits.map((r) => pct(r.rmse_iv)),
      text,
      mode: "markers+lines",
      type: "scatter",
      line: { color: "#cbd5e0", width: 1 },
      marker: { size: 4, color },
      hovertemplate: "rmse %{y:.3f} vol pts<br>%{text}<extra></extra>",
    },
    {
      name: "in band (%)",
      x,
      y: fits.map((r) => pct(r.in_band)),
      text,
      yaxis: "y2",
      mode: "markers+lines",
      type: "scatter",
      line: { color: "#cbd5e0", width: 1 },
      marker: { size: 4, color },
      hovertemplate: "in band %{y:.1f} %<br>%{text}<extra></extra>",
    },
    {
      name: "fit time (ms)",
      x,
      y: fits.map((r) => r.elapsed_ms),
      text,
      yaxis: "y3",
      mode: "markers",
      type: "scatter",
      marker: { size: 4, color },
      hovertemplate: "%{y:.2f} ms<br>%{text}<extra></extra>",
    },
    {
      name: "regime shift",
      x: shifts.map((r) => r.ts_ms),
      y: shifts.map((r) => pct(r.rmse_iv)),
      mode: "markers",
      type: "scatter",
      marker: { size: 10, symbol: "x", color: "#c0262d" },
      hovertemplate: "regime shift, seq %{text}<extra></extra>",
      text: shifts.map((r) => r.seq),
    },
  ];
  const layout = baseLayout({
    xaxis: { type: "date", title: { text: "time (UTC)" }, anchor: "y3" },
    yaxis: { title: { text: "rmse (vol pts)" }, domain: [0.68, 1] },
    yaxis2: { title: { text: "in band (%)" }, domain: [0.36, 0.64] },
    yaxis3: { title: { text: "fit time (ms)" }, domain: [0, 0.32], type: "log" },
    legend: { orientation: "v", x: 1.01, y: 1 },
    margin: { l: 60, r: 110, t: 10, b: 44 },
  });
  Plotly.react($("diag"), traces, layout, PLOT_CONFIG);
}

function renderParams(fits) {
  const sel = $("param");
  const last = fits.length ? fits[fits.length - 1] : null;
  const names = [];
  if (last) {
    const ex = Object.keys(last.params);
    if (ex.length) Object.keys(last.params[ex[0]]).forEach((n) => names.push(n));
    Object.keys(last.surface_params).forEach((n) => names.push("surface " + n));
  }
  const options = Array.from(sel.options).map((o) => o.value);
  if (names.length !== options.length || names.some((n, i) => n !== options[i])) {
    sel.innerHTML = names.map((n) => `<option value="${esc(n)}">${esc(n)}</option>`).join("");
  }
  if (!names.includes(page.param)) page.param = names[0] || "";
  sel.value = page.param;
  const traces = [];
  const x = fits.map((r) => r.ts_ms);
  if (page.param.startsWith("surface ")) {
    const n = page.param.slice(8);
    traces.push({
      name: n,
      x,
      y: fits.map((r) => (r.surface_params[n] === undefined ? null : r.surface_params[n])),
      mode: "lines",
      type: "scatter",
      hovertemplate: `${n} %{y:.5f}<extra></extra>`,
    });
  } else if (page.param && last) {
    Object.keys(last.params).forEach((ex, i) => {
      traces.push({
        name: ex,
        x,
        y: fits.map((r) => (r.params[ex] ? r.params[ex][page.param] : null)),
        mode: "lines",
        type: "scatter",
        line: { color: COLORS[i % COLORS.length], width: 1.5 },
        hovertemplate: `${ex} ${page.param} %{y:.5f}<extra></extra>`,
      });
    });
  }
  Plotly.react(
    $("params"),
    traces,
    baseLayout({
      xaxis: { type: "date", title: { text: "time (UTC)" } },
      yaxis: { title: { text: page.param ? page.param + " (model units)" : "" } },
      legend: { orientation: "v", x: 1.01, y: 1 },
      margin: { l: 60, r: 90, t: 10, b: 44 },
    }),
    PLOT_CONFIG
  );
}

function uptime(s) {
  // the status is re-sent only on changes: count from started_ms while online
  if (s.state !== "online" || !s.started_ms) return "–";
  const minutes = (Date.now() + page.clockOffset - s.started_ms) / 60000;
  return minutes < 120 ? fmt(minutes, 1) + " min" : fmt(minutes / 60, 1) + " h";
}

function renderShards(shards) {
  page.shards = shards;
  const body = $("shards");
  if (!shards || !shards.length) {
    body.innerHTML = '<tbody><tr><td class="muted">no status topics seen</td></tr></tbody>';
    return;
  }
  const feeds = (f) =>
    Object.entries(f || {})
      .map(([k, v]) => `${esc(k)}: ${esc(typeof v === "object" && v !== null ? v.state || JSON.stringify(v) : v)}`)
      .join(", ") || "–";
  const rows = shards
    .map(
      (s) =>
        `<tr data-instance="${esc(s.instance)}" data-health="${esc(s.health)}"><td><b>${esc(s.instance)}</b></td>` +
        `<td><span class="health ${esc(s.health)}">${esc(s.health)}</span></td><td>${feeds(s.feeds)}</td>` +
        `<td class="num">${uptime(s)}</td>` +
        `<td>${esc(s.version || "–")}</td><td>${esc(s.reason || "")}</td><td>${utc(s.ts_ms)}</td></tr>`
    )
    .join("");
  body.innerHTML =
    "<thead><tr><th>instance</th><th>state</th><th>feeds</th><th class=\"num\">uptime</th><th>version</th><th>reason</th><th>status time</th></tr></thead>" +
    `<tbody>${rows}</tbody>`;
}

// ---------------------------------------------------------------- start

function init() {
  $("key").addEventListener("change", (e) => chooseKey(e.target.value));
  $("param").addEventListener("change", (e) => {
    page.param = e.target.value;
    if (page.view) renderParams(thin(page.mode === "live" ? page.fits : page.fits.filter((r) => r.n <= page.step + 1)));
  });
  setInterval(() => {
    if (page.mode !== "live") return;
    if (page.view) renderHead(page.view);
    if (page.shards) renderShards(page.shards); // ages and uptimes move on
  }, 5000);
  start();
}

async function start() {
  try {
    page.info = await getJSON("/api/info");
  } catch (err) {
    report(err);
    setTimeout(start, 3000);
    return;
  }
  page.mode = page.info.mode;
  page.historyMax = page.info.history || page.historyMax;
  $("source").textContent = page.info.source ? "· " + page.info.source : "";
  if (page.mode === "file") setupFileMode();
  else connectLive();
}

init();

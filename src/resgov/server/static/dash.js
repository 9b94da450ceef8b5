// ResGov dashboard: polls the control-plane API every 2 s and draws it. No libraries, no build step.
//
// Security notes (why the code looks the way it does):
// - The key lives in sessionStorage (this tab only) and travels in a header, never in a URL,
//   so it does not end up in history, logs or Referer headers.
// - Every value from the API is inserted with textContent / setAttribute, never as HTML:
//   model names and reasons in the audit trail come from clients and must not become markup.
// - The page's CSP forbids inline script and foreign origins; all fetches go to this origin.
"use strict";

(() => {
  const POLL_MS = 2000;
  const TOKEN_KEY = "resgov.dash.token";
  const PREFS_KEY = "resgov.dash.prefs";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const PALETTE = ["#5b8cff", "#2fbf71", "#f0b429", "#ef5350", "#b57bff", "#4fd1c5", "#ff8a65", "#90a4ae", "#f06292", "#aed581"];
  const SYMBOLS = { USD: "$", EUR: "€", GBP: "£", JPY: "¥" };
  const DENIED = new Set(["denied", "rejected"]);
  const ERRORS = new Set(["upstream_error", "expired"]);

  const state = {
    token: null,
    org: null,
    lookback: 6,
    filter: "all",
    summary: null,
    calls: [],
    seen: new Set(),
    timer: null,
    generation: 0,
    colors: new Map(),
  };

  const $ = (id) => document.getElementById(id);

  // --- small DOM helpers -------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs, ...children) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined) continue;
      if (k === "text") node.textContent = v;
      else node.setAttribute(k, String(v));
    }
    for (const c of children) if (c) node.append(c);
    return node;
  }

  // --- formatting --------------------------------------------------------------------------

  function money(value, currency) {
    const cur = currency || (state.summary && state.summary.currency) || "USD";
    if (value === null || value === undefined) return "–";
    const abs = Math.abs(value);
    let text;
    if (abs === 0) text = "0.00";
    else if (abs >= 1000) text = abs.toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
    else if (abs >= 1) text = abs.toFixed(2);
    else if (abs >= 0.01) text = abs.toFixed(4).replace(/0{1,2}$/, "");
    else text = abs.toPrecision(3).replace(/(\.\d*?)0+$/, "$1");
    const sign = value < 0 ? "-" : "";
    const sym = SYMBOLS[cur];
    return sym ? `${sign}${sym}${text}` : `${sign}${text} ${cur}`;
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    let s = Math.max(0, Math.round(seconds));
    const d = Math.floor(s / 86400); s -= d * 86400;
    const h = Math.floor(s / 3600); s -= h * 3600;
    const m = Math.floor(s / 60); s -= m * 60;
    if (d > 365) return "over a year";
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  function clock(iso, withSeconds) {
    if (!iso) return "–";
    const d = new Date(iso);
    const opts = { hour: "2-digit", minute: "2-digit", hour12: false };
    if (withSeconds) opts.second = "2-digit";
    const sameDay = d.toDateString() === new Date().toDateString();
    if (!sameDay) { opts.month = "short"; opts.day = "numeric"; }
    return d.toLocaleString(undefined, opts);
  }

  function secondsUntil(iso) {
    return iso ? (new Date(iso).getTime() - Date.now()) / 1000 : null;
  }

  function pct(part, whole) {
    if (!whole) return 0;
    return Math.max(0, Math.min(100, (part / whole) * 100));
  }

  const TREND_ICON = { rising: "▲", falling: "▼", steady: "▶" };

  function colorOf(agent) {
    if (!state.colors.has(agent)) state.colors.set(agent, PALETTE[state.colors.size % PALETTE.length]);
    return state.colors.get(agent);
  }

  // --- API ---------------------------------------------------------------------------------

  function authHeaders(token) {
    // Org keys are rgf_…; anything else is tried as the admin token.
    return token.startsWith("rgf_") ? { Authorization: `Bearer ${token}` } : { "X-Admin-Token": token };
  }

  async function api(path, params, token) {
    const url = new URL(path, window.location.origin);
    for (const [k, v] of Object.entries(params || {})) {
      if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, String(v));
    }
    const ctrl = new AbortController();
    const timeout = setTimeout(() => ctrl.abort(), 8000);
    try {
      const r = await fetch(url, {
        headers: { ...authHeaders(token || state.token), Accept: "application/json" },
        cache: "no-store",
        credentials: "omit",
        signal: ctrl.signal,
      });
      if (!r.ok) {
        let message = `${r.status} ${r.statusText}`;
        try {
          const body = await r.json();
          if (body && body.error && body.error.message) message = body.error.message;
        } catch (_) { /* not JSON */ }
        const err = new Error(message);
        err.status = r.status;
        throw err;
      }
      return await r.json();
    } finally {
      clearTimeout(timeout);
    }
  }

  function summaryParams() {
    const admin = state.summary ? state.summary.caller.admin : !state.token.startsWith("rgf_");
    return { org_id: admin ? state.org : null, lookback_hours: state.lookback };
  }

  // --- session -----------------------------------------------------------------------------

  function loadPrefs() {
    try {
      const p = JSON.parse(sessionStorage.getItem(PREFS_KEY) || "{}");
      if (p.lookback) state.lookback = p.lookback;
      if (p.org) state.org = p.org;
    } catch (_) { /* ignore */ }
  }

  function savePrefs() {
    sessionStorage.setItem(PREFS_KEY, JSON.stringify({ lookback: state.lookback, org: state.org }));
  }

  async function login(token) {
    const err = $("login-error");
    err.textContent = "";
    $("login-submit").disabled = true;
    try {
      const probe = await api("/api/v1/dashboard/summary", {
        lookback_hours: state.lookback,
        org_id: token.startsWith("rgf_") ? null : state.org,
      }, token);
      state.token = token;
      sessionStorage.setItem(TOKEN_KEY, token);
      showApp(probe);
    } catch (e) {
      if (e.status === 401) err.textContent = "That key or token was not accepted.";
      else if (e.status === 403) err.textContent = `Not allowed: ${e.message} (the key needs the read scope).`;
      else err.textContent = `Could not sign in: ${e.message}`;
    } finally {
      $("login-submit").disabled = false;
    }
  }

  function logout(reason) {
    state.generation += 1;
    clearTimeout(state.timer);
    state.token = null;
    state.summary = null;
    state.calls = [];
    state.seen = new Set();
    sessionStorage.removeItem(TOKEN_KEY);
    $("app").hidden = true;
    $("controls").hidden = true;
    $("login").hidden = false;
    $("login-token").value = "";
    $("login-error").textContent = reason || "";
    $("login-token").focus();
  }

  function showApp(first) {
    $("login").hidden = true;
    $("app").hidden = false;
    $("controls").hidden = false;
    $("lookback-select").value = String(state.lookback);
    state.generation += 1;
    state.calls = [];
    state.seen = new Set();
    render(first, null);
    poll(state.generation, true);
  }

  // --- polling -----------------------------------------------------------------------------

  async function poll(generation, skipSummary) {
    if (generation !== state.generation) return;
    const started = performance.now();
    try {
      const summary = skipSummary && state.summary ? state.summary : await api("/api/v1/dashboard/summary", summaryParams());
      if (generation !== state.generation) return;
      const audit = await api("/api/v1/audit", {
        after: summary.audit_after,
        limit: 200,
        org_id: summary.caller.admin ? summary.org_id : null,
        agent_id: summary.caller.agent_id,
      });
      if (generation !== state.generation) return;
      // Only this window's calls: with nothing recent the cursor may reach back further.
      render(summary, audit.items.filter((c) => c.started_at >= summary.series.start));
      setLive(true, `Live · updated ${clock(summary.generated_at, true)}`);
      $("banner").hidden = true;
    } catch (e) {
      if (generation !== state.generation) return;
      if (e.status === 401 || e.status === 403) {
        logout("Your session ended: the key was revoked, expired or lost its read scope. Sign in again.");
        return;
      }
      setLive(false, "Reconnecting…");
      const banner = $("banner");
      banner.textContent = `Cannot refresh: ${e.message}. Showing the last data received; retrying every ${POLL_MS / 1000} s.`;
      banner.hidden = false;
    }
    // Back off when the server is slow (a long range over a busy org): never more than a
    // third of the time spent waiting on it, so an open dashboard cannot hog the store.
    const took = performance.now() - started;
    state.timer = setTimeout(() => poll(generation, false), Math.min(30000, Math.max(POLL_MS, 3 * took)));
  }

  function setLive(on, text) {
    const live = $("live");
    live.classList.toggle("on", on);
    live.classList.toggle("off", !on);
    $("live-text").textContent = text;
  }

  // --- rendering ---------------------------------------------------------------------------

  function render(summary, calls) {
    state.summary = summary;
    state.org = summary.org_id;
    for (const a of summary.agents) colorOf(a.agent_id);
    renderHeader(summary);
    renderKpis(summary);
    renderChart(summary);
    renderOrgBudgets(summary);
    renderAgents(summary);
    if (calls) renderCalls(calls);
  }

  function renderHeader(s) {
    const select = $("org-select");
    const current = Array.from(select.options).map((o) => o.value).join("|");
    if (current !== s.orgs.join("|")) {
      select.replaceChildren(...s.orgs.map((o) => el("option", { value: o, text: o })));
    }
    select.value = s.org_id;
    select.disabled = !s.caller.admin || s.orgs.length < 2;
    const who = s.caller.admin ? "admin · all orgs" : `org ${s.caller.org_id}${s.caller.agent_id ? ` · agent ${s.caller.agent_id}` : ""}`;
    $("whoami").textContent = who;
    $("org-name").textContent = s.org_id;
  }

  function allWindows(s) {
    const out = [];
    for (const w of s.org.budgets) out.push({ who: `org ${s.org_id}`, w });
    for (const a of s.agents) for (const w of a.budgets) out.push({ who: a.agent_id, w });
    return out;
  }

  function renderKpis(s) {
    const t = s.org.totals;
    const hours = s.lookback_hours >= 48 ? `${s.lookback_hours / 24} days` : `${s.lookback_hours} h`;
    $("kpi-spend-label").textContent = `Spend · last ${hours}`;
    $("kpi-spend").textContent = money(t.spend);
    $("kpi-spend-sub").textContent = `${s.agents.length} agent${s.agents.length === 1 ? "" : "s"} · ${s.currency}`;

    const rate = s.org.rate_usd_per_hour !== null ? s.org.rate_usd_per_hour : (s.agents[0] ? s.agents[0].rate_usd_per_hour : 0);
    const trend = s.org.trend || (s.agents[0] ? s.agents[0].trend : "steady");
    $("kpi-rate").textContent = `${money(rate)}/h`;
    const conf = s.org.confidence !== null && s.org.confidence !== undefined ? s.org.confidence : (s.agents[0] ? s.agents[0].confidence : 0);
    $("kpi-rate-sub").textContent = `${TREND_ICON[trend] || ""} ${trend} · confidence ${Math.round((conf || 0) * 100)}%`;
    $("kpi-rate-sub").className = `kpi-sub trend-${trend}`;

    $("kpi-calls").textContent = String(t.calls);
    $("kpi-calls-sub").textContent = `${t.errors} errors · ${t.in_flight} in flight`;
    const denied = $("kpi-denied");
    denied.textContent = String(t.denied);
    denied.className = `kpi-value${t.denied ? " bad" : ""}`;
    $("kpi-denied-sub").textContent = t.calls ? `${Math.round((t.denied / t.calls) * 100)}% of calls` : "no calls";

    // The budget that runs out first: an exhausted one, else the earliest predicted before its reset.
    let next = null;
    for (const { who, w } of allWindows(s)) {
      const f = w.forecast;
      const rank = f.status === "exhausted" ? 0 : f.status === "ok" && f.exhausts_before_reset && f.prediction_timestamp ? 1 : null;
      if (rank === null) continue;
      const at = rank === 0 ? 0 : new Date(f.prediction_timestamp).getTime();
      if (!next || rank < next.rank || (rank === next.rank && at < next.at)) next = { rank, at, who, w };
    }
    const value = $("kpi-next");
    const sub = $("kpi-next-sub");
    if (!next) {
      value.textContent = "None before reset";
      value.className = "kpi-value kpi-small good";
      sub.textContent = "at the current spend rates";
    } else if (next.rank === 0) {
      value.textContent = "Exhausted now";
      value.className = "kpi-value kpi-small bad";
      sub.textContent = `${next.who} · ${next.w.period}${next.w.resets_at ? ` · resets ${clock(next.w.resets_at)}` : " · never resets"}`;
    } else {
      const secs = secondsUntil(next.w.forecast.prediction_timestamp);
      value.textContent = `in ${duration(secs)}`;
      value.className = `kpi-value kpi-small ${secs < 3600 ? "bad" : "warn"}`;
      sub.textContent = `${next.who} · ${next.w.period} · at ${clock(next.w.forecast.prediction_timestamp)}, before its reset`;
    }
  }

  function niceStep(max, ticks) {
    const raw = max / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * mag >= raw) return m * mag;
    return 10 * mag;
  }

  function renderChart(s) {
    const box = $("chart");
    const n = s.series.buckets;
    const size = s.series.bucket_seconds;
    const agents = s.agents.filter((a) => a.spend_series.some((v) => v > 0));
    const minutes = size / 60;
    $("chart-caption").textContent = `per ${minutes >= 60 ? `${minutes / 60} h` : `${minutes} min`} bucket, stacked by agent`;
    const totals = new Array(n).fill(0);
    for (const a of agents) a.spend_series.forEach((v, i) => { totals[i] += v || 0; });
    const max = Math.max(...totals, 0);
    if (max <= 0) {
      box.replaceChildren(el("div", { class: "chart-empty", text: "No spend in this window yet." }));
      $("legend").replaceChildren();
      return;
    }
    const W = 900, H = 230, L = 64, R = 12, T = 10, B = 26;
    const step = niceStep(max, 4);
    const top = Math.ceil(max / step) * step;
    const x = (i) => L + ((W - L - R) * i) / n;
    const y = (v) => T + (H - T - B) * (1 - v / top);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img", "aria-label": "Spend per bucket, stacked by agent" });
    for (let v = 0; v <= top + step / 2; v += step) {
      root.append(svg("line", { class: "grid-line", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      root.append(svg("text", { class: "axis-label", x: L - 8, y: y(v) + 4, "text-anchor": "end", text: money(v) }));
    }
    const every = Math.max(1, Math.ceil(n / 7));
    for (let i = 0; i < n; i += every) {
      const t = new Date((s.series.start + i * size) * 1000);
      const label = t.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", hour12: false });
      root.append(svg("text", { class: "axis-label", x: x(i), y: H - 8, "text-anchor": "start", text: label }));
    }
    const bw = Math.max(1, (W - L - R) / n - (n > 100 ? 0.5 : 1.5));
    const base = new Array(n).fill(0);
    for (const a of agents) {
      const color = colorOf(a.agent_id);
      a.spend_series.forEach((v, i) => {
        if (!v) return;
        const y0 = y(base[i]);
        const y1 = y(base[i] + v);
        base[i] += v;
        const when = new Date((s.series.start + i * size) * 1000);
        const rect = svg("rect", { class: i === n - 1 ? "bar partial" : "bar", x: x(i) + 0.5, y: y1, width: bw, height: Math.max(1, y0 - y1), fill: color, rx: 1.5 },
          svg("title", { text: `${a.agent_id} · ${when.toLocaleTimeString()} · ${money(v)}${i === n - 1 ? " (bucket in progress)" : ""}` }));
        root.append(rect);
      });
    }
    root.append(svg("line", { class: "now-line", x1: W - R, x2: W - R, y1: T, y2: H - B }));
    box.replaceChildren(root);
    $("legend").replaceChildren(...agents.map((a) => {
      const sw = el("span", { class: "swatch" });
      sw.style.background = colorOf(a.agent_id);
      return el("span", {}, sw, a.agent_id);
    }));
  }

  function forecastLine(w) {
    const f = w.forecast;
    const conf = `confidence ${Math.round((f.confidence || 0) * 100)}%`;
    if (f.status === "exhausted") return { cls: "bad", text: "Exhausted: new calls are denied" };
    if (f.status === "no_data") return { cls: "", text: "No recent spend: nothing to extrapolate" };
    if (f.status === "ok" && f.exhausts_before_reset && f.prediction_timestamp) {
      const secs = secondsUntil(f.prediction_timestamp);
      return { cls: secs < 3600 ? "bad" : "warn", text: `Runs out in ${duration(secs)} (${clock(f.prediction_timestamp)}) at ${money(f.rate_usd_per_hour)}/h · ${conf}` };
    }
    if (f.status === "ok") return { cls: "good", text: `Lasts past reset at ${money(f.rate_usd_per_hour)}/h · ${conf}` };
    return { cls: "", text: "" };
  }

  function budgetBar(w) {
    const used = w.spent + w.reserved;
    const p = pct(used, w.limit);
    const fill = el("div", { class: `fill${p >= 80 ? " bad" : p >= 50 ? " warn" : ""}` });
    fill.style.width = `${pct(w.spent, w.limit)}%`;
    const reserved = el("div", { class: "fill-reserved", title: `${money(w.reserved)} reserved by calls in flight` });
    reserved.style.left = `${pct(w.spent, w.limit)}%`;
    reserved.style.width = `${pct(w.reserved, w.limit)}%`;
    const fc = forecastLine(w);
    const resets = w.resets_at ? `resets in ${duration(secondsUntil(w.resets_at))}` : "never resets";
    const label = w.period.charAt(0).toUpperCase() + w.period.slice(1);
    return el("div", { class: "budget", "data-period": w.period, "data-level": w.level, "data-spent": w.spent },
      el("div", { class: "budget-head" },
        el("span", {}, el("span", { class: "budget-name", text: label }), el("span", { class: "budget-resets", text: ` · ${resets}`, title: w.resets_at || "" })),
        el("span", { class: "budget-amount" }, `${money(w.spent)} / ${money(w.limit)}`, el("span", { class: "muted", text: `${Math.round(p)}%` }))),
      el("div", { class: "track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": w.limit, "aria-valuenow": used }, fill, reserved),
      el("div", { class: "budget-foot" }, el("span", { class: `fc ${fc.cls}`, text: fc.text })));
  }

  function renderOrgBudgets(s) {
    const box = $("org-budgets");
    const parts = s.org.budgets.length
      ? s.org.budgets.map(budgetBar)
      : [el("p", { class: "no-budget", text: "No org-wide budget: each agent's own budgets apply." })];
    // Where the money went in the lookback: each agent's share of the org's spend.
    const total = s.agents.reduce((sum, a) => sum + (a.totals.spend || 0), 0);
    const mix = el("div", { class: "mix" }, el("div", { class: "mix-title", text: `Spend by agent · last ${s.lookback_hours} h` }));
    const ranked = s.agents.slice().sort((a, b) => (b.totals.spend || 0) - (a.totals.spend || 0));
    for (const a of ranked) {
      const share = total > 0 ? (a.totals.spend || 0) / total : 0;
      const bar = el("div", { class: "mix-fill" });
      bar.style.width = `${(share * 100).toFixed(1)}%`;
      bar.style.background = colorOf(a.agent_id);
      mix.append(el("div", { class: "mix-row" },
        el("span", { class: "mix-name", text: a.agent_id }),
        el("div", { class: "mix-track" }, bar),
        el("span", { class: "mix-value", text: `${money(a.totals.spend)} · ${Math.round(share * 100)}%` })));
    }
    if (!ranked.length) mix.append(el("p", { class: "no-budget", text: "No agents." }));
    box.replaceChildren(...parts, mix);
  }

  function sparkline(values, color) {
    const n = values.length;
    const max = Math.max(...values.map((v) => v || 0), 0);
    const W = 300, H = 38;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", "aria-hidden": "true" });
    if (max <= 0 || n < 2) {
      root.append(svg("line", { x1: 0, x2: W, y1: H - 1, y2: H - 1, stroke: "#263049" }));
      return root;
    }
    const pts = values.map((v, i) => [(W * i) / (n - 1), H - 2 - ((H - 4) * (v || 0)) / max]);
    const line = pts.map(([px, py], i) => `${i ? "L" : "M"}${px.toFixed(1)},${py.toFixed(1)}`).join("");
    root.append(svg("path", { class: "area", d: `${line}L${W},${H}L0,${H}Z`, fill: color }));
    root.append(svg("path", { class: "stroke", d: line, stroke: color }));
    return root;
  }

  function renderAgents(s) {
    const box = $("agents");
    $("agents-caption").textContent = `${s.agents.length} in ${s.org_id}`;
    if (!s.agents.length) {
      box.replaceChildren(el("p", { class: "empty", text: "No agents are defined for this org in the policy." }));
      return;
    }
    box.replaceChildren(...s.agents.map((a) => {
      const sw = el("span", { class: "swatch" });
      sw.style.background = colorOf(a.agent_id);
      const trend = a.trend || "steady";
      const budgets = a.budgets.length
        ? el("div", { class: "budgets" }, ...a.budgets.map(budgetBar))
        : s.org.budgets.length
          ? el("p", { class: "no-budget", text: "No budget of its own: the org's budgets apply." })
          : el("p", { class: "no-budget unlimited", text: "No budget on the agent or its org: spend is unlimited." });
      return el("div", { class: "agent", "data-agent": a.agent_id },
        el("div", { class: "agent-head" },
          el("div", { class: "agent-name" }, sw, a.agent_id, a.in_policy ? null : el("span", { class: "tag", text: "not in policy" })),
          el("div", { class: "agent-total", "data-spend": a.totals.spend, title: `Spend in the last ${s.lookback_hours} h`, text: money(a.totals.spend) })),
        el("div", { class: "agent-stats" },
          el("span", {}, el("b", { text: `${money(a.rate_usd_per_hour)}/h` }), " ", el("span", { class: `trend-${trend}`, text: `${TREND_ICON[trend]} ${trend}` })),
          el("span", {}, el("b", { text: String(a.totals.calls) }), " calls"),
          el("span", { class: a.totals.denied ? "bad" : "" }, el("b", { text: String(a.totals.denied) }), " denied"),
          el("span", { text: a.totals.last_call_at ? `last ${clock(a.totals.last_call_at, true)}` : "no calls yet" })),
        // Full buckets only: the bucket in progress would always read as a sudden drop.
        el("div", { class: "spark" }, sparkline(a.spend_series.slice(0, -1), colorOf(a.agent_id))),
        budgets);
    }));
  }

  function renderCalls(items) {
    const fresh = [];
    for (const item of items) if (!state.seen.has(item.seq)) fresh.push(item.seq);
    const first = state.seen.size === 0;
    state.seen = new Set(items.map((i) => i.seq));
    state.calls = items.slice().reverse();
    const rows = state.calls.filter((c) =>
      state.filter === "all" || (state.filter === "denied" ? DENIED.has(c.status) : ERRORS.has(c.status) || c.overage));
    const freshSet = new Set(first ? [] : fresh);
    const body = $("calls");
    body.replaceChildren(...rows.map((c) => {
      const tokens = c.input_tokens === null && c.output_tokens === null ? "–" : `${c.input_tokens ?? "–"} / ${c.output_tokens ?? "–"}`;
      const flags = [c.estimated ? "estimated" : null, c.overage ? "overage" : null, c.expired ? "expired" : null].filter(Boolean);
      const detail = [c.reason, c.http_status ? `HTTP ${c.http_status}` : null, ...flags].filter(Boolean).join(" · ");
      const started = c.started_at ? new Date(c.started_at * 1000).toISOString() : null;
      return el("tr", { class: freshSet.has(c.seq) ? "new" : null, "data-status": c.status, "data-agent": c.agent },
        el("td", { title: started, text: clock(started, true) }),
        el("td", { text: c.agent }),
        el("td", { text: c.model || "–" }),
        el("td", {}, el("span", { class: `badge b-${c.status}`, text: c.status.replace("_", " ") })),
        el("td", { class: "num", text: tokens }),
        el("td", { class: "num", text: money(c.reserved) }),
        el("td", { class: "num", text: money(c.actual) }),
        el("td", { class: "detail", text: detail }));
    }));
    $("calls-empty").hidden = rows.length > 0;
  }

  // --- wiring ------------------------------------------------------------------------------

  function init() {
    loadPrefs();
    $("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const token = $("login-token").value.trim();
      if (token) login(token);
    });
    $("logout").addEventListener("click", () => logout(""));
    $("org-select").addEventListener("change", (ev) => {
      state.org = ev.target.value;
      savePrefs();
      state.generation += 1;
      clearTimeout(state.timer);
      state.seen = new Set();
      poll(state.generation, false);
    });
    $("lookback-select").addEventListener("change", (ev) => {
      state.lookback = Number(ev.target.value);
      savePrefs();
      state.generation += 1;
      clearTimeout(state.timer);
      poll(state.generation, false);
    });
    for (const chip of document.querySelectorAll(".chip")) {
      chip.addEventListener("click", () => {
        state.filter = chip.dataset.filter;
        for (const c of document.querySelectorAll(".chip")) c.classList.toggle("active", c === chip);
        const items = state.calls.slice().reverse();
        state.seen = new Set();
        renderCalls(items);
      });
    }
    const saved = sessionStorage.getItem(TOKEN_KEY);
    if (saved) login(saved);
    else $("login-token").focus();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();

// batchrunner view: the page. Vanilla JS, no dependencies, nothing fetched from elsewhere.
// Every value from the results reaches the page as text (textContent, createTextNode,
// setAttribute): never as HTML. The state lives in the URL's hash, so links and Back work.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f5fb3", "#e07b24", "#2a9d6f", "#b23a48", "#7b5cc4", "#8c6d1f", "#3a8fb7", "#d45c9e"];
  const PAGE = 50;
  const FILTER_KEYS = ["status", "model", "source", "error_kind", "error", "score_min", "score_max", "search"];
  const numberFormat = new Intl.NumberFormat("en-US");
  let info = null;
  let generation = 0;
  let summaryKey = null;
  let firstPaint = true;
  let loadSerial = 0;

  // -- small helpers ----------------------------------------------------------------------

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "onclick") node.addEventListener("click", value);
      else node.setAttribute(key, String(value));
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }
  function count(n) { return n === null || n === undefined ? "–" : numberFormat.format(n); }
  function usd(n) {
    if (n === null || n === undefined) return "–";
    return "$" + (n >= 100 ? n.toFixed(2) : n >= 1 ? n.toFixed(3) : n.toFixed(5));
  }
  function ms(n) { return n === null || n === undefined ? "–" : (n >= 100 ? n.toFixed(0) : n.toFixed(1)); }
  function score(n) { return n === null || n === undefined ? "–" : n.toFixed(3); }
  function shown(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "string") return value;
    return JSON.stringify(value);
  }

  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    const filters = {};
    for (const key of FILTER_KEYS) if (params.get(key)) filters[key] = params.get(key);
    return {
      filters,
      sort: params.get("sort") || "",
      offset: Math.max(0, parseInt(params.get("offset") || "0", 10) || 0),
      row: params.has("row") ? parseInt(params.get("row"), 10) : null,
    };
  }

  function hashFor(state) {
    const params = new URLSearchParams();
    for (const key of FILTER_KEYS) if (state.filters[key]) params.set(key, state.filters[key]);
    if (state.sort) params.set("sort", state.sort);
    if (state.offset) params.set("offset", String(state.offset));
    if (state.row !== null && state.row !== undefined && !Number.isNaN(state.row)) params.set("row", String(state.row));
    return "#" + params.toString();
  }

  function go(changes) {
    const state = Object.assign(readHash(), changes);
    location.hash = hashFor(state);
  }

  function filterQuery(filters) {
    const params = new URLSearchParams();
    for (const key of FILTER_KEYS) if (filters[key]) params.set(key, filters[key]);
    return params;
  }

  async function api(path, params) {
    const query = params && params.toString();
    const response = await fetch("api/" + path + (query ? "?" + query : ""), { credentials: "same-origin" });
    const body = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) throw new Error(body.error || response.statusText);
    return body;
  }

  function problem(text) {
    const node = $("problem");
    node.hidden = !text;
    node.textContent = text || "";
  }

  // -- loading ------------------------------------------------------------------------------

  async function loadInfo() {
    info = await api("info");
    generation = info.generation;
    $("sources").textContent = info.sources.map((s) => s.name + " (" + count(s.rows) + " rows)").join(" · ");
    $("live").hidden = !info.live;
    fillSelect($("f-model"), info.models.map((m) => [m, m]));
    const files = info.sources.map((s, i) => [String(i), s.name]);
    fillSelect($("f-source"), files);
    $("f-source-label").hidden = files.length < 2;
    $("f-score-label").hidden = !info.has_score;
  }

  function fillSelect(select, options) {
    const current = select.value;
    while (select.options.length > 1) select.remove(1);
    for (const [value, label] of options) select.append(el("option", { value }, label));
    select.value = current;
  }

  async function load() {
    const serial = ++loadSerial;
    const state = readHash();
    syncForm(state);
    const filters = filterQuery(state.filters);
    const key = filters.toString() + "|" + generation;
    $("loading").hidden = false;
    try {
      const rowsParams = filterQuery(state.filters);
      rowsParams.set("offset", String(state.offset));
      rowsParams.set("limit", String(PAGE));
      if (state.sort) rowsParams.set("sort", state.sort);
      const wanted = [api("rows", rowsParams)];
      wanted.push(key !== summaryKey ? api("summary", filters) : Promise.resolve(null));
      wanted.push(state.row !== null && !Number.isNaN(state.row) ? api("row/" + state.row) : Promise.resolve(null));
      const [page, summary, row] = await Promise.all(wanted);
      if (serial !== loadSerial) return; // a newer load is on its way
      if (summary) { renderSummary(summary); summaryKey = key; }
      renderRows(page, state);
      if (row) renderDetail(row); else $("detail").hidden = true;
      problem(null);
      window.__viewerRenders = (window.__viewerRenders || 0) + 1; // for bench/viewer.py
      window.__viewerLastRender = performance.now();
      if (firstPaint) {
        firstPaint = false;
        window.__viewerFirstPaint = performance.now();
        document.body.setAttribute("data-ready", "1");
      }
    } catch (error) {
      if (serial === loadSerial) problem(error.message);
    } finally {
      if (serial === loadSerial) $("loading").hidden = true;
    }
  }

  async function poll() {
    try {
      const state = await api("state");
      if (state.generation !== generation) {
        await loadInfo();
        summaryKey = null;
        await load();
      }
      $("live").hidden = !state.live;
      if (!state.live) return; // the run finished: its output took over, nothing more to read
    } catch (error) {
      problem(error.message);
    }
    setTimeout(poll, 3000);
  }

  // -- filters --------------------------------------------------------------------------------

  function syncForm(state) {
    for (const key of ["status", "model", "source", "error", "score_min", "score_max", "search"]) {
      const input = $("f-" + key.replace("_", "-"));
      if (input && document.activeElement !== input) input.value = state.filters[key] || "";
    }
    $("f-sort").value = state.sort || "";
    const kind = state.filters.error_kind;
    $("f-kind").hidden = !kind;
    $("f-kind-text").textContent = kind ? "error: " + kind : "";
  }

  function formFilters() {
    const filters = {};
    for (const key of ["status", "model", "source", "error", "score_min", "score_max", "search"]) {
      const input = $("f-" + key.replace("_", "-"));
      if (input && input.value.trim()) filters[key] = input.value.trim();
    }
    const kind = readHash().filters.error_kind;
    if (kind) filters.error_kind = kind;
    return filters;
  }

  function applyForm() {
    go({ filters: formFilters(), sort: $("f-sort").value, offset: 0, row: null });
  }

  function wireForm() {
    let timer = null;
    const form = $("filters");
    form.addEventListener("submit", (event) => { event.preventDefault(); applyForm(); });
    for (const select of form.querySelectorAll("select")) select.addEventListener("change", applyForm);
    for (const input of form.querySelectorAll("input")) {
      input.addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(applyForm, 400); });
      input.addEventListener("keydown", (event) => {
        if (event.key === "Enter") { event.preventDefault(); clearTimeout(timer); applyForm(); }
      });
    }
    $("f-clear").addEventListener("click", () => go({ filters: {}, sort: "", offset: 0, row: null }));
    $("f-kind-clear").addEventListener("click", () => {
      const state = readHash();
      delete state.filters.error_kind;
      go({ filters: state.filters, offset: 0, row: null });
    });
    $("pager-prev").addEventListener("click", () => {
      const state = readHash();
      go({ offset: Math.max(0, state.offset - PAGE), row: null });
    });
    $("pager-next").addEventListener("click", () => {
      const state = readHash();
      go({ offset: state.offset + PAGE, row: null });
    });
    $("detail-close").addEventListener("click", () => go({ row: null }));
    document.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && !$("detail").hidden) go({ row: null });
    });
  }

  // -- the summary ----------------------------------------------------------------------------

  function renderSummary(summary) {
    const t = summary.totals;
    const cards = [
      ["rows", "Rows", count(t.rows), ""],
      ["ok", "OK", count(t.ok), "ok"],
      ["errors", "Errors", count(t.errors), t.errors ? "err" : ""],
      ["tokens", "Tokens", count(t.total_tokens), ""],
      ["cost_paid", "Cost paid", usd(t.cost_paid), ""],
    ];
    if (t.cache_hits || (info && info.has_cache_hit)) {
      cards.push(["cost_reused", "Cost reused (cache)", usd(t.cost_reused) + " · " + count(t.cache_hits) + " rows", ""]);
    }
    if (t.scored) cards.push(["mean_score", "Mean score", score(t.mean_score) + " (n=" + count(t.scored) + ")", ""]);
    const box = $("totals");
    clear(box);
    for (const [key, label, value, kind] of cards) {
      box.append(el("div", { class: "card " + kind, "data-k": key }, el("div", { class: "k" }, label), el("div", { class: "v" }, value)));
    }
    renderErrors(summary.errors);
    renderModels(summary.models);
    barChart($("chart-cost"), summary.models.map((m) => ({ label: m.model, parts: [m.cost_usd] })), usd, null);
    barChart(
      $("chart-tokens"),
      summary.models.map((m) => ({ label: m.model, parts: [m.prompt_tokens, m.completion_tokens] })),
      count, ["prompt", "completion"],
    );
    histogram($("chart-latency"), summary.latency);
  }

  function renderErrors(errors) {
    const list = $("errors");
    clear(list);
    $("errors-none").hidden = errors.length > 0;
    const state = readHash();
    for (const item of errors) {
      const filters = Object.assign({}, state.filters, { error_kind: item.kind, status: "error" });
      const href = hashFor({ filters, sort: state.sort, offset: 0, row: null });
      list.append(el("li", {}, el("a", { href, class: "error-link" }, item.kind), " ", el("span", { class: "count" }, "× " + count(item.count))));
    }
  }

  function renderModels(models) {
    const table = $("models");
    clear(table);
    const scored = models.some((m) => m.mean_score !== null);
    const head = ["model", "rows", "ok", "errors", "cost", "prompt tok", "completion tok"];
    if (scored) head.push("mean score");
    head.push("latency p50", "p95");
    table.append(el("thead", {}, el("tr", {}, ...head.map((h) => el("th", {}, h)))));
    const body = el("tbody");
    models.forEach((m, i) => {
      const cells = [
        el("td", {}, el("i", { class: "swatch", style: null }), m.model),
        num(count(m.rows)), num(count(m.ok)), num(count(m.errors)), num(usd(m.cost_usd)),
        num(count(m.prompt_tokens)), num(count(m.completion_tokens)),
      ];
      if (scored) cells.push(num(score(m.mean_score)));
      cells.push(num(ms(m.latency_p50)), num(ms(m.latency_p95)));
      const row = el("tr", {}, ...cells);
      row.firstChild.style.borderLeft = "4px solid " + COLORS[i % COLORS.length];
      body.append(row);
    });
    table.append(body);
  }

  function num(text) { return el("td", { class: "num" }, text); }

  // -- charts (inline SVG) ------------------------------------------------------------------

  function barChart(box, bars, format, partNames) {
    clear(box);
    if (!bars.length) { box.append(el("p", { class: "muted" }, "no rows")); return; }
    const width = 320, rowHeight = 22, labelWidth = 110, top = partNames ? 16 : 4;
    const height = top + bars.length * rowHeight + 4;
    const max = Math.max(...bars.map((b) => b.parts.reduce((a, v) => a + (v || 0), 0)), 1e-12);
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img" });
    if (partNames) {
      partNames.forEach((name, j) => {
        chart.append(svg("rect", { x: labelWidth + j * 80, y: 3, width: 9, height: 9, fill: j ? "#9db6e3" : "#2f5fb3" }));
        chart.append(svg("text", { x: labelWidth + j * 80 + 12, y: 11 }, name));
      });
    }
    bars.forEach((bar, i) => {
      const y = top + i * rowHeight;
      chart.append(svg("text", { x: 0, y: y + 14 }, bar.label.length > 18 ? bar.label.slice(0, 17) + "…" : bar.label));
      let x = labelWidth;
      const total = bar.parts.reduce((a, v) => a + (v || 0), 0);
      bar.parts.forEach((value, j) => {
        const w = ((value || 0) / max) * (width - labelWidth - 70);
        const color = partNames ? (j ? "#9db6e3" : "#2f5fb3") : COLORS[i % COLORS.length];
        chart.append(svg("rect", { x, y: y + 3, width: Math.max(w, 0.5), height: rowHeight - 8, fill: color }));
        x += w;
      });
      chart.append(svg("text", { x: x + 4, y: y + 14 }, format(total)));
    });
    box.append(chart);
  }

  function histogram(box, latency) {
    clear(box);
    if (!latency.edges.length) { box.append(el("p", { class: "muted" }, "no latencies")); return; }
    const width = 320, height = 150, left = 30, bottom = 20, top = 6;
    const bins = latency.edges.length - 1;
    const max = Math.max(1, ...latency.series.flatMap((s) => s.counts));
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, role: "img" });
    const plotW = width - left - 4, plotH = height - bottom - top;
    const barW = plotW / bins;
    latency.series.forEach((series, k) => {
      const color = COLORS[k % COLORS.length];
      series.counts.forEach((c, b) => {
        if (!c) return;
        const h = (c / max) * plotH;
        chart.append(svg("rect", {
          x: left + b * barW, y: top + plotH - h, width: Math.max(barW - 1, 0.5), height: h,
          fill: color, "fill-opacity": latency.series.length > 1 ? 0.5 : 0.85,
        }));
      });
    });
    chart.append(svg("line", { x1: left, y1: top + plotH, x2: width - 4, y2: top + plotH, stroke: "#999" }));
    const edges = latency.edges;
    for (const b of [0, Math.floor(bins / 2), bins]) {
      chart.append(svg("text", { x: left + b * barW, y: height - 6, "text-anchor": b ? (b === bins ? "end" : "middle") : "start" },
        ms(edges[b]) + (b === bins ? "+" : "")));
    }
    chart.append(svg("text", { x: 0, y: top + 8 }, count(max)));
    box.append(chart);
    if (latency.series.length > 1) {
      box.append(el("div", { class: "legend" }, ...latency.series.map((s, k) => {
        const swatch = el("i");
        swatch.style.background = COLORS[k % COLORS.length];
        return el("span", {}, swatch, s.model);
      })));
    }
  }

  // -- rows -----------------------------------------------------------------------------------

  function renderRows(page, state) {
    const table = $("rows");
    const hasScore = info && info.has_score;
    const head = ["#", "id", "model", "status", "prompt", "answer"];
    if (hasScore) head.push("score");
    head.push("tokens", "cost", "latency ms", "error");
    const thead = table.tHead;
    clear(thead);
    thead.append(el("tr", {}, ...head.map((h) => el("th", {}, h))));
    const body = table.tBodies[0];
    clear(body);
    for (const row of page.rows) {
      const cells = [
        num(count(row.index)),
        el("td", { class: "id" }, shown(row.id)),
        el("td", { class: "model" }, shown(row.model)),
        el("td", { class: "status status-" + row.status }, shown(row.status)),
        el("td", { class: "text prompt" }, shown(row.prompt)),
        el("td", { class: "text answer" }, row.content === null || row.content === undefined ? "" : row.content),
      ];
      if (hasScore) cells.push(num(score(row.score)));
      cells.push(num(count(row.total_tokens)), num(usd(row.cost_usd)), num(ms(row.latency_ms)),
        el("td", { class: "text error" }, row.error || ""));
      const tr = el("tr", { "data-index": row.index, class: state.row === row.index ? "selected" : null }, ...cells);
      tr.addEventListener("click", () => go({ row: row.index }));
      body.append(tr);
    }
    if (!page.rows.length) body.append(el("tr", {}, el("td", { colspan: head.length, class: "muted" }, "no rows match")));
    const first = page.total ? page.offset + 1 : 0;
    const last = Math.min(page.offset + page.rows.length, page.total);
    $("pager-info").textContent = count(first) + "–" + count(last) + " of " + count(page.total);
    $("pager-prev").disabled = page.offset <= 0;
    $("pager-next").disabled = page.offset + page.limit >= page.total;
  }

  // -- one row ----------------------------------------------------------------------------------

  function toolCalls(text) {
    // The tool_calls column: JSON text of a list of {id, type, function: {name, arguments}}.
    if (!text) return [];
    try {
      const calls = JSON.parse(text);
      return Array.isArray(calls) ? calls : [];
    } catch (e) {
      return [];
    }
  }

  function renderDetail(detail) {
    const row = detail.row;
    $("detail").hidden = false;
    $("detail-title").textContent = "Row " + count(detail.index) + " · id " + shown(row.id) + " · " + detail.source;
    const note = $("detail-note");
    note.hidden = !detail.request_note;
    note.textContent = detail.request_note || "";

    const messages = $("detail-messages");
    clear(messages);
    const request = detail.request;
    if (request && request.messages) {
      for (const message of request.messages) {
        messages.append(el("div", { class: "message" }, el("div", { class: "role" }, shown(message.role)),
          el("pre", { class: "text" }, shown(message.content))));
      }
    } else if (request && request.error) {
      messages.append(el("p", { class: "problem" }, request.error));
    } else {
      messages.append(el("p", { class: "muted" }, "not known (see the input columns)"));
    }
    const calls = toolCalls(row.tool_calls);
    $("detail-answer").textContent = row.content === null || row.content === undefined
      ? (calls.length ? "(no text: the model called a tool)" : "(no answer)") : row.content;
    $("detail-tools-box").hidden = !calls.length;
    const tools = $("detail-tools");
    clear(tools);
    for (const call of calls) {
      const fn = (call && call.function) || {};
      let args = fn.arguments;
      try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (e) { /* kept as sent */ }
      tools.append(el("li", { class: "tool-call" }, el("div", { class: "role" }, shown(fn.name)),
        el("pre", { class: "text" }, shown(args))));
    }

    const choices = row.choices || [];
    $("detail-choices-box").hidden = choices.length < 2;
    const list = $("detail-choices");
    clear(list);
    for (const choice of choices) list.append(el("li", {}, el("pre", { class: "text" }, shown(choice))));

    $("detail-error-box").hidden = !row.error;
    $("detail-error").textContent = row.error || "";

    const facts = $("detail-facts");
    clear(facts);
    const factKeys = ["status", "model", "response_model", "finish_reason", "prompt_tokens", "completion_tokens",
      "cached_tokens", "reasoning_tokens", "total_tokens", "cost_usd", "attempts", "latency_ms", "ttft_ms", "http_status",
      "response_id", "score", "cache_hit", "refusal", "parsed", "reasks", "reask_cost_usd"];
    for (const key of factKeys) {
      if (!(key in row)) continue;
      let value = row[key];
      if (key === "cost_usd" || key === "reask_cost_usd") value = usd(value);
      else if (key === "latency_ms" || key === "ttft_ms") value = ms(value);
      else value = shown(value);
      facts.append(el("tr", { "data-k": key }, el("th", {}, key), el("td", {}, value)));
    }

    const inputs = $("detail-inputs");
    clear(inputs);
    for (const [key, value] of Object.entries(detail.inputs)) {
      inputs.append(el("tr", {}, el("th", {}, key), el("td", {}, shown(value))));
    }
    $("detail-request").textContent = request ? JSON.stringify(request, null, 2) : "–";

    const sweep = $("sweep");
    clear(sweep);
    $("sweep-box").hidden = detail.sweep.length < 2;
    for (const other of detail.sweep) {
      const cell = el("div", { class: "cell" + (other.current ? " current" : ""), "data-index": other.index },
        el("h4", {}, shown(other.model) + (info && info.sources.length > 1 ? " · " + other.source : "")),
        el("div", { class: "status-" + other.status }, shown(other.status) +
          (other.score !== undefined && other.score !== null ? " · score " + score(other.score) : "")),
        el("div", { class: "muted" }, [
          other.cost_usd !== null && other.cost_usd !== undefined ? usd(other.cost_usd) : null,
          other.total_tokens !== null && other.total_tokens !== undefined ? count(other.total_tokens) + " tokens" : null,
          other.latency_ms !== null && other.latency_ms !== undefined ? ms(other.latency_ms) + " ms" : null,
        ].filter((part) => part !== null).join(" · ")),
        el("pre", { class: "text" }, other.content !== null && other.content !== undefined ? other.content : (other.error || "")));
      cell.addEventListener("click", () => go({ row: other.index }));
      sweep.append(cell);
    }
    for (const tr of $("rows").tBodies[0].rows) {
      tr.classList.toggle("selected", Number(tr.getAttribute("data-index")) === detail.index);
    }
  }

  // -- start ------------------------------------------------------------------------------------

  async function start() {
    wireForm();
    window.addEventListener("hashchange", load);
    try {
      await loadInfo();
    } catch (error) {
      problem(error.message);
      return;
    }
    await load();
    if (info.live) setTimeout(poll, 3000);
  }

  start();
})();

// fedsqueeze dashboard: vanilla JS over the REST service's read endpoints, charts by uPlot.
//
// Pages (hash routes): #/runs, #/run/ID, #/compare?ids=1,2, #/clients.
// Every value from the API is rendered with textContent (run names and configs are user
// data); no HTML is ever parsed from strings. When reads need a token the page asks for it once
// and keeps it in sessionStorage only (this tab), sent as `Authorization: Bearer`.
// Charts expose what they drew for tests and scripts: each chart's <figure> carries
// data-points (the x values, one per round) and data-series-points (non-null points per
// series, comma separated).
"use strict";

(function () {
  const TOKEN_KEY = "fedsqueeze.token";
  const POLL_MS = 2000;
  const PAGE = 500;
  // tick steps of axes that count things (rounds, clients): no 1.25th round
  const INTEGER_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000];
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
                  "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

  const view = document.getElementById("view");
  const tokenForm = document.getElementById("token-form");
  const tokenInput = document.getElementById("token-input");
  const tokenError = document.getElementById("token-error");
  const authStatus = document.getElementById("auth-status");

  // work to undo when the route changes: timers, chart resize handlers
  let cleanups = [];
  let routeSerial = 0;

  // ------------------------------------------------------------------ DOM helpers

  /** An element with attributes and children; strings become text nodes (never HTML). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else if (key === "checked" || key === "value") node[key] = value;
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  /** Replace the page's content (null and false children are left out). */
  function show(...children) {
    clear(view);
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined && child !== false) view.append(child);
    }
  }

  function fmtBytes(n) {
    if (n === null || n === undefined) return "";
    let value = Number(n);
    for (const unit of ["B", "KB", "MB", "GB", "TB"]) {
      if (Math.abs(value) < 1024 || unit === "TB") {
        return unit === "B" ? `${value.toFixed(0)} B` : `${value.toFixed(1)} ${unit}`;
      }
      value /= 1024;
    }
    return String(n);
  }

  function fmtNum(x, digits = 4) {
    if (x === null || x === undefined) return "";
    return Number(x).toPrecision(digits).replace(/\.?0+$/, "").replace(/\.?0+e/, "e");
  }

  function fmtTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    return isNaN(d) ? String(iso) : d.toLocaleString();
  }

  function runName(run) {
    const name = run.config && run.config["run-name"];
    return typeof name === "string" && name ? name : `run ${run.id}`;
  }

  // ------------------------------------------------------------------ REST with a token

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  /** GET a path of the REST service (relative: works behind a path prefix). "no-cache":
   * the browser always asks, with the ETag of its copy, and reuses that copy on a 304
   * (a finished run's rounds and series are not sent again). */
  async function api(path) {
    const headers = { Accept: "application/json" };
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) headers.Authorization = `Bearer ${token}`;
    const response = await fetch(path, { headers, cache: "no-cache" });
    if (!response.ok) {
      let message = `${response.status} ${response.statusText}`;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message = body.error.message;
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, message);
    }
    return parseJson(await response.text());
  }

  /**
   * JSON with integers beyond 2^53 (Flower's 64-bit node and run ids) kept exact, as
   * strings: JSON.parse would round them (the reviver's source text gives the digits).
   */
  function parseJson(text) {
    return JSON.parse(text, (key, value, context) =>
      typeof value === "number" && !Number.isSafeInteger(value) && Number.isInteger(value) &&
      context && typeof context.source === "string" && /^-?\d+$/.test(context.source)
        ? context.source
        : value);
  }

  /** Every item of a paged list endpoint (follows next_offset). */
  async function apiAll(path) {
    const items = [];
    let offset = 0;
    const sep = path.includes("?") ? "&" : "?";
    for (;;) {
      const page = await api(`${path}${sep}limit=${PAGE}&offset=${offset}`);
      items.push(...page.items);
      if (page.next_offset === null || page.next_offset === undefined) return items;
      offset = page.next_offset;
    }
  }

  function showAuthStatus() {
    clear(authStatus);
    if (sessionStorage.getItem(TOKEN_KEY)) {
      authStatus.append(
        "token in this tab's session ",
        el("button", { type: "button", class: "link", onclick: () => {
          sessionStorage.removeItem(TOKEN_KEY);
          route();
        } }, "forget it"),
      );
    }
  }

  function askForToken(message) {
    view.hidden = true;
    tokenForm.hidden = false;
    tokenError.textContent = message || "";
    tokenInput.value = "";
    tokenInput.focus();
  }

  tokenForm.addEventListener("submit", (event) => {
    event.preventDefault();
    const token = tokenInput.value.trim();
    if (!token) return;
    sessionStorage.setItem(TOKEN_KEY, token);
    tokenInput.value = "";
    route();
  });

  /** Show an error of a page load; a 401 asks for a token instead. */
  function failed(error) {
    if (error instanceof ApiError && error.status === 401) {
      const had = sessionStorage.getItem(TOKEN_KEY);
      sessionStorage.removeItem(TOKEN_KEY);
      showAuthStatus();
      askForToken(had ? `The token was refused: ${error.message}` : "");
      return;
    }
    show(el("p", { class: "error", role: "alert" }, `Error: ${error.message}`));
    if (!(error instanceof ApiError)) console.warn(error);
  }

  // ------------------------------------------------------------------ charts

  function chartWidth(body) {
    return Math.max(300, (body.clientWidth || 640) - 2);
  }

  /**
   * A uPlot line chart in a <figure data-chart=NAME>.
   * spec: {name, title, xLabel, yLabel, x: [...], series: [{label, values}], logX, bytesX,
   *        bytesY, note}
   */
  function chart(spec) {
    const figure = el("figure", { class: "chart", "data-chart": spec.name },
      el("figcaption", {}, spec.title));
    const body = el("div", { class: "chart-body" });
    figure.append(body);
    if (spec.note) figure.append(el("p", { class: "note" }, spec.note));
    const empty = el("p", { class: "note empty", hidden: true }, "No values recorded yet.");
    figure.append(empty);
    const opts = {
      width: 640,
      height: 260,
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: spec.logX
        ? { time: false, distr: 3, range: (u, min, max) => [10 ** Math.floor(Math.log10(min)), max * 1.2] }
        : { time: false } },
      axes: [
        { label: spec.xLabel, values: spec.bytesX ? (u, vals) => vals.map(fmtBytes) : undefined,
          incrs: spec.xLabel === "round" ? INTEGER_STEPS : undefined, size: 40 },
        { label: spec.yLabel, values: spec.bytesY ? (u, vals) => vals.map(fmtBytes) : undefined,
          incrs: spec.intY ? INTEGER_STEPS : undefined, size: spec.bytesY ? 70 : 55 },
      ],
      series: [
        { label: spec.xLabel, value: spec.bytesX ? (u, v) => fmtBytes(v) : undefined },
        ...spec.series.map((s, i) => ({
          label: s.label,
          stroke: s.color || COLORS[i % COLORS.length],
          width: 1.5,
          spanGaps: true,
          points: { show: true, size: 5 },
          value: spec.bytesY ? (u, v) => fmtBytes(v) : undefined,
        })),
      ],
    };
    const state = { plot: null, spec };
    const draw = () => {
      const data = [spec.x, ...spec.series.map((s) => s.values)];
      figure.dataset.points = String(spec.x.length);
      const counts = spec.series.map((s) => s.values.filter((v) => v !== null && v !== undefined).length);
      figure.dataset.seriesPoints = counts.join(",");
      empty.hidden = counts.some((n) => n > 0);
      if (state.plot) {
        state.plot.setData(data);
      } else {
        opts.width = chartWidth(body);
        state.plot = new uPlot(opts, data, body);
      }
    };
    state.update = (x, series) => {
      spec.x = x;
      series.forEach((values, i) => { spec.series[i].values = values; });
      draw();
    };
    state.figure = figure;
    state.draw = draw;
    const onResize = () => { if (state.plot) state.plot.setSize({ width: chartWidth(body), height: 260 }); };
    window.addEventListener("resize", onResize);
    cleanups.push(() => {
      window.removeEventListener("resize", onResize);
      if (state.plot) state.plot.destroy();
    });
    return state;
  }

  // ------------------------------------------------------------------ runs table

  const RUN_COLUMNS = [
    { key: "id", label: "id", get: (r) => r.id, num: true },
    { key: "name", label: "name", get: (r) => runName(r) },
    { key: "strategy", label: "strategy", get: (r) => r.strategy },
    { key: "compressors", label: "compressors (up / down)",
      get: (r) => `${r.uplink_compressor} / ${r.downlink_compressor}` },
    { key: "status", label: "status", get: (r) => r.status },
    { key: "rounds", label: "rounds", get: (r) => r.summary.rounds_done, num: true },
    { key: "up", label: "bytes up", get: (r) => r.summary.uplink_bytes, num: true, show: fmtBytes },
    { key: "down", label: "bytes down", get: (r) => r.summary.downlink_bytes, num: true,
      show: fmtBytes },
    { key: "best", label: "best accuracy", get: (r) => r.summary.best_eval_accuracy, num: true,
      show: (v) => fmtNum(v) },
    { key: "started", label: "started", get: (r) => r.started_at, show: fmtTime },
  ];

  const runsState = { sort: "id", order: "desc", filter: "", selected: new Set() };

  function sortedRuns(runs) {
    const column = RUN_COLUMNS.find((c) => c.key === runsState.sort) || RUN_COLUMNS[0];
    const sign = runsState.order === "asc" ? 1 : -1;
    const needle = runsState.filter.trim().toLowerCase();
    const shown = needle
      ? runs.filter((r) => RUN_COLUMNS.some((c) => String(c.get(r) ?? "").toLowerCase().includes(needle)))
      : runs.slice();
    shown.sort((a, b) => {
      const x = column.get(a);
      const y = column.get(b);
      if (x === y) return (a.id - b.id) * sign;
      if (x === null || x === undefined) return 1; // missing values last, both orders
      if (y === null || y === undefined) return -1;
      if (column.num) return (x - y) * sign;
      return String(x).localeCompare(String(y)) * sign;
    });
    return shown;
  }

  async function pageRuns(serial) {
    let runs = await apiAll("runs?sort=id&order=desc");
    if (serial !== routeSerial) return;
    const tbody = el("tbody");
    const count = el("span", { class: "count" });
    const compareButton = el("button", { type: "button", id: "compare-selected", onclick: () => {
      const ids = [...runsState.selected].sort((a, b) => a - b);
      location.hash = `#/compare?ids=${ids.join(",")}`;
    } }, "Compare selected");
    const headRow = el("tr", {}, el("th", { scope: "col" }, ""),
      RUN_COLUMNS.map((c) => el("th", { scope: "col", "data-sort": c.key, tabindex: 0,
        "aria-sort": "none", onclick: () => sortBy(c.key),
        onkeydown: (e) => { if (e.key === "Enter") sortBy(c.key); } }, c.label)));

    function sortBy(key) {
      if (runsState.sort === key) runsState.order = runsState.order === "asc" ? "desc" : "asc";
      else { runsState.sort = key; runsState.order = key === "name" || key === "strategy" ? "asc" : "desc"; }
      render();
    }

    function render() {
      const shown = sortedRuns(runs);
      clear(tbody);
      for (const run of shown) {
        const box = el("input", { type: "checkbox", "aria-label": `select run ${run.id}`,
          "data-run": run.id, checked: runsState.selected.has(run.id), onchange: (e) => {
            if (e.target.checked) runsState.selected.add(run.id); else runsState.selected.delete(run.id);
            compareButton.disabled = runsState.selected.size < 1;
          } });
        const cells = RUN_COLUMNS.map((c) => {
          const value = c.get(run);
          const text = c.show ? c.show(value) : (value ?? "");
          if (c.key === "name") {
            return el("td", { class: "name" }, el("a", { href: `#/run/${run.id}` }, text));
          }
          if (c.key === "status") {
            return el("td", {}, el("span", { class: `status status-${run.status}` }, text));
          }
          return el("td", { class: c.num ? "num" : null }, text);
        });
        tbody.append(el("tr", { "data-run-id": run.id }, el("td", {}, box), cells));
      }
      for (const th of headRow.querySelectorAll("th[data-sort]")) {
        const on = th.dataset.sort === runsState.sort;
        th.setAttribute("aria-sort", on ? (runsState.order === "asc" ? "ascending" : "descending") : "none");
        th.classList.toggle("sorted", on);
      }
      count.textContent = `${shown.length} of ${runs.length} runs`;
      compareButton.disabled = runsState.selected.size < 1;
    }

    const filter = el("input", { type: "search", id: "runs-filter", placeholder: "filter runs",
      "aria-label": "filter runs", value: runsState.filter, oninput: (e) => {
        runsState.filter = e.target.value;
        render();
      } });
    show(
      el("h1", {}, "Runs"),
      el("div", { class: "toolbar" }, filter, count, compareButton),
      runs.length === 0
        ? el("p", { class: "note" }, "No runs stored yet: `fedsqueeze simulate` records one.")
        : null,
      el("table", { class: "runs", id: "runs-table" }, el("thead", {}, headRow), tbody),
    );
    render();

    // refresh: every 2 s while some run is running, else every 10 s (new runs appear);
    // the table keeps its sort, filter and selection
    let timer = null;
    const refresh = async () => {
      try {
        const fresh = await apiAll("runs?sort=id&order=desc");
        if (serial !== routeSerial) return;
        runs = fresh;
        render();
        schedule();
      } catch (error) {
        if (serial === routeSerial) failed(error);
      }
    };
    const schedule = () => {
      timer = setTimeout(refresh, runs.some((r) => r.status === "running") ? POLL_MS : 5 * POLL_MS);
    };
    schedule();
    cleanups.push(() => clearTimeout(timer));
  }

  // ------------------------------------------------------------------ run page

  /** The run page's curves from its rounds (cumulative bytes are running sums). */
  function runCurves(rounds) {
    const c = {
      round: [], bytes: [], trainLoss: [], evalLoss: [], accuracy: [],
      up: [], down: [], catchup: [], sampled: [], replied: [], failed: [],
      rejected: [], resyncs: [], hasCatchup: false, hasRejected: false,
    };
    let total = 0;
    for (const r of rounds) {
      const extra = r.extra || {};
      const catchup = Number.isFinite(extra.catchup_bytes) ? extra.catchup_bytes : null;
      total += r.uplink_bytes + r.downlink_bytes;
      c.round.push(r.round);
      c.bytes.push(total);
      c.trainLoss.push(r.train_loss);
      c.evalLoss.push(r.eval_loss);
      c.accuracy.push(r.eval_accuracy);
      c.up.push(r.uplink_bytes);
      // the measured downlink includes catch-up traffic: show it apart
      c.down.push(catchup === null ? r.downlink_bytes : r.downlink_bytes - catchup);
      c.catchup.push(catchup);
      c.sampled.push(r.sampled);
      c.replied.push(r.replied);
      c.failed.push(r.failed);
      c.rejected.push(Number.isFinite(extra.rejected) ? extra.rejected : null);
      c.resyncs.push(Number.isFinite(extra.resyncs) ? extra.resyncs : null);
      c.hasCatchup = c.hasCatchup || catchup !== null;
      c.hasRejected = c.hasRejected || Number.isFinite(extra.rejected) || Number.isFinite(extra.resyncs);
    }
    return c;
  }

  function runCharts(c) {
    const logX = c.bytes.length > 0 && c.bytes[0] > 0;
    return [
      { name: "loss-round", title: "Loss vs round", xLabel: "round", yLabel: "loss", x: c.round,
        series: [{ label: "eval loss", values: c.evalLoss }, { label: "train loss", values: c.trainLoss }],
        pick: (k) => [k.evalLoss, k.trainLoss], xOf: (k) => k.round },
      { name: "accuracy-round", title: "Accuracy vs round", xLabel: "round", yLabel: "accuracy",
        x: c.round, series: [{ label: "eval accuracy", values: c.accuracy }],
        pick: (k) => [k.accuracy], xOf: (k) => k.round },
      { name: "loss-bytes", title: "Loss vs cumulative bytes (up + down)", xLabel: "bytes",
        yLabel: "loss", x: c.bytes, logX, bytesX: true,
        series: [{ label: "eval loss", values: c.evalLoss }, { label: "train loss", values: c.trainLoss }],
        pick: (k) => [k.evalLoss, k.trainLoss], xOf: (k) => k.bytes },
      { name: "accuracy-bytes", title: "Accuracy vs cumulative bytes (up + down)", xLabel: "bytes",
        yLabel: "accuracy", x: c.bytes, logX, bytesX: true,
        series: [{ label: "eval accuracy", values: c.accuracy }],
        pick: (k) => [k.accuracy], xOf: (k) => k.bytes },
      { name: "bytes-round", title: "Bytes per round", xLabel: "round", yLabel: "bytes",
        x: c.round, bytesY: true,
        series: [{ label: "uplink", values: c.up },
                 { label: c.hasCatchup ? "downlink (without catch-up)" : "downlink", values: c.down },
                 { label: "downlink catch-up", values: c.catchup }],
        note: c.hasCatchup ? null : "This run records no catch-up bytes (e.g. Flower's FedAvg).",
        pick: (k) => [k.up, k.down, k.catchup], xOf: (k) => k.round },
      { name: "participants-round", title: "Participants per round", xLabel: "round", yLabel: "clients",
        x: c.round, intY: true,
        series: [{ label: "sampled", values: c.sampled }, { label: "replied", values: c.replied },
                 { label: "failed", values: c.failed }],
        pick: (k) => [k.sampled, k.replied, k.failed], xOf: (k) => k.round },
      { name: "rejected-round", title: "Rejected replies and resyncs per round", xLabel: "round",
        yLabel: "replies", x: c.round, intY: true,
        series: [{ label: "rejected", values: c.rejected }, { label: "resyncs", values: c.resyncs }],
        note: c.hasRejected ? null : "This run records no rejected replies or resyncs (e.g. Flower's FedAvg).",
        pick: (k) => [k.rejected, k.resyncs], xOf: (k) => k.round },
    ];
  }

  function summaryList(run) {
    const s = run.summary;
    const items = [
      ["status", run.status],
      ["strategy", run.strategy],
      ["compressors", `${run.uplink_compressor} / ${run.downlink_compressor}`],
      ["task", run.task],
      ["rounds", String(s.rounds_done)],
      ["bytes up", fmtBytes(s.uplink_bytes)],
      ["bytes down", fmtBytes(s.downlink_bytes)],
      ["best accuracy", s.best_eval_accuracy === null ? "" :
        `${fmtNum(s.best_eval_accuracy)} (round ${s.best_eval_round})`],
      ["compression (total)", s.total_compression_ratio === null ? "" :
        `${fmtNum(s.total_compression_ratio, 3)}× vs float32`],
      ["started", fmtTime(run.started_at)],
      ["ended", fmtTime(run.ended_at)],
    ];
    return el("dl", { class: "summary", id: "run-summary" },
      items.map(([k, v]) => el("div", {}, el("dt", {}, k), el("dd", { "data-field": k }, v))));
  }

  function settingsTable(config) {
    const keys = Object.keys(config || {}).sort();
    return el("table", { class: "settings" },
      el("tbody", {}, keys.map((k) => {
        const v = config[k];
        return el("tr", {}, el("th", { scope: "row" }, k),
          el("td", {}, typeof v === "string" ? v : JSON.stringify(v)));
      })));
  }

  async function pageRun(serial, runId) {
    let [run, rounds] = await Promise.all([api(`runs/${runId}`), apiAll(`runs/${runId}/rounds`)]);
    if (serial !== routeSerial) return;
    const summaryHolder = el("div", {}, summaryList(run));
    const live = el("p", { class: "live", id: "live-status" });
    const specs = runCharts(runCurves(rounds));
    const charts = specs.map((spec) => chart(spec));
    show(
      el("h1", {}, `${runName(run)} `, el("small", {}, `run ${run.id}`)),
      live,
      summaryHolder,
      el("section", { class: "charts" }, charts.map((c) => c.figure)),
      el("h2", {}, "Settings"),
      settingsTable(run.config),
    );
    charts.forEach((c) => c.draw());

    const setLive = () => {
      live.textContent = run.status === "running"
        ? `running: updating every ${POLL_MS / 1000} s`
        : "";
    };
    setLive();
    if (run.status !== "running") return;
    let busy = false;
    const timer = setInterval(async () => {
      if (busy) return;
      busy = true;
      try {
        const last = rounds.length ? rounds[rounds.length - 1].round : -1;
        const [fresh, more] = await Promise.all([
          api(`runs/${runId}`), apiAll(`runs/${runId}/rounds?from_round=${last + 1}`),
        ]);
        if (serial !== routeSerial) return;
        run = fresh;
        if (more.length) {
          rounds = rounds.concat(more);
          const curves = runCurves(rounds);
          runCharts(curves).forEach((spec, i) => charts[i].update(spec.xOf(curves), spec.pick(curves)));
        }
        clear(summaryHolder);
        summaryHolder.append(summaryList(run));
        setLive();
        if (run.status !== "running") clearInterval(timer);
      } catch (error) {
        if (serial === routeSerial) { clearInterval(timer); failed(error); }
      } finally {
        busy = false;
      }
    }, POLL_MS);
    cleanups.push(() => clearInterval(timer));
  }

  // ------------------------------------------------------------------ compare page

  /** Align several runs' (x, y) points on one sorted x axis (null where a run has none). */
  function align(tables) {
    const xs = [...new Set(tables.flatMap((t) => t.x))].sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const ys = tables.map((t) => {
      const column = new Array(xs.length).fill(null);
      t.x.forEach((x, i) => { if (t.y[i] !== null && t.y[i] !== undefined) column[index.get(x)] = t.y[i]; });
      return column;
    });
    return { x: xs, ys };
  }

  async function pageCompare(serial, ids) {
    if (ids.length === 0) {
      show(el("h1", {}, "Compare runs"),
        el("p", { class: "note" }, "Choose runs with the checkboxes of the ",
          el("a", { href: "#/runs" }, "runs table"), " and press “Compare selected”."));
      return;
    }
    const query = ids.map((i) => `run_id=${encodeURIComponent(i)}`).join("&");
    const data = await api(`compare?${query}`);
    if (serial !== routeSerial) return;
    const runs = new Map(data.runs.map((r) => [r.id, r]));
    const label = (id) => {
      const r = runs.get(id);
      return `${runName(r)}: ${r.strategy} (${r.uplink_compressor} / ${r.downlink_compressor})`;
    };
    const bytesOf = (s) => s.uplink_bytes_cumulative.map((u, i) => u + s.downlink_bytes_cumulative[i]);
    const make = (name, title, xLabel, yLabel, xOf, yOf, logX) => {
      const tables = data.series.map((s) => ({ x: xOf(s), y: yOf(s) }));
      const { x, ys } = align(tables);
      return chart({ name, title, xLabel, yLabel, x, logX: logX && x.length > 0 && x[0] > 0,
        bytesX: xLabel === "bytes",
        series: data.series.map((s, i) => ({ label: label(s.run_id), values: ys[i] })) });
    };
    const charts = [
      make("compare-accuracy-bytes", "Accuracy vs cumulative bytes (up + down, log scale)", "bytes",
        "accuracy", bytesOf, (s) => s.eval_accuracy, true),
      make("compare-loss-bytes", "Loss vs cumulative bytes (up + down, log scale)", "bytes",
        "eval loss", bytesOf, (s) => s.eval_loss, true),
      make("compare-accuracy-round", "Accuracy vs round", "round", "accuracy",
        (s) => s.rounds, (s) => s.eval_accuracy, false),
      make("compare-loss-round", "Loss vs round", "round", "eval loss",
        (s) => s.rounds, (s) => s.eval_loss, false),
    ];
    const table = el("table", { class: "runs" },
      el("thead", {}, el("tr", {}, ["run", "strategy", "status", "rounds", "bytes up", "bytes down",
        "best accuracy"].map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, data.runs.map((r) => el("tr", {},
        el("td", {}, el("a", { href: `#/run/${r.id}` }, runName(r))),
        el("td", {}, r.strategy), el("td", {}, r.status),
        el("td", { class: "num" }, String(r.summary.rounds_done)),
        el("td", { class: "num" }, fmtBytes(r.summary.uplink_bytes)),
        el("td", { class: "num" }, fmtBytes(r.summary.downlink_bytes)),
        el("td", { class: "num" }, fmtNum(r.summary.best_eval_accuracy))))));
    show(el("h1", {}, "Compare runs"), table,
      el("section", { class: "charts" }, charts.map((c) => c.figure)));
    charts.forEach((c) => c.draw());
  }

  // ------------------------------------------------------------------ clients page

  async function pageClients(serial) {
    const clients = await apiAll("clients");
    if (serial !== routeSerial) return;
    const headers = ["id", "name", "location", "node id", "status", "enrolled", "last round",
      "rounds", "ok", "failed", "bytes up", "bytes down", "examples"];
    show(
      el("h1", {}, "Clients"),
      clients.length === 0
        ? el("p", { class: "note" }, "No enrolled clients (`fedsqueeze client enroll`).")
        : null,
      el("table", { class: "runs", id: "clients-table" },
        el("thead", {}, el("tr", {}, headers.map((h) => el("th", { scope: "col" }, h)))),
        el("tbody", {}, clients.map((c) => {
          const p = c.participation;
          return el("tr", { "data-client-id": c.id },
            el("td", { class: "num" }, String(c.id)), el("td", {}, c.name), el("td", {}, c.location || ""),
            el("td", { class: "num" }, c.node_id === null ? "" : String(c.node_id)),
            el("td", {}, el("span", { class: `status status-${c.status}` }, c.status)),
            el("td", {}, fmtTime(c.enrolled_at)), el("td", {}, fmtTime(p.last_round_at)),
            el("td", { class: "num" }, String(p.rounds)), el("td", { class: "num" }, String(p.ok)),
            el("td", { class: p.failed ? "num bad" : "num" }, String(p.failed)),
            el("td", { class: "num" }, fmtBytes(p.uplink_bytes)),
            el("td", { class: "num" }, fmtBytes(p.downlink_bytes)),
            el("td", { class: "num" }, String(p.num_examples)));
        }))),
    );
  }

  // ------------------------------------------------------------------ router

  function parseHash() {
    const hash = location.hash.replace(/^#\/?/, "");
    const [path, query] = hash.split("?");
    const params = new URLSearchParams(query || "");
    const parts = path.split("/").filter(Boolean);
    return { page: parts[0] || "runs", arg: parts[1], params };
  }

  async function route() {
    routeSerial += 1;
    const serial = routeSerial;
    cleanups.forEach((f) => f());
    cleanups = [];
    tokenForm.hidden = true;
    view.hidden = false;
    showAuthStatus();
    const { page, arg, params } = parseHash();
    for (const a of document.querySelectorAll("nav a")) {
      a.classList.toggle("active", a.dataset.nav === (page === "run" ? "runs" : page));
    }
    document.body.dataset.page = page;
    document.body.dataset.ready = "false";
    show(el("p", { class: "note" }, "Loading…"));
    try {
      if (page === "runs") await pageRuns(serial);
      else if (page === "run" && /^\d+$/.test(arg || "")) await pageRun(serial, Number(arg));
      else if (page === "compare") {
        const ids = (params.get("ids") || "").split(",").filter((s) => /^\d+$/.test(s)).map(Number);
        await pageCompare(serial, ids);
      } else if (page === "clients") await pageClients(serial);
      else {
        show(el("p", { class: "error" }, "No such page."), el("a", { href: "#/runs" }, "Runs"));
      }
      if (serial === routeSerial) document.body.dataset.ready = "true";
    } catch (error) {
      if (serial === routeSerial) failed(error);
    }
  }

  window.addEventListener("hashchange", route);
  route();
})();

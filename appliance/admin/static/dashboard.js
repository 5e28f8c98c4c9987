// The appliance dashboard: polls the admin JSON APIs once a second and draws them.
// No libraries: charts are hand-made SVG polylines. Every text from the proxy (labels,
// authorities, paths, dtabs) goes into the page with textContent, never as HTML.
"use strict";
(function () {
  const POLL_MS = 1000;
  const DTAB_EVERY = 5;        // polls between reloads of /dtab
  const CHART_SPAN_S = 60;     // seconds of history on the x axis
  const SVG = "http://www.w3.org/2000/svg";
  const ewmaHistory = new Map(); // endpoint key -> [[time_ms, ewma_ms]...], kept client-side
  const openHistory = [];        // [[time_ms, open TCP connections]...], kept client-side

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k.startsWith("data-")) node.setAttribute(k, v);
      else node[k] = v;
    }
    for (const c of children) {
      if (c === null || c === undefined) continue;
      node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return node;
  }

  // ------------------------------------------------------------------ formatting
  function fmtRate(v) {
    if (v === null || v === undefined) return "\u2013";
    return v < 10 ? v.toFixed(2) : v < 1000 ? v.toFixed(1) : Math.round(v).toString();
  }
  function fmtPct(v) {
    return v === null || v === undefined ? "\u2013" : (v * 100).toFixed(v >= 0.9995 ? 0 : 2) + "%";
  }
  function fmtMs(v) {
    if (v === null || v === undefined) return "\u2013";
    return (v < 10 ? v.toFixed(2) : v < 1000 ? v.toFixed(0) : (v / 1000).toFixed(2) + " s") +
      (v < 1000 ? " ms" : "");
  }
  function fmtBytes(v) {
    if (v === null || v === undefined) return "\u2013";
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (i === 0 ? Math.round(v) : v.toFixed(1)) + " " + units[i];
  }
  function successClass(v) {
    return v === null || v === undefined ? "" : v >= 0.99 ? "good" : v >= 0.95 ? "warn" : "bad";
  }

  // ------------------------------------------------------------------ charts
  // lines: [{cls, points: [[age_s, value|null], ...]}]; y from opts.min (default 0) to
  // opts.max (default: the largest value). opts.fmt formats the hover title.
  function drawChart(svg, lines, opts) {
    opts = opts || {};
    const box = svg.viewBox.baseVal;
    const w = box && box.width ? box.width : 160;
    const h = box && box.height ? box.height : 36;
    const min = opts.min || 0;
    let max = opts.max !== undefined ? opts.max : 0;
    let count = 0, last = null, peak = null;
    for (const line of lines) {
      for (const [, v] of line.points) {
        if (v === null || v === undefined) continue;
        count += 1;
        last = v;
        if (peak === null || v > peak) peak = v;
        if (opts.max === undefined && v > max) max = v;
      }
    }
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    if (max <= min) max = min + 1;
    const title = document.createElementNS(SVG, "title");
    const fmt = opts.fmt || fmtRate;
    title.textContent = "scale " + fmt(min) + " \u2013 " + fmt(max) +
      (last === null ? "" : "; latest " + fmt(last));
    svg.appendChild(title);
    for (const line of lines) {
      let run = [];
      const flush = () => {
        if (run.length === 1) run.push([run[0][0] + 0.5, run[0][1]]);
        if (run.length > 1) {
          const poly = document.createElementNS(SVG, "polyline");
          poly.setAttribute("class", line.cls || "");
          poly.setAttribute("points", run.map(([x, y]) => x.toFixed(1) + "," + y.toFixed(1))
            .join(" "));
          svg.appendChild(poly);
        }
        run = [];
      };
      for (const [age, v] of line.points) {
        if (v === null || v === undefined || age > CHART_SPAN_S) { flush(); continue; }
        const x = w * (1 - age / CHART_SPAN_S);
        const y = h - 1 - (h - 2) * Math.min(Math.max((v - min) / (max - min), 0), 1);
        run.push([x, y]);
      }
      flush();
    }
    svg.setAttribute("data-points", String(count));
    svg.setAttribute("data-max", String(peak === null ? 0 : peak)); // for tests
  }

  function chart(cls) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "chart " + (cls || ""));
    svg.setAttribute("viewBox", "0 0 160 36");
    svg.setAttribute("preserveAspectRatio", "none");
    return svg;
  }

  function pointsOf(history, field) {
    return history.map((p) => [p.age_s, p[field]]);
  }

  // Success-rate charts span [floor, 1]: 90% and up unless the rate fell lower.
  function successOpts(points) {
    let low = 0.9;
    for (const [, v] of points) if (v !== null && v !== undefined && v < low) low = v;
    return {min: Math.floor(low * 10) / 10, max: 1, fmt: fmtPct};
  }

  // ------------------------------------------------------------------ labels
  function serviceName(labels) {
    return labels.dst_service || labels.authority || labels.route || "";
  }
  function labelCell(labels) {
    const td = el("td", {});
    const main = serviceName(labels);
    if (main) td.append(el("span", {class: "label main"}, main));
    for (const [k, v] of Object.entries(labels)) {
      if (v === main) continue;
      td.append(el("span", {class: "label", title: k}, k === "direction" || k === "protocol"
        ? v : k + "=" + v));
    }
    return td;
  }
  function seriesKey(labels) {
    return Object.entries(labels).map(([k, v]) => k + "=" + v).join(",");
  }
  function byLabels(a, b) {
    const ka = (a.labels.direction || "") + serviceName(a.labels) + seriesKey(a.labels);
    const kb = (b.labels.direction || "") + serviceName(b.labels) + seriesKey(b.labels);
    return ka < kb ? -1 : ka > kb ? 1 : 0;
  }

  function replaceBody(table, rows, emptyText, columns) {
    const body = table.tBodies[0];
    const fresh = document.createElement("tbody");
    if (rows.length === 0) {
      fresh.append(el("tr", {class: "empty"}, el("td", {colSpan: columns}, emptyText)));
    }
    for (const row of rows) fresh.append(row);
    table.replaceChild(fresh, body);
  }

  // ------------------------------------------------------------------ /api/stats
  function httpRow(s) {
    const win = s.window || {};
    const tr = el("tr", {"data-key": seriesKey(s.labels),
                         "data-rate": String(win.request_rate || 0),
                         "data-requests": String(s.requests)});
    tr.append(labelCell(s.labels));
    tr.append(el("td", {class: "num"}, fmtRate(win.request_rate)));
    tr.append(el("td", {class: "num " + successClass(win.success_rate)},
                 fmtPct(win.success_rate)));
    tr.append(el("td", {class: "num"}, fmtMs(win.p50_ms)));
    tr.append(el("td", {class: "num"}, fmtMs(win.p95_ms)));
    tr.append(el("td", {class: "num"}, fmtMs(win.p99_ms)));
    const rate = chart("rate"), success = chart("success"), latency = chart("latency");
    drawChart(rate, [{cls: "rate", points: pointsOf(s.history, "request_rate")}]);
    const ok = pointsOf(s.history, "success_rate");
    drawChart(success, [{cls: "success", points: ok}], successOpts(ok));
    drawChart(latency, [
      {cls: "p50", points: pointsOf(s.history, "p50_ms")},
      {cls: "p95", points: pointsOf(s.history, "p95_ms")},
      {cls: "p99", points: pointsOf(s.history, "p99_ms")},
    ], {fmt: fmtMs});
    for (const c of [rate, success, latency]) tr.append(el("td", {}, c));
    return tr;
  }

  function tcpRow(s) {
    const win = s.window || {};
    const tr = el("tr", {"data-key": seriesKey(s.labels)});
    tr.append(labelCell(s.labels));
    tr.append(el("td", {class: "num"}, String(s.open)));
    tr.append(el("td", {class: "num"}, fmtRate(win.open_rate)));
    tr.append(el("td", {class: "num"}, fmtBytes(win.read_rate)));
    tr.append(el("td", {class: "num"}, fmtBytes(win.write_rate)));
    const bytes = chart("bytes");
    drawChart(bytes, [{cls: "read", points: pointsOf(s.history, "read_rate")},
                      {cls: "write", points: pointsOf(s.history, "write_rate")}],
              {fmt: (v) => fmtBytes(v) + "/s"});
    tr.append(el("td", {}, bytes));
    return tr;
  }

  // Sums over series of one field per history age (series are snapshotted together).
  function totals(series, field, weightField) {
    const sums = new Map();
    for (const s of series) {
      for (const p of s.history) {
        const key = p.age_s.toFixed(1);
        const cur = sums.get(key) || {age: p.age_s, sum: 0, weight: 0};
        const v = p[field];
        if (v !== null && v !== undefined) {
          const w = weightField ? (p[weightField] || 0) : 1;
          cur.sum += v * w;
          cur.weight += w;
        }
        sums.set(key, cur);
      }
    }
    return [...sums.values()].sort((a, b) => b.age - a.age)
      .map((c) => [c.age, weightField ? (c.weight > 0 ? c.sum / c.weight : null) : c.sum]);
  }

  function renderStats(stats) {
    $("info").textContent = "v" + stats.version + " \u00b7 instance " + stats.instance_id +
      " \u00b7 up " + Math.round(stats.uptime_s) + " s";
    $("window-note").textContent = "(rates and percentiles over the last " + stats.window_s +
      " s; charts: last " + CHART_SPAN_S + " s)";
    const http = [...stats.http].sort(byLabels);
    const tcp = [...stats.tcp].sort(byLabels);
    replaceBody($("http"), http.map(httpRow), "no HTTP traffic yet", 9);
    replaceBody($("tcp"), tcp.map(tcpRow), "no connections yet", 6);

    let rate = 0, ok = 0, done = 0, open = 0;
    for (const s of http) {
      const w = s.window || {};
      rate += w.request_rate || 0;
      if (w.success_rate !== null && w.success_rate !== undefined) {
        ok += w.success_rate * (w.request_rate || 0);
        done += w.request_rate || 0;
      }
    }
    for (const s of tcp) open += s.open;
    $("total-rate").textContent = fmtRate(rate);
    const success = done > 0 ? ok / done : null;
    $("total-success").textContent = fmtPct(success);
    $("total-success").className = "tile-value " + successClass(success);
    $("total-open").textContent = String(open);
    drawChart($("chart-total-rate"), [{cls: "rate", points: totals(http, "request_rate")}]);
    const okPoints = totals(http, "success_rate", "request_rate");
    drawChart($("chart-total-success"), [{cls: "success", points: okPoints}],
              successOpts(okPoints));
    const now = Date.now();
    openHistory.push([now, open]);
    while (openHistory.length && now - openHistory[0][0] > CHART_SPAN_S * 1000) {
      openHistory.shift();
    }
    drawChart($("chart-total-open"),
              [{cls: "rate", points: openHistory.map(([t, v]) => [(now - t) / 1000, v])}],
              {fmt: String});
  }

  // ------------------------------------------------------------------ /api/endpoints
  function endpointRow(service, ep, now) {
    const key = service.direction + " " + service.id + " " + ep.address;
    const hist = ewmaHistory.get(key) || [];
    hist.push([now, ep.ewma_ms]);
    while (hist.length && now - hist[0][0] > CHART_SPAN_S * 1000) hist.shift();
    ewmaHistory.set(key, hist);
    const state = el("span", {class: "badge " + ep.state}, ep.state);
    const stateCell = el("td", {}, state);
    if (ep.state === "ejected" && ep.probe_in_s !== null) {
      stateCell.append(" probe in " + ep.probe_in_s.toFixed(1) + " s");
    }
    const spark = chart("ewma");
    drawChart(spark, [{cls: "p50", points: hist.map(([t, v]) => [(now - t) / 1000, v])}],
              {fmt: fmtMs});
    return el("tr", {"data-address": ep.address, "data-state": ep.state},
      el("td", {}, el("code", {}, ep.address)),
      el("td", {class: "num"}, String(ep.weight)),
      el("td", {class: "num"}, String(ep.pending)),
      el("td", {class: "num"}, fmtMs(ep.ewma_ms)),
      stateCell,
      el("td", {class: "num"}, String(ep.ejections)),
      el("td", {}, spark));
  }

  function renderEndpoints(data) {
    const box = $("endpoints");
    const now = Date.now();
    const fresh = document.createElement("div");
    fresh.id = "endpoints";
    if (data.services.length === 0) {
      fresh.append(el("p", {class: "empty"}, "no routed services yet (set routing.dtab to " +
        "balance requests over discovered endpoints)"));
    }
    const seen = new Set();
    for (const svc of data.services) {
      const d = svc.discovery;
      const head = el("div", {class: "service-head"},
        el("code", {}, svc.id),
        el("span", {class: "badge " + d.kind}, d.kind),
        d.stale ? el("span", {class: "badge stale", title: d.error}, "stale") : null,
        el("span", {class: "label"}, svc.direction),
        el("span", {class: "label"}, svc.balancer),
        d.error ? el("span", {class: "bad"}, d.error) : null);
      const table = el("table", {},
        el("thead", {}, el("tr", {},
          el("th", {}, "address"), el("th", {class: "num"}, "weight"),
          el("th", {class: "num"}, "pending"), el("th", {class: "num"}, "EWMA"),
          el("th", {}, "state"), el("th", {class: "num"}, "ejections"),
          el("th", {}, "EWMA latency"))));
      const body = el("tbody", {});
      for (const ep of svc.endpoints) {
        seen.add(svc.direction + " " + svc.id + " " + ep.address);
        body.append(endpointRow(svc, ep, now));
      }
      if (svc.endpoints.length === 0) {
        body.append(el("tr", {class: "empty"}, el("td", {colSpan: 7}, "no endpoints")));
      }
      table.append(body);
      fresh.append(el("div", {class: "service", "data-id": svc.id}, head, table));
    }
    for (const key of [...ewmaHistory.keys()]) if (!seen.has(key)) ewmaHistory.delete(key);
    box.replaceWith(fresh);
  }

  // ------------------------------------------------------------------ /dtab, /delegate
  function renderDtab(data) {
    const out = data.directions.find((d) => d.direction === "outbound");
    $("base-dtab").textContent = out && out.routing
      ? out.dentries.join(";\n") || "(empty)" : "(no dtab: routing is off)";
  }

  function treeNode(node) {
    const li = el("li", {class: "node-" + node.type});
    li.append(el("span", {class: "kind"}, node.type), " ", el("code", {}, node.path));
    if (node.dentry) li.append(" ", el("span", {class: "dentry"}, "by " + node.dentry));
    if (node.bound) {
      li.append(" \u2192 ", el("code", {}, node.bound.id));
      if (node.bound.residual !== "/") li.append(" residual ", el("code", {}, node.bound.residual));
      const a = node.bound.addr;
      if (a && a.addresses) {
        li.append(" ", el("span", {class: "badge " + a.kind}, a.kind), " ",
                  a.addresses.map((x) => x.address).join(", ") || "(no addresses)");
      } else if (a && !a.watched) {
        li.append(" ", el("span", {class: "dentry"}, "(not watched yet)"));
      }
    }
    if (node.message) li.append(" ", el("span", {class: "dentry"}, "\u2014 " + node.message));
    const kids = [];
    if (node.delegate) kids.push(node.delegate);
    if (node.alt) kids.push(...node.alt);
    if (node.union) {
      for (const u of node.union) kids.push(Object.assign({}, u.tree, {weight: u.weight}));
    }
    if (node.weight !== undefined) li.prepend(el("span", {class: "label"}, node.weight + " \u00d7"));
    if (kids.length) li.append(el("ul", {}, ...kids.map(treeNode)));
    return li;
  }

  function caret(text, position) {
    const lines = text.slice(0, position - 1).split("\n");
    const line = text.split("\n")[lines.length - 1];
    return line + "\n" + " ".repeat(lines[lines.length - 1].length) + "^";
  }

  async function runDelegate(event) {
    event.preventDefault();
    const path = $("dlg-path").value, dtab = $("dlg-dtab").value;
    const query = "path=" + encodeURIComponent(path) +
      (dtab.trim() ? "&dtab=" + encodeURIComponent(dtab) : "");
    const err = $("dlg-error"), result = $("dlg-result");
    try {
      const resp = await fetch("/delegate?" + query, {cache: "no-store"});
      const body = await resp.json();
      if (!resp.ok) {
        const field = body.parameter === "dtab" ? dtab : path;
        err.textContent = body.error + (body.position ? "\n\n" + caret(field, body.position) : "");
        err.hidden = false;
        result.hidden = true;
        return;
      }
      err.hidden = true;
      $("dlg-bound").textContent = body.result;
      const tree = $("dlg-tree");
      tree.replaceChildren(el("ul", {}, treeNode(body.tree)));
      result.hidden = false;
    } catch (e) {
      err.textContent = "request failed: " + e;
      err.hidden = false;
    }
  }

  // ------------------------------------------------------------------ polling
  let polls = 0;
  async function getJson(path) {
    const resp = await fetch(path, {cache: "no-store"});
    if (!resp.ok) throw new Error(path + ": HTTP " + resp.status);
    return resp.json();
  }

  async function poll() {
    const status = $("status");
    try {
      const [stats, endpoints] = await Promise.all([getJson("/api/stats"),
                                                    getJson("/api/endpoints")]);
      renderStats(stats);
      renderEndpoints(endpoints);
      if (polls % DTAB_EVERY === 0) renderDtab(await getJson("/dtab"));
      polls += 1;
      status.className = "status ok";
      status.textContent = "live \u00b7 " + new Date().toLocaleTimeString();
      status.setAttribute("data-polls", String(polls));
    } catch (e) {
      status.className = "status down";
      status.textContent = "cannot reach the proxy (" + e.message + "); retrying";
    }
    setTimeout(poll, POLL_MS);
  }

  $("delegator").addEventListener("submit", runDelegate);
  poll();
})();

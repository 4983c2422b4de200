/* gradguard report: draws the views from the JSON block #gg-data.
 * Every name that comes from a run (run, layer, rule, message) is placed with textContent, never
 * as markup. uPlot (MIT, vendored) draws the time series; the heatmap and the bars are plain
 * canvas. window.ggReport records what was drawn, for the browser tests. */
(function () {
  "use strict";
  var status = { plots: {}, errors: [], ready: false };
  window.ggReport = status;
  window.addEventListener("error", function (e) {
    status.errors.push(String(e.message || e));
  });

  var D = JSON.parse(document.getElementById("gg-data").textContent);
  var root = document.getElementById("gg-root");
  var COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#be185d", "#4d7c0f"];

  function el(tag, cls, text, parent) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (parent) parent.appendChild(e);
    return e;
  }

  function fmt(v) {
    if (v === null || v === undefined) return "\u2013";
    if (typeof v === "string") return v;
    if (typeof v !== "number") return String(v);
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (Number.isInteger(v) && a < 1e15) return v.toLocaleString("en-US");
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    if (Number.isInteger(v)) return String(v);
    return String(Number(v.toPrecision(4)));
  }

  function pct(v) {
    return v === null || v === undefined ? "\u2013" : (100 * v).toFixed(1) + "%";
  }

  function decode(b64) {
    var s = atob(b64), out = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
    return out;
  }

  // viridis, 11 stops, interpolated to 254 entries
  var VIR = [[68,1,84],[72,36,117],[65,68,135],[53,95,141],[42,120,142],[33,145,140],[34,168,132],[68,191,112],[122,209,81],[189,223,38],[253,231,37]];
  var LUT = [];
  for (var i = 0; i < 254; i++) {
    var t = i / 253 * 10, k = Math.min(9, Math.floor(t)), f = t - k;
    LUT.push([0, 1, 2].map(function (c) { return Math.round(VIR[k][c] + f * (VIR[k + 1][c] - VIR[k][c])); }));
  }
  LUT[254] = [230, 0, 80];   // non-finite
  LUT[255] = [236, 236, 236]; // no record

  function card(parent, id, title, subtitle) {
    var c = el("div", "card", null, parent);
    c.id = id;
    el("h3", null, title, c);
    if (subtitle) el("p", "sub", subtitle, c);
    var body = el("div", "plot", null, c);
    body.setAttribute("data-plot", id);
    return body;
  }

  function widthOf(node) {
    return Math.max(360, Math.min(1400, (node.clientWidth || 1000) - 4));
  }

  function finiteCount(arr) {
    var n = 0;
    for (var i = 0; i < arr.length; i++) if (arr[i] !== null && isFinite(arr[i])) n++;
    return n;
  }

  function noData(body, id, text) {
    el("p", "empty", text, body);
    status.plots[id] = { kind: "empty", points: 0, reason: text };
  }

  var tip = el("div", "tip", null, document.body);
  tip.style.display = "none";
  function showTip(ev, text) {
    tip.textContent = text;
    tip.style.display = "block";
    tip.style.left = (ev.pageX + 12) + "px";
    tip.style.top = (ev.pageY + 12) + "px";
  }
  function hideTip() { tip.style.display = "none"; }

  /* ---- time series through uPlot ---- */
  function linePlot(body, id, x, series, o) {
    o = o || {};
    var total = 0;
    series.forEach(function (s) { if (!s.marker && !s.reference) total += finiteCount(s.values); });
    if (!x.length || total === 0) { noData(body, id, o.empty || "no data recorded"); return null; }
    var scales = { x: { time: false }, y: o.log === false ? {} : { distr: 3, log: 10 } };
    if (o.rate) scales.y = { range: function (u, mn, mx) { return [0, Math.max(0.05, mx * 1.05)]; } };
    var ticks = function (u, splits) { return splits.map(function (v) { return v === null ? "" : fmt(v); }); };
    var axes = [{ label: o.xlabel || "step" }, { label: o.ylabel || "", scale: "y", size: 70, values: ticks }];
    var useries = [{ label: o.xlabel || "step" }];
    var data = [x];
    series.forEach(function (s, k) {
      var color = s.color || COLORS[k % COLORS.length];
      var u = { label: s.label, stroke: color, width: s.width || 1.25, scale: s.scale || "y", spanGaps: !!s.spanGaps };
      if (s.dash) u.dash = s.dash;
      if (s.marker) {
        u.paths = function () { return null; };
        u.points = { show: true, size: s.size || 7, stroke: color, fill: color, width: 1 };
      } else {
        u.points = { show: false };
      }
      useries.push(u);
      data.push(s.values);
    });
    if (o.second) {
      scales[o.second.scale] = o.second.log ? { distr: 3, log: 10 } : {};
      axes.push({ scale: o.second.scale, side: 1, label: o.second.label, grid: { show: false }, size: 70, values: ticks });
    }
    var opts = {
      width: widthOf(body), height: o.height || 300, scales: scales, axes: axes, series: useries,
      cursor: { drag: { x: true, y: false } }, legend: { live: true },
    };
    var u = new uPlot(opts, data, body);
    status.plots[id] = { kind: "uplot", points: total, canvas: true };
    return u;
  }

  /* ---- heatmap (layers x step columns) ---- */
  function heatmap(body, id, hm, what) {
    if (!hm || !hm.rows || !hm.cols) { noData(body, id, "no per-layer records"); return; }
    var cells = decode(hm.cells);
    var rows = hm.rows, cols = hm.cols;
    var W = widthOf(body), rowH = rows <= 40 ? 14 : Math.max(1, Math.min(6, Math.floor(640 / rows)));
    var plotH = Math.max(120, Math.min(680, rows * rowH));
    var labelRows = plotH / rows >= 11;
    var left = labelRows ? 190 : 60, right = 90, top = 8, bottom = 34;
    var plotW = W - left - right;
    var cv = el("canvas", null, null, body);
    var dpr = window.devicePixelRatio || 1;
    cv.width = W * dpr; cv.height = (plotH + top + bottom) * dpr;
    cv.style.width = W + "px"; cv.style.height = (plotH + top + bottom) + "px";
    var ctx = cv.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, plotH + top + bottom);
    var off = document.createElement("canvas");
    off.width = cols; off.height = rows;
    var octx = off.getContext("2d");
    var img = octx.createImageData(cols, rows);
    var drawn = 0;
    for (var p = 0; p < cells.length; p++) {
      var c = LUT[cells[p]];
      img.data[4 * p] = c[0]; img.data[4 * p + 1] = c[1]; img.data[4 * p + 2] = c[2]; img.data[4 * p + 3] = 255;
      if (cells[p] !== 255) drawn++;
    }
    octx.putImageData(img, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, left, top, plotW, plotH);
    ctx.fillStyle = "#333"; ctx.font = "11px sans-serif"; ctx.textBaseline = "middle";
    if (labelRows) {
      ctx.textAlign = "right";
      for (var r = 0; r < rows; r++) {
        var name = hm.layers[r];
        if (name.length > 28) name = "\u2026" + name.slice(-27);
        ctx.fillText(name, left - 6, top + (r + 0.5) * plotH / rows);
      }
    } else {
      ctx.textAlign = "right";
      var every = Math.ceil(rows / 12);
      for (var r2 = 0; r2 < rows; r2 += every) ctx.fillText(String(r2), left - 6, top + (r2 + 0.5) * plotH / rows);
      ctx.save(); ctx.translate(12, top + plotH / 2); ctx.rotate(-Math.PI / 2);
      ctx.textAlign = "center"; ctx.fillText("layer index", 0, 0); ctx.restore();
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    var nt = Math.min(cols, 8);
    for (var t = 0; t < nt; t++) {
      var ci = Math.round(t * (cols - 1) / Math.max(1, nt - 1));
      ctx.fillText(fmt(hm.x0[ci]), left + (ci + 0.5) * plotW / cols, top + plotH + 6);
    }
    ctx.fillText("step", left + plotW / 2, top + plotH + 20);
    // colour bar
    var bx = left + plotW + 18, bw = 14;
    for (var y = 0; y < plotH; y++) {
      var cc = LUT[Math.round((1 - y / plotH) * 253)];
      ctx.fillStyle = "rgb(" + cc[0] + "," + cc[1] + "," + cc[2] + ")";
      ctx.fillRect(bx, top + y, bw, 1.5);
    }
    ctx.fillStyle = "#333"; ctx.textAlign = "left"; ctx.textBaseline = "middle";
    var lo = Number(hm.lo), hi = Number(hm.hi);
    for (var q = 0; q <= 4; q++) {
      var lv = lo + (hi - lo) * q / 4;
      ctx.fillText(fmt(Math.pow(10, lv)), bx + bw + 4, top + plotH - q * plotH / 4);
    }
    var legend = el("p", "sub", null, body);
    el("span", "sw nf", "\u00a0", legend);
    el("span", null, " non-finite  ", legend);
    el("span", "sw nd", "\u00a0", legend);
    el("span", null, " no record  \u00b7 colour: log10 " + (what || hm.label) + ", max per cell", legend);
    cv.addEventListener("mousemove", function (ev) {
      var rect = cv.getBoundingClientRect();
      var cx = ev.clientX - rect.left - left, cy = ev.clientY - rect.top - top;
      if (cx < 0 || cy < 0 || cx >= plotW || cy >= plotH) { hideTip(); return; }
      var col = Math.floor(cx / plotW * cols), row = Math.floor(cy / plotH * rows);
      var code = cells[row * cols + col];
      var val = code === 255 ? "no record" : code === 254 ? "non-finite" : fmt(Math.pow(10, lo + (hi - lo) * code / 253));
      var span = hm.x0[col] === hm.x1[col] ? "step " + hm.x0[col] : "steps " + hm.x0[col] + "\u2013" + hm.x1[col];
      showTip(ev, hm.layers[row] + "\n" + span + "\n" + (what || hm.label) + ": " + val);
    });
    cv.addEventListener("mouseleave", hideTip);
    status.plots[id] = { kind: "heatmap", points: drawn, canvas: true };
  }

  /* ---- per-layer bars on a log axis ---- */
  function bars(body, id, labels, series, o) {
    o = o || {};
    var all = [];
    series.forEach(function (s) { s.values.forEach(function (v) { if (v !== null && v > 0) all.push(v); }); });
    if (!labels.length || !all.length) { noData(body, id, o.empty || "no per-layer records"); return; }
    if (o.ref) all.push(o.ref);
    var lo = Math.floor(Math.log10(Math.min.apply(null, all)) - 0.3), hi = Math.ceil(Math.log10(Math.max.apply(null, all)));
    if (hi <= lo) hi = lo + 1;
    var n = labels.length, W = widthOf(body);
    var showNames = n <= 60;
    var left = 70, right = 10, top = 10, bottom = showNames ? 150 : 30, H = 260;
    var plotW = W - left - right;
    var cv = el("canvas", null, null, body);
    var dpr = window.devicePixelRatio || 1;
    cv.width = W * dpr; cv.height = (H + top + bottom) * dpr;
    cv.style.width = W + "px"; cv.style.height = (H + top + bottom) + "px";
    var ctx = cv.getContext("2d");
    ctx.scale(dpr, dpr);
    ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, W, H + top + bottom);
    function yOf(v) { return top + H - (Math.log10(v) - lo) / (hi - lo) * H; }
    ctx.strokeStyle = "#e5e7eb"; ctx.fillStyle = "#333"; ctx.font = "11px sans-serif";
    ctx.textAlign = "right"; ctx.textBaseline = "middle";
    for (var d = lo; d <= hi; d++) {
      var yy = yOf(Math.pow(10, d));
      ctx.beginPath(); ctx.moveTo(left, yy); ctx.lineTo(left + plotW, yy); ctx.stroke();
      ctx.fillText("1e" + d, left - 6, yy);
    }
    var bw = plotW / n, drawn = 0;
    series.forEach(function (s) {
      ctx.fillStyle = s.color;
      for (var i = 0; i < n; i++) {
        var v = s.values[i];
        if (v === null || !(v > 0)) continue;
        var y0 = yOf(v);
        ctx.fillRect(left + i * bw + bw * 0.1, y0, Math.max(1, bw * 0.8), top + H - y0);
        drawn++;
      }
    });
    if (o.nonfinite) {
      ctx.fillStyle = "rgb(230,0,80)";
      for (var j = 0; j < n; j++) if (o.nonfinite[j] > 0) ctx.fillRect(left + j * bw, top, Math.max(2, bw), 4);
    }
    if (o.ref) {
      var ry = yOf(o.ref);
      ctx.strokeStyle = "#111"; ctx.setLineDash([6, 4]);
      ctx.beginPath(); ctx.moveTo(left, ry); ctx.lineTo(left + plotW, ry); ctx.stroke(); ctx.setLineDash([]);
      ctx.fillStyle = "#111"; ctx.textAlign = "left"; ctx.fillText(fmt(o.ref), left + 4, ry - 8);
    }
    if (showNames) {
      ctx.fillStyle = "#333"; ctx.textAlign = "right"; ctx.textBaseline = "middle";
      for (var k = 0; k < n; k++) {
        var name = labels[k];
        if (name.length > 24) name = "\u2026" + name.slice(-23);
        ctx.save(); ctx.translate(left + (k + 0.5) * bw, top + H + 6); ctx.rotate(-Math.PI / 3);
        ctx.fillText(name, 0, 0); ctx.restore();
      }
    } else {
      ctx.fillStyle = "#333"; ctx.textAlign = "center"; ctx.textBaseline = "top";
      ctx.fillText("layers 0\u2013" + (n - 1) + " (hover for names)", left + plotW / 2, top + H + 8);
    }
    var legend = el("p", "sub", null, body);
    series.forEach(function (s) {
      var sw = el("span", "sw", "\u00a0", legend); sw.style.background = s.color;
      el("span", null, " " + s.label + "  ", legend);
    });
    cv.addEventListener("mousemove", function (ev) {
      var rect = cv.getBoundingClientRect();
      var i = Math.floor((ev.clientX - rect.left - left) / bw);
      if (i < 0 || i >= n) { hideTip(); return; }
      var lines = [labels[i]];
      series.forEach(function (s) { lines.push(s.label + ": " + fmt(s.values[i])); });
      if (o.nonfinite && o.nonfinite[i]) lines.push("non-finite records: " + o.nonfinite[i]);
      showTip(ev, lines.join("\n"));
    });
    cv.addEventListener("mouseleave", hideTip);
    status.plots[id] = { kind: "bars", points: drawn, canvas: true };
  }

  /* ---- events ---- */
  function eventsView(parent, run, rid) {
    var c = el("div", "card", null, parent);
    c.id = rid + "-events";
    el("h3", null, "Events (" + run.events_total + ")", c);
    if (!run.events.length) { el("p", "empty", "no events recorded", c); return; }
    if (run.events_total > run.events.length) el("p", "sub", "showing the first " + run.events.length + " of " + run.events_total, c);
    var head = el("div", "evrow evhead", null, c);
    ["", "step", "rule", "value", "baseline", "value/baseline", "action"].forEach(function (h) { el("span", null, h, head); });
    run.events.forEach(function (ev, k) {
      var det = el("details", "event", null, c);
      var sum = el("summary", "evrow", null, det);
      el("span", "mk", null, sum);
      el("span", null, fmt(ev.step), sum);
      el("span", "rule", ev.rule, sum);
      el("span", null, fmt(ev.value), sum);
      el("span", null, fmt(ev.baseline), sum);
      var ratio = typeof ev.value === "number" && typeof ev.baseline === "number" && ev.baseline > 0 ? ev.value / ev.baseline : null;
      el("span", null, ratio === null ? "\u2013" : fmt(ratio) + "\u00d7", sum);
      el("span", null, ev.action, sum);
      var body = el("div", "evbody", null, det);
      if (ev.message) el("p", null, ev.message, body);
      var dl = el("dl", null, null, body);
      [["rule", ev.rule], ["value", fmt(ev.value)], ["baseline", fmt(ev.baseline)], ["action", ev.action],
       ["first non-finite layer", ev.first_nonfinite_layer || "\u2013"], ["flight-recorder window", ev.window ? ev.window + " (" + ev.window_status + ")" : "none"]]
        .forEach(function (p) { el("dt", null, p[0], dl); el("dd", null, p[1], dl); });
      if (ev.top_layers.length) {
        el("h4", null, "Top layers", body);
        var tbl = el("table", null, null, body), tr = el("tr", null, null, el("thead", null, null, tbl));
        ["layer", "norm", "baseline", "ratio"].forEach(function (h) { el("th", null, h, tr); });
        var tb = el("tbody", null, null, tbl);
        ev.top_layers.forEach(function (t) {
          var r = el("tr", null, null, tb);
          el("td", "name", t.layer, r); el("td", null, fmt(t.norm), r); el("td", null, fmt(t.baseline), r);
          el("td", null, t.ratio === null ? "\u2013" : fmt(t.ratio) + "\u00d7", r);
        });
      }
      if (ev.window_heatmap) {
        el("h4", null, "Flight-recorder window: per-layer gradient norm around the event", body);
        var wb = el("div", "plot", null, body);
        var wid = rid + "-ev" + k + "-window";
        wb.setAttribute("data-plot", wid);
        wb.setAttribute("data-lazy", "1");
        det.addEventListener("toggle", function () {
          if (det.open && !wb.hasChildNodes()) heatmap(wb, wid, ev.window_heatmap, "gradient norm");
        });
      }
    });
  }

  function summaryCards(parent, s) {
    var g = el("div", "stats", null, parent);
    [["steps", fmt(s.steps)], ["step range", s.first_step === null ? "\u2013" : s.first_step + "\u2013" + s.last_step],
     ["clip rate", pct(s.clip_rate)], ["clipped", fmt(s.clipped)], ["skipped", fmt(s.skipped)], ["non-finite", fmt(s.nonfinite)],
     ["events", fmt(s.events)], ["layers", fmt(s.layers)], ["median norm", fmt(s.median_norm)], ["max norm", fmt(s.max_norm)],
     ["final loss", fmt(s.final_loss)]].forEach(function (p) {
      var b = el("div", "stat", null, g);
      el("div", "k", p[0], b); el("div", "v", p[1], b);
    });
  }

  function runSection(run, i) {
    var rid = "run" + i;
    var sec = el("section", "run", null, root);
    sec.id = rid;
    var h = el("h2", null, null, sec);
    el("span", "runname", run.name, h);
    el("p", "sub path", run.path, sec);
    summaryCards(sec, run.summary);
    var notes = run.notes.concat(run.meta.notes);
    if (notes.length) {
      var nb = el("div", "notes", null, sec);
      el("strong", null, "Notes", nb);
      var ul = el("ul", null, null, nb);
      notes.forEach(function (n) { el("li", null, n, ul); });
    }
    var nv = run.norm;
    var body = card(sec, rid + "-norm", "Global gradient norm",
      nv ? "pre-clip total norm (log axis) with the clip threshold, clipped/skipped/non-finite steps marked, loss on the right axis; " +
        (nv.shown < nv.n ? nv.shown + " of " + nv.n + " steps shown (min and max of every bucket kept)" : "all " + nv.n + " steps") +
        ". Drag to zoom, double-click to reset." : null);
    if (nv) {
      linePlot(body, rid + "-norm", nv.x, [
        { label: "total norm", values: nv.norm, color: "#2563eb" },
        { label: "after clip", values: nv.after, color: "#93c5fd" },
        { label: "threshold", values: nv.threshold, color: "#111827", dash: [6, 4], spanGaps: true, reference: true },
        { label: "loss", values: nv.loss, color: "#9ca3af", scale: "loss", reference: true },
        { label: "clipped", values: nv.clipped, color: "#f59e0b", marker: true, size: 5 },
        { label: "skipped", values: nv.skipped, color: "#dc2626", marker: true, size: 9 },
        { label: "non-finite", values: nv.nonfinite, color: "#e11d48", marker: true, size: 11 },
      ], { ylabel: "gradient norm", second: { scale: "loss", label: "loss", log: nv.loss_log } });
    } else noData(body, rid + "-norm", "no step records yet");

    var rv = run.rate;
    body = card(sec, rid + "-rate", "Clip rate", rv ? "fraction of steps clipped and skipped, rolling over " + rv.window + " steps" : null);
    if (rv) linePlot(body, rid + "-rate", rv.x, [
      { label: "clip rate", values: rv.clip, color: "#f59e0b" },
      { label: "skip rate", values: rv.skip, color: "#dc2626" },
    ], { log: false, rate: true, ylabel: "rate", height: 220 });
    else noData(body, rid + "-rate", "no step records yet");

    body = card(sec, rid + "-heatmap", "Layer \u00d7 step gradient norm",
      run.heatmap ? run.heatmap.rows + " layers \u00d7 " + run.heatmap.cols + " step columns, log colour scale; hover for names and values" : null);
    heatmap(body, rid + "-heatmap", run.heatmap, "gradient norm");

    body = card(sec, rid + "-flow", "Gradient flow", "mean and max gradient norm per layer over the run (log axis); a red tick marks layers with non-finite values");
    if (run.flow) bars(body, rid + "-flow", run.flow.layers, [
      { label: "max norm", values: run.flow.max, color: "#67e8f9" },
      { label: "mean norm", values: run.flow.mean, color: "#1d4ed8" },
    ], { nonfinite: run.flow.nonfinite });
    else noData(body, rid + "-flow", "no per-layer records");

    var ur = run.ratio;
    body = card(sec, rid + "-ratio", "Update-to-weight ratio", "|lr\u00b7update| / |w| across layers (min, median, max of per-layer geometric means per column), reference 1e-3");
    if (ur) {
      var ref = ur.x.map(function () { return ur.reference; });
      linePlot(body, rid + "-ratio", ur.x, [
        { label: "max", values: ur.max, color: "#fca5a5" },
        { label: "median", values: ur.median, color: "#7c3aed", width: 2 },
        { label: "min", values: ur.min, color: "#93c5fd" },
        { label: "1e-3", values: ref, color: "#111827", dash: [6, 4], reference: true },
      ], { ylabel: "update / weight", height: 240 });
      body = card(sec, rid + "-ratio-layers", "Update-to-weight ratio per layer", "geometric mean over the run; layers far below the 1e-3 line barely learn");
      bars(body, rid + "-ratio-layers", ur.layers, [{ label: "update/weight", values: ur.per_layer, color: "#7c3aed" }], { ref: ur.reference });
    } else noData(body, rid + "-ratio", "no update-ratio records");

    eventsView(sec, run, rid);

    var det = el("details", "card meta", null, sec);
    el("summary", null, "Configuration and versions", det);
    if (run.meta.started) el("p", null, "started " + run.meta.started, det);
    el("pre", null, run.meta.config, det);
    el("pre", null, run.meta.versions, det);
  }

  function compareSection(cmp) {
    var sec = el("section", "run compare", null, root);
    sec.id = "compare";
    el("h2", null, "Comparison", sec);
    var tbl = el("table", "cmp", null, sec), tr = el("tr", null, null, el("thead", null, null, tbl));
    ["run", "steps", "clip rate", "skipped", "non-finite", "median norm", "max norm", "final loss", "events"].forEach(function (h) { el("th", null, h, tr); });
    var tb = el("tbody", null, null, tbl);
    D.runs.forEach(function (r) {
      var s = r.summary, row = el("tr", null, null, tb);
      el("td", "name", r.name, row);
      [fmt(s.steps), pct(s.clip_rate), fmt(s.skipped), fmt(s.nonfinite), fmt(s.median_norm), fmt(s.max_norm), fmt(s.final_loss), fmt(s.events)]
        .forEach(function (v) { el("td", null, v, row); });
    });
    var body = card(sec, "compare-norm", "Global gradient norm, all runs", "pre-clip total norm on a log axis; clipped runs keep it bounded, unclipped ones explode");
    linePlot(body, "compare-norm", cmp.x, cmp.norm.map(function (v, k) {
      return { label: D.runs[k].name, values: v, spanGaps: true, color: COLORS[k % COLORS.length] };
    }), { ylabel: "gradient norm" });
    body = card(sec, "compare-loss", "Loss, all runs", null);
    linePlot(body, "compare-loss", cmp.x, cmp.loss.map(function (v, k) {
      return { label: D.runs[k].name, values: v, spanGaps: true, color: COLORS[k % COLORS.length] };
    }), { ylabel: "loss", log: cmp.loss_log, empty: "no loss recorded" });
  }

  try {
    if (D.failed.length) {
      var fb = el("div", "notes error", null, root);
      el("strong", null, "Runs that could not be read", fb);
      var ul = el("ul", null, null, fb);
      D.failed.forEach(function (f) { el("li", null, f, ul); });
    }
    if (!D.runs.length) el("p", "empty", "No run could be read; nothing to show.", root);
    if (D.compare) compareSection(D.compare);
    D.runs.forEach(runSection);
  } catch (e) {
    status.errors.push(String(e && e.stack || e));
    el("p", "notes error", "The report could not be drawn: " + e, root);
    throw e;
  }
  status.ready = true;
})();

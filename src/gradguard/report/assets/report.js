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
  // 12 colours that stay apart from each other (Tableau 10 and two dark ones); past 12 runs
  // in one comparison the colours repeat with a dash pattern
  var COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
    "#17becf", "#bcbd22", "#7f7f7f", "#393b79", "#637939"];
  var DASHES = [null, [7, 3], [2, 2], [9, 3, 2, 3]];
  var FONT = "11px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
  var LABEL_FONT = "bold 12px system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif";
  // runs drawn on load; with more, each run's section opens (and draws) on a click
  var OPEN_RUNS = 6;

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
    if (Number.isInteger(v) && a < 1e6) return v.toLocaleString("en-US");
    if (a >= 1e5 || a < 1e-3) return v.toExponential(2);
    return String(Number(v.toPrecision(4)));
  }

  /* Axis tick labels: short whatever the magnitude (1e38, 2.5e-7, 1500, 0.25), never
   * digit-grouped (a 1e12 loss is "1e12", not "1,000,000,000,000" cut by the axis). */
  function tick(v) {
    if (v === null || v === undefined || !isFinite(v)) return "";
    if (v === 0) return "0";
    var a = Math.abs(v);
    if (a >= 1e4 || a < 1e-3) {
      var e = Math.floor(Math.log10(a) + 1e-9), m = Number((v / Math.pow(10, e)).toPrecision(2));
      if (Math.abs(m) >= 10) { m = m / 10; e += 1; }
      return String(m) + "e" + e;
    }
    return String(Number(v.toPrecision(3)));
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
  var measureCtx = document.createElement("canvas").getContext("2d");
  function textWidth(text, font) {
    measureCtx.font = font || FONT;
    return measureCtx.measureText(text).width;
  }

  // finite positive (log) or finite (linear) extent of the series drawn on one scale
  function extent(series, scale, log) {
    var lo = Infinity, hi = -Infinity;
    series.forEach(function (s) {
      if ((s.scale || "y") !== scale || s.top) return;
      for (var i = 0; i < s.values.length; i++) {
        var v = s.values[i];
        if (v === null || !isFinite(v) || (log && !(v > 0))) continue;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
    });
    return lo <= hi ? [lo, hi] : null;
  }

  /* One y scale: a log scale gets whole decades as its range and a tick every k decades (k
   * chosen so labels never crowd, whatever the span: 1e-3 .. 3e38 too); a linear scale keeps
   * uPlot's ticks. Either way labels come from tick() and the axis is as wide as its longest
   * label, so no label is cut and none covers the axis title. Series with "top" (markers of
   * non-finite steps) are drawn at the top edge. */
  function yScale(series, scale, log, rate) {
    var ext = extent(series, scale, log);
    var sc = {}, info = { log: log, top: null };
    if (rate) {
      sc.range = function (u, mn, mx) { return [0, Math.max(0.05, (mx || 0) * 1.05)]; };
    } else if (log) {
      var e0 = ext ? Math.floor(Math.log10(ext[0]) + 1e-9) : 0;
      var e1 = ext ? Math.ceil(Math.log10(ext[1]) - 1e-9) : 1;
      if (e1 <= e0) e1 = e0 + 1;
      e0 = Math.max(e0, -320); e1 = Math.min(e1, 308);
      var pad = Math.min(0.3, Math.max(0.12, 0.03 * (e1 - e0)));
      info.e0 = e0; info.e1 = e1;
      info.top = Math.pow(10, Math.min(308, e1 + pad * 0.5));
      var lo = Math.pow(10, e0), hi = Math.pow(10, Math.min(308.2, e1 + pad));
      sc = { distr: 3, log: 10, range: function () { return [lo, hi]; } };
    } else if (ext) {
      var span = ext[1] - ext[0] || Math.abs(ext[1]) || 1;
      info.top = ext[1] + 0.06 * span;
      var l0 = ext[0] - 0.04 * span, l1 = ext[1] + 0.1 * span;
      sc.range = function () { return [l0, l1]; };
    } else {  // nothing finite on this axis (a loss that is NaN throughout): marks only
      info.top = 0.9;
      sc.range = function () { return [0, 1]; };
    }
    return { scale: sc, info: info };
  }

  // steps are whole numbers: x ticks at 1, 2, 5 x 10^k, never 2.5
  var STEP_INCRS = [];
  for (var z = 0; z <= 15; z++) [1, 2, 5].forEach(function (m) { STEP_INCRS.push(m * Math.pow(10, z)); });
  var LOG_INCRS = [];
  for (var q = -320; q <= 308; q++) LOG_INCRS.push(Math.pow(10, q));

  function logSplits(info) {
    return function (u) {
      var room = Math.max(2, Math.floor(u.bbox.height / (window.devicePixelRatio || 1) / 26));
      var n = info.e1 - info.e0, step = Math.max(1, Math.ceil(n / room)), out = [];
      // ticks at multiples of the step (1e0, 1e5, 1e10, ...), so labels read as a sequence
      for (var k = Math.ceil(info.e0 / step) * step; k <= info.e1; k += step) out.push(Math.pow(10, k));
      return out;
    };
  }

  function axisSize(record) {
    return function (u, values, axisIdx, cycleNum) {
      var axis = u.axes[axisIdx];
      if (cycleNum > 1) return axis._size;
      var longest = 0;
      (values || []).forEach(function (v) { if (v) longest = Math.max(longest, textWidth(v)); });
      record.width = Math.ceil(longest);
      record.size = Math.ceil(axis.ticks.size + axis.gap + longest + 6);
      return record.size;
    };
  }

  function linePlot(body, id, x, series, o) {
    o = o || {};
    var total = 0;
    series.forEach(function (s) { if (!s.marker && !s.reference) total += finiteCount(s.values); });
    if (!x.length || total === 0) { noData(body, id, o.empty || "no data recorded"); return null; }
    var record = { kind: "uplot", points: total, canvas: true, axes: [], lines: [] };
    var scales = { x: { time: false } };
    var xrec = { scale: "x", label: o.xlabel || "step", log: false, ticks: [] };
    record.axes.push(xrec);
    var axes = [{ label: o.xlabel || "step", font: FONT, labelFont: LABEL_FONT, labelSize: 20, incrs: STEP_INCRS,
                  values: function (u, splits) { xrec.ticks = splits.map(tick); return xrec.ticks; } }];
    var yspecs = [{ scale: "y", label: o.ylabel || "", log: o.log !== false, rate: !!o.rate, side: 3 }];
    if (o.second) yspecs.push({ scale: o.second.scale, label: o.second.label, log: !!o.second.log, side: 1 });
    var infos = {};
    yspecs.forEach(function (ys) {
      var made = yScale(series, ys.scale, ys.log, ys.rate);
      scales[ys.scale] = made.scale;
      infos[ys.scale] = made.info;
      var rec = { scale: ys.scale, label: ys.label, log: ys.log, ticks: [] };
      record.axes.push(rec);
      var ax = {
        scale: ys.scale, side: ys.side, label: ys.label, font: FONT, labelFont: LABEL_FONT,
        labelSize: 20, labelGap: 2, size: axisSize(rec),
        values: function (u, splits) { rec.ticks = splits.map(tick); return rec.ticks; },
      };
      if (ys.side === 1) ax.grid = { show: false };
      if (ys.log) {
        // uPlot's own log increments stop near 1e16: past that span the axis got no ticks at
        // all; every power of ten up to float64's range, and our own splits and filter
        ax.incrs = LOG_INCRS;
        ax.splits = logSplits(made.info);
        ax.filter = function (u, splits) { return splits; };
      }
      axes.push(ax);
    });
    var useries = [{ label: o.xlabel || "step" }];
    var data = [x];
    series.forEach(function (s, k) {
      var color = s.color || COLORS[k % COLORS.length];
      var u = { label: s.label, stroke: color, width: s.width || 1.25, scale: s.scale || "y", spanGaps: !!s.spanGaps };
      if (s.dash) u.dash = s.dash;
      if (!s.marker && !s.reference) record.lines.push({ label: s.label, color: color, dash: s.dash ? s.dash.join(",") : "" });
      var values = s.values;
      if (s.top) {  // a marker of non-finite steps: at the top edge of its axis
        var top = infos[s.scale || "y"] ? infos[s.scale || "y"].top : null;
        values = s.values.map(function (v) { return v === null ? null : top; });
      }
      if (s.marker) {
        u.paths = function () { return null; };
        u.points = { show: true, size: s.size || 7, stroke: color, fill: s.hollow ? "#fff" : color, width: s.hollow ? 2 : 1 };
        u.value = s.top ? function (uu, v) { return v === null ? "\u2013" : "non-finite"; } : undefined;
      } else {
        u.points = { show: false };
      }
      u.value = u.value || function (uu, v) { return v === null || v === undefined ? "\u2013" : fmt(v); };
      useries.push(u);
      data.push(values);
    });
    var cap = el("p", "axes-text", null, null);
    function caption() {  // the axes in words, for screen readers and the browser tests
      cap.textContent = record.axes.map(function (a) {
        return (a.scale === "x" ? "x" : a.scale === "y" ? "left" : "right") + " axis " + (a.label || "") +
          (a.log ? " (log)" : "") + ": " + a.ticks.filter(function (t) { return t; }).join(", ");
      }).join("; ");
    }
    var opts = {
      width: widthOf(body), height: o.height || 300, scales: scales, axes: axes, series: useries,
      cursor: { drag: { x: true, y: false } }, legend: { live: true }, hooks: { draw: [caption] },
    };
    status.plots[id] = record;
    var u = new uPlot(opts, data, body);
    body.appendChild(cap);
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
  function ratioText(ev) {
    var r = typeof ev.value === "number" && typeof ev.baseline === "number" && ev.baseline > 0 ? ev.value / ev.baseline : null;
    return r === null ? "\u2013" : fmt(r) + "\u00d7";
  }

  function topLayers(body, ev) {
    if (!ev.top_layers.length) return;
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

  function eventDetails(body, ev) {
    if (ev.message) el("p", null, ev.message, body);
    var dl = el("dl", null, null, body);
    [["rule", ev.rule], ["value", fmt(ev.value)], ["baseline", fmt(ev.baseline)], ["action", ev.action],
     ["first non-finite layer", ev.first_nonfinite_layer || "\u2013"], ["flight-recorder window", ev.window ? ev.window + " (" + ev.window_status + ")" : "none"]]
      .forEach(function (p) { el("dt", null, p[0], dl); el("dd", null, p[1], dl); });
    topLayers(body, ev);
  }

  function windowPlot(body, wid, ev, lazy, det) {
    if (!ev.window_heatmap) return;
    el("h4", null, "Flight-recorder window: per-layer gradient norm around the event", body);
    var wb = el("div", "plot", null, body);
    wb.setAttribute("data-plot", wid);
    if (!lazy) { heatmap(wb, wid, ev.window_heatmap, "gradient norm"); return; }
    wb.setAttribute("data-lazy", "1");
    det.addEventListener("toggle", function () {
      if (det.open && !wb.hasChildNodes()) heatmap(wb, wid, ev.window_heatmap, "gradient norm");
    });
  }

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
      el("span", null, ratioText(ev), sum);
      el("span", null, ev.action, sum);
      var body = el("div", "evbody", null, det);
      eventDetails(body, ev);
      windowPlot(body, rid + "-ev" + k + "-window", ev, true, det);
    });
  }

  /* The first incident of a run, open at the top of its section: which layers, and the
   * flight-recorder window around it (a run that exploded before its first per-layer record
   * has no other per-layer view). */
  function incidentCard(parent, run, rid) {
    if (run.incident === null || run.incident === undefined) return;
    var ev = run.events[run.incident];
    if (!ev) return;
    var c = el("div", "card incident", null, parent);
    c.id = rid + "-incident";
    el("h3", null, "First incident: step " + fmt(ev.step) + " \u00b7 " + ev.rule + " \u00b7 " + ev.action, c);
    el("p", "sub", "value " + fmt(ev.value) + ", baseline " + fmt(ev.baseline) + " (" + ratioText(ev) + ")" +
      (run.events_total > 1 ? "; " + (run.events_total - 1) + " more in Events below" : ""), c);
    eventDetails(c, ev);
    windowPlot(c, rid + "-incident-window", ev, false, null);
  }

  function summaryCards(parent, s) {
    var g = el("div", "stats", null, parent);
    [["steps", fmt(s.steps)], ["step range", s.first_step === null ? "\u2013" : s.first_step + "\u2013" + s.last_step],
     ["clip rate", pct(s.clip_rate)], ["clipped", fmt(s.clipped)], ["skipped", fmt(s.skipped)], ["non-finite", fmt(s.nonfinite)],
     ["events", fmt(s.events)], ["layers", fmt(s.layers)], ["median norm", fmt(s.median_norm)], ["max norm", fmt(s.max_norm)],
     ["last-step loss", fmt(s.final_loss)]].forEach(function (p) {
      var b = el("div", "stat", null, g);
      el("div", "k", p[0], b); el("div", "v", p[1], b);
    });
  }

  function resultBox(parent, res) {
    if (!res) return;
    var b = el("div", "result" + (res.seed0_verdict ? " flagged" : ""), null, parent);
    el("strong", null, "Demo result (" + res.metric + "): ", b);
    el("span", null, res.result + " \u2014 " + res.summary + " over " + res.seeds + " seed" + (res.seeds === 1 ? "" : "s") +
      (res.verdict ? " [" + res.verdict + "]" : "") + "; this run is seed 0: " + res.seed0 +
      (res.seed0_verdict ? " (" + res.seed0_verdict + ")" : ""), b);
  }

  var LR_COLORS = ["#059669", "#7c3aed", "#d97706", "#0891b2", "#be185d", "#4d7c0f"];

  function runBody(sec, run, rid) {
    el("p", "sub path", run.path, sec);
    resultBox(sec, run.result);
    summaryCards(sec, run.summary);
    var notes = run.notes.concat(run.meta.notes);
    if (notes.length) {
      var nb = el("div", "notes", null, sec);
      el("strong", null, "Notes", nb);
      var ul = el("ul", null, null, nb);
      notes.forEach(function (n) { el("li", null, n, ul); });
    }
    incidentCard(sec, run, rid);
    var nv = run.norm;
    var body = card(sec, rid + "-norm", "Global gradient norm",
      nv ? "pre-clip total norm (log axis) with the clip threshold, clipped/skipped/non-finite steps marked (non-finite at the top), loss on the right axis" +
        (nv.loss_log ? " (log)" : "") + "; " +
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
        { label: "non-finite norm", values: nv.nonfinite, color: "#e11d48", marker: true, size: 11, top: true },
        { label: "non-finite loss", values: nv.loss_nonfinite || [], color: "#6b7280", marker: true, size: 9, top: true, scale: "loss", hollow: true },
      ], { ylabel: "gradient norm", second: { scale: "loss", label: "loss", log: nv.loss_log } });
    } else noData(body, rid + "-norm", "no step records yet");

    var lv = run.lr;
    if (lv) {  // the learning rate of every param group, under the norm it scales
      body = card(sec, rid + "-lr", "Learning rate",
        (lv.groups > 1 ? lv.groups + " param groups" : "the first param group") + (lv.log ? " (log axis)" : "") +
        (lv.constant ? "; constant" : "") + "; last step " + lv.last.map(fmt).join(", "));
      linePlot(body, rid + "-lr", lv.x, lv.series.map(function (vals, g) {
        return { label: lv.labels[g], values: vals, color: LR_COLORS[g % LR_COLORS.length] };
      }), { log: lv.log, ylabel: "learning rate", height: 200 });
    }

    var rv = run.rate;
    body = card(sec, rid + "-rate", "Clip rate", rv ? "fraction of steps clipped and skipped, rolling over " + rv.window + " steps" : null);
    if (rv) linePlot(body, rid + "-rate", rv.x, [
      { label: "clip rate", values: rv.clip, color: "#f59e0b" },
      { label: "skip rate", values: rv.skip, color: "#dc2626" },
    ], { log: false, rate: true, ylabel: "rate", height: 220 });
    else noData(body, rid + "-rate", "no step records yet");

    var noLayers = run.incident !== null && run.incident !== undefined ? "no per-layer records (the first incident, above, shows the layers)" : "no per-layer records";
    body = card(sec, rid + "-heatmap", "Layer \u00d7 step gradient norm",
      run.heatmap ? run.heatmap.rows + " layers \u00d7 " + run.heatmap.cols + " step columns, log colour scale; hover for names and values" : null);
    if (run.heatmap) heatmap(body, rid + "-heatmap", run.heatmap, "gradient norm");
    else noData(body, rid + "-heatmap", noLayers);

    body = card(sec, rid + "-flow", "Gradient flow", "mean and max gradient norm per layer over the run (log axis); a red tick marks layers with non-finite values");
    if (run.flow) bars(body, rid + "-flow", run.flow.layers, [
      { label: "max norm", values: run.flow.max, color: "#67e8f9" },
      { label: "mean norm", values: run.flow.mean, color: "#1d4ed8" },
    ], { nonfinite: run.flow.nonfinite, empty: noLayers });
    else noData(body, rid + "-flow", noLayers);

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

  function flagOf(run) {
    var s = run.summary, parts = [];
    if (run.result && run.result.seed0_verdict) parts.push(run.result.seed0_verdict);
    if (s.nonfinite) parts.push(s.nonfinite + " non-finite");
    if (s.skipped) parts.push(s.skipped + " skipped");
    return parts.join(", ");
  }

  /* One run: drawn at once when the page holds few runs; else a closed section whose
   * summary line says how the run went, drawn when opened. */
  function runSection(parent, run, i, collapsed) {
    var rid = "run" + i;
    if (!collapsed) {
      var sec = el("section", "run", null, parent);
      sec.id = rid;
      var h = el("h2", null, null, sec);
      el("span", "runname", run.name, h);
      runBody(sec, run, rid);
      return;
    }
    var det = el("details", "run", null, parent);
    det.id = rid;
    var sum = el("summary", null, null, det);
    el("span", "runname", run.name, sum);
    var s = run.summary, flag = flagOf(run);
    el("span", "sub", " \u00b7 " + fmt(s.steps) + " steps, clip rate " + pct(s.clip_rate) + ", max norm " + fmt(s.max_norm) +
      (run.result ? ", " + (run.result.metric === "solved" ? run.result.seed0 : run.result.metric + " " + run.result.seed0) : ""), sum);
    if (flag) el("span", "flag", flag, sum);
    var inner = el("div", "runbody", null, det);
    det.addEventListener("toggle", function () {
      if (det.open && !inner.hasChildNodes()) runBody(inner, run, rid);
    });
  }

  function shortName(name, group) {
    var k = name.indexOf("/");
    return group !== "runs" && k > 0 ? name.slice(k + 1) : name;
  }

  function compareCharts(sec, g, gi) {
    var cmp = g.compare;
    var runs = g.runs.map(function (i) { return D.runs[i]; });
    function lines(key, nfKey) {
      var out = runs.map(function (r, k) {
        return { label: shortName(r.name, g.title), values: cmp[key][k], spanGaps: true,
                 color: COLORS[k % COLORS.length], dash: DASHES[Math.floor(k / COLORS.length) % DASHES.length] || undefined };
      });
      runs.forEach(function (r, k) {  // non-finite steps: a mark in the run's colour at the top
        var idx = cmp[nfKey][k];
        if (!idx.length) return;
        var v = cmp.x.map(function () { return null; });
        idx.forEach(function (p) { v[p] = 1; });
        out.push({ label: shortName(r.name, g.title) + " non-finite", values: v, marker: true, top: true,
                   size: 10, color: COLORS[k % COLORS.length], reference: true });
      });
      return out;
    }
    var body = card(sec, "exp" + gi + "-norm", "Global gradient norm: " + g.title,
      "pre-clip total norm per run (log axis); steps whose norm is not finite are marked at the top in the run's colour");
    linePlot(body, "exp" + gi + "-norm", cmp.x, lines("norm", "norm_nonfinite"), { ylabel: "gradient norm", height: 320 });
    body = card(sec, "exp" + gi + "-loss", "Loss: " + g.title,
      "training loss per step" + (cmp.loss_log ? " (log axis: it spans decades)" : "") + "; non-finite losses are marked at the top");
    linePlot(body, "exp" + gi + "-loss", cmp.x, lines("loss", "loss_nonfinite"),
      { ylabel: "loss", log: cmp.loss_log, empty: "no loss recorded", height: 280 });
  }

  function groupTable(sec, g) {
    var runs = g.runs.map(function (i) { return D.runs[i]; });
    var res = runs.filter(function (r) { return r.result; })[0];
    var tbl = el("table", "cmp", null, sec), tr = el("tr", null, null, el("thead", null, null, tbl));
    var heads = ["run"];
    if (res) heads.push(res.result.metric + " (" + res.result.summary.replace("mean \u00b1 sample sd", "mean \u00b1 sd") + ", " + res.result.seeds + " seeds)", "flag", "seed 0 (this run)");
    heads = heads.concat(["steps", "clip rate", "skipped", "non-finite", "median norm", "max norm", "last-step loss", "events", "first incident"]);
    heads.forEach(function (h) { el("th", null, h, tr); });
    var tb = el("tbody", null, null, tbl);
    g.runs.forEach(function (i) {
      var r = D.runs[i], s = r.summary, row = el("tr", null, null, tb);
      var td = el("td", "name", null, row), a = el("a", null, r.name, td);
      a.href = "#run" + i;
      a.addEventListener("click", function () { var d = document.getElementById("run" + i); if (d && d.tagName === "DETAILS") d.open = true; });
      if (res) {
        var rr = r.result || {};
        el("td", "num", rr.result || "\u2013", row);
        el("td", rr.verdict ? "flag" : null, rr.verdict || "", row);
        el("td", "num", rr.seed0 === undefined ? "\u2013" : rr.seed0, row);
      }
      var inc = r.incident === null || r.incident === undefined ? null : r.events[r.incident];
      [fmt(s.steps), pct(s.clip_rate), fmt(s.skipped), fmt(s.nonfinite), fmt(s.median_norm), fmt(s.max_norm), fmt(s.final_loss), fmt(s.events),
       inc ? "step " + fmt(inc.step) + ": " + inc.rule : "\u2013"]
        .forEach(function (v) { el("td", "num", v, row); });
    });
  }

  function groupSection(g, gi, collapsed) {
    var sec = el("section", "group", null, root);
    sec.id = "exp" + gi;
    el("h2", null, (D.groups.length > 1 || g.title !== "runs" ? g.title : "Runs") + " (" + g.runs.length + " run" + (g.runs.length === 1 ? "" : "s") + ")", sec);
    if (g.runs.length > 1 || D.runs[g.runs[0]].result) groupTable(sec, g);
    if (g.compare) compareCharts(sec, g, gi);
    g.runs.forEach(function (i) { runSection(sec, D.runs[i], i, collapsed); });
  }

  try {
    if (D.failed.length) {
      var fb = el("div", "notes error", null, root);
      el("strong", null, "Runs that could not be read", fb);
      var ul = el("ul", null, null, fb);
      D.failed.forEach(function (f) { el("li", null, f, ul); });
    }
    if (!D.runs.length) el("p", "empty", "No run could be read; nothing to show.", root);
    var collapsed = D.runs.length > OPEN_RUNS;
    status.collapsed = collapsed;
    D.groups.forEach(function (g, gi) { groupSection(g, gi, collapsed); });
  } catch (e) {
    status.errors.push(String(e && e.stack || e));
    el("p", "notes error", "The report could not be drawn: " + e, root);
    throw e;
  }
  status.ready = true;
})();

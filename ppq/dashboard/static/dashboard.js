// ppq dashboard: keeps the live pages current (a poll of their JSON every second), shows the
// "connection lost" banner while no master answers, and draws the charts as inline SVG.
// No library, nothing fetched from elsewhere.
"use strict";
(function () {
  var POLL_MS = 1000;
  var WINDOW_S = 600;
  var SVG = "http://www.w3.org/2000/svg";

  function banner(lost) {
    var el = document.getElementById("conn-lost");
    if (el) { el.hidden = !lost; }
  }

  function el(name, attrs, text) {
    var node = document.createElementNS(SVG, name);
    Object.keys(attrs).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function nice(max) {
    if (!(max > 0)) { return 1; }
    var step = Math.pow(10, Math.floor(Math.log10(max)));
    var best = [1, 2, 5, 10].map(function (m) { return m * step; }).find(function (v) { return v >= max; });
    return best || 10 * step;
  }

  function label(v) {
    if (v >= 1000) { return (v / 1000).toFixed(1) + "k"; }
    if (v >= 10 || v === 0) { return v.toFixed(0); }
    if (v >= 1) { return v.toFixed(1); }
    return v.toPrecision(2);
  }

  // series: [{key, color}], points: [{t, key: value}]
  function chart(id, points, series) {
    var svg = document.getElementById(id);
    if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var W = 600, H = 160, L = 38, B = 14, T = 6;
    var now = Date.now() / 1000, start = now - WINDOW_S;
    var max = 0;
    points.forEach(function (p) {
      series.forEach(function (s) { if (p[s.key] !== null && p[s.key] > max) { max = p[s.key]; } });
    });
    var top = nice(max);
    var x = function (t) { return L + (W - L) * (t - start) / WINDOW_S; };
    var y = function (v) { return T + (H - T - B) * (1 - v / top); };
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("line", {x1: L, x2: W, y1: y(top * f), y2: y(top * f), "class": "axis"}));
      svg.appendChild(el("text", {x: L - 4, y: y(top * f) + 3, "text-anchor": "end"}, label(top * f)));
    });
    [10, 5, 0].forEach(function (m) {
      svg.appendChild(el("text", {x: x(now - m * 60), y: H - 2, "text-anchor": m ? "middle" : "end"},
                          m ? "-" + m + " min" : "now"));
    });
    series.forEach(function (s) {
      var path = "", pen = "M";
      points.forEach(function (p) {
        if (p.t < start || p[s.key] === null || p[s.key] === undefined) { pen = "M"; return; }
        path += pen + x(p.t).toFixed(1) + "," + y(p[s.key]).toFixed(1) + " ";
        pen = "L";
      });
      if (path) {
        svg.appendChild(el("path", {d: path, fill: "none", stroke: s.color, "stroke-width": 1.6,
                                    "vector-effect": "non-scaling-stroke"}));
      }
    });
    if (!points.length) {
      svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no samples yet"));
    }
  }

  function draw(series) {
    chart("chart-throughput", series, [
      {key: "pushed", color: "#98a2b3"}, {key: "done", color: "#067647"}, {key: "errors", color: "#b42318"}]);
    chart("chart-latency", series, [{key: "run_time", color: "#2d5fd3"}]);
  }

  function poll(url) {
    var timer = null;
    function again() { timer = window.setTimeout(tick, POLL_MS); }
    function tick() {
      fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}, cache: "no-store"})
        .then(function (response) {
          if (response.status === 401) { window.location.reload(); return null; }
          return response.json().catch(function () { return {ok: false}; });
        })
        .then(function (data) {
          if (data === null) { return; }
          banner(!data.ok);
          var live = document.getElementById("live");
          if (live && typeof data.html === "string") { live.innerHTML = data.html; }
          if (data.series) { draw(data.series); }
          again();
        })
        .catch(function () { banner(true); again(); });
    }
    tick();
    return function () { if (timer) { window.clearTimeout(timer); } };
  }

  document.addEventListener("DOMContentLoaded", function () {
    var url = document.body.getAttribute("data-live");
    if (url) { poll(url); }
    if (document.getElementById("chart-throughput")) { draw([]); }
  });
}());

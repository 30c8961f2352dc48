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
    document.body.classList.toggle("lost", lost);  // the figures shown are the last read: dimmed
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
    if (v >= 10000) { return (v / 1000).toFixed(0) + "k"; }
    if (v >= 10 || v === 0) { return v.toFixed(0); }
    if (v >= 1) { return v.toFixed(1); }
    return v.toPrecision(2);
  }

  // Draws at the element's own size (text is never stretched). series: [{key, color, scale}],
  // points: [{t, key: value}]; unit: after the top value of the y axis; empty: said with no points.
  function chart(id, points, series, unit, empty) {
    var svg = document.getElementById(id);
    if (!svg) { return; }
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    var W = Math.max(200, Math.round(svg.clientWidth || 600)), H = 170, L = 62, R = 8, B = 18, T = 8;
    svg.setAttribute("viewBox", "0 0 " + W + " " + H);
    var now = Date.now() / 1000, start = now - WINDOW_S;
    var value = function (p, s) {
      var v = p[s.key];
      return v === null || v === undefined || p.t < start ? null : v * (s.scale || 1);
    };
    var max = 0, any = false;
    points.forEach(function (p) {
      series.forEach(function (s) {
        var v = value(p, s);
        if (v !== null) { any = true; if (v > max) { max = v; } }
      });
    });
    var top = nice(max);
    var x = function (t) { return L + (W - L - R) * (t - start) / WINDOW_S; };
    var y = function (v) { return T + (H - T - B) * (1 - v / top); };
    [0, 0.5, 1].forEach(function (f) {
      svg.appendChild(el("line", {x1: L, x2: W - R, y1: y(top * f), y2: y(top * f), "class": "axis"}));
      svg.appendChild(el("text", {x: L - 5, y: y(top * f) + 4, "text-anchor": "end"},
                         label(top * f) + (f === 1 ? " " + unit : "")));
    });
    [10, 5, 0].forEach(function (m) {
      svg.appendChild(el("text", {x: m === 10 ? L : x(now - m * 60), y: H - 4,
                                  "text-anchor": m === 10 ? "start" : m ? "middle" : "end"},
                         m ? "-" + m + " min" : "now"));
    });
    series.forEach(function (s) {
      var path = "", run = [];
      var dots = function () {  // a point with no neighbour is a dot, not an invisible line
        if (run.length === 1) {
          svg.appendChild(el("circle", {cx: run[0][0], cy: run[0][1], r: 2.5, fill: s.color}));
        }
        run = [];
      };
      points.forEach(function (p) {
        var v = value(p, s);
        if (v === null) { dots(); return; }
        run.push([x(p.t).toFixed(1), y(v).toFixed(1)]);
        path += (run.length === 1 ? "M" : "L") + run[run.length - 1].join(",") + " ";
      });
      dots();
      if (path) {
        svg.appendChild(el("path", {d: path, fill: "none", stroke: s.color, "stroke-width": 1.8,
                                    "stroke-linejoin": "round"}));
      }
    });
    if (!any) {
      svg.appendChild(el("text", {x: L + (W - L - R) / 2, y: H / 2, "text-anchor": "middle", "class": "empty"},
                         points.length ? empty : "no samples yet"));
    }
  }

  var last = [];
  function draw(series) {
    last = series;
    chart("chart-throughput", series, [
      {key: "pushed", color: "#667085"}, {key: "done", color: "#067647"}, {key: "errors", color: "#b42318"}],
      "/s", "nothing pushed or run");
    chart("chart-latency", series, [{key: "run_time", color: "#2d5fd3", scale: 1000}], "ms",
          "no task finished while sampled");
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
    if (document.getElementById("chart-throughput")) {
      draw([]);
      var pending = null;
      window.addEventListener("resize", function () {
        if (pending) { window.clearTimeout(pending); }
        pending = window.setTimeout(function () { draw(last); }, 100);
      });
    }
  });
}());

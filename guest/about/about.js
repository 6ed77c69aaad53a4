// Every site's figures, as dom0's guest manager last sent them to this guest (/cgi-bin/status): never made up here.
"use strict";
function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
}
function show(s) {
  const body = document.getElementById("sites");
  const sites = s.sites && typeof s.sites === "object" ? s.sites : null;
  body.textContent = "";
  if (!sites) {
    const row = document.createElement("tr");
    cell(row, "(no figures from the board yet)");
    body.append(row);
    return;
  }
  for (const [name, f] of Object.entries(sites)) {
    const row = document.createElement("tr");
    const link = document.createElement("td");
    const a = document.createElement("a");
    a.textContent = name;
    if (Array.isArray(f.names) && f.names.length) a.href = "//" + f.names[0] + "/";
    link.append(a);
    row.append(link);
    const od = f.on_demand ? ` (on demand, stops after ${f.on_demand.idle} s idle)` : " (always on)";
    cell(row, (f.state || "unknown") + od);
    cell(row, typeof f.woken === "number" ? new Date(f.woken * 1000).toLocaleTimeString() : "–");
    cell(row, typeof f.wake_ms === "number" ? (f.wake_ms / 1000).toFixed(1) + " s" : "–");
    cell(row, typeof f.requests === "number" ? String(f.requests) : "–");
    cell(row, typeof f.wakes_today === "number" ? String(f.wakes_today) : "–");
    body.append(row);
  }
}
function refresh() {
  fetch("/cgi-bin/status", { cache: "no-store" }).then((r) => r.json()).then(show)
    .catch(() => show({}));
}
refresh();
setInterval(refresh, 10000);

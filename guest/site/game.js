// The booth's 2048 (its rules are in rules.js), and a footer saying which guest serves it and for how long.
// No libraries, no external assets: the guest serves this file, rules.js and index.html, and /cgi-bin/status.
// For tests: ?seed=N makes the new tiles repeatable, ?tiles=a,b,… (16 numbers, row by row) sets the first board.
"use strict";

const SIZE = 4;
const $ = (id) => document.getElementById(id);
const board = $("board"), scoreEl = $("score"), bestEl = $("best"), messageEl = $("message"), keepEl = $("keep");
const howto = $("howto");
const params = new URLSearchParams(location.search);
const random = params.has("seed") ? Rules.seeded(Number(params.get("seed"))) : Math.random;

// localStorage can be missing or refuse (private browsing): the game still plays, it only forgets.
const store = {
  get(key) { try { return localStorage.getItem(key); } catch { return null; } },
  set(key, value) { try { localStorage.setItem(key, value); } catch { /* not kept */ } },
};

let grid, score, best = Number(store.get("2048-best")) || 0;
let won = false, keepPlaying = false, over = false;

function tilesParam() {
  const v = (params.get("tiles") || "").split(",").map(Number);
  const ok = v.length === SIZE * SIZE && v.every((n) => n === 0 || (n >= 2 && (n & (n - 1)) === 0));
  return ok ? Array.from({ length: SIZE }, (_, r) => v.slice(r * SIZE, r * SIZE + SIZE)) : null;
}

function render(fresh) {
  board.textContent = "";
  grid.forEach((row, r) => {
    const rowEl = document.createElement("div");
    rowEl.setAttribute("role", "row");
    row.forEach((v, c) => {
      const cell = document.createElement("span");
      cell.setAttribute("role", "gridcell");
      if (v) {
        cell.textContent = v;
        cell.dataset.v = v;
        if (v > 2048) cell.className = "big";
      } else {
        cell.setAttribute("aria-label", "empty");
      }
      if (fresh && fresh[r][c] !== v) cell.classList.add("new");
      rowEl.appendChild(cell);
    });
    board.appendChild(rowEl);
  });
  scoreEl.textContent = score;
  bestEl.textContent = best;
}

function check() {
  if (!won && Rules.hasWon(grid)) {
    won = true;
    messageEl.textContent = "You made 2048! Keep going for a bigger tile, or start again.";
    keepEl.hidden = false;
    keepEl.focus();
  } else if (!Rules.canMove(grid)) {
    over = true;
    messageEl.textContent = `No moves left: game over, with ${score} points. New game?`;
  }
}

function go(direction) {
  if (over || (won && !keepPlaying) || !howto.hidden) return;
  const m = Rules.play(grid, direction, random);
  if (!m.moved) return;
  grid = m.grid;
  score += m.score;
  if (score > best) {
    best = score;
    store.set("2048-best", best);
  }
  render(m.slid);   // the new tile pops
  check();
}

function newGame(start) {
  grid = start || Rules.newGrid(SIZE, random);
  score = 0;
  won = keepPlaying = over = false;
  messageEl.textContent = "";
  keepEl.hidden = true;
  render();
  check();
}

function showHowto(show) {
  howto.hidden = !show;
  if (show) {
    $("howto-ok").focus();
  } else {
    store.set("2048-howto-seen", "1");
    board.focus();
  }
}

const KEYS = { ArrowLeft: "left", ArrowRight: "right", ArrowUp: "up", ArrowDown: "down",
  a: "left", d: "right", w: "up", s: "down" };
document.addEventListener("keydown", (e) => {
  if (e.key === "Escape" && !howto.hidden) return showHowto(false);
  const direction = KEYS[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (!direction || e.ctrlKey || e.altKey || e.metaKey) return;
  e.preventDefault();
  go(direction);
});

// A swipe: where a pointer (finger, pen or mouse) went down on the board and where it came up.
let swipe = null;
board.addEventListener("pointerdown", (e) => {
  swipe = { id: e.pointerId, x: e.clientX, y: e.clientY };
  board.setPointerCapture(e.pointerId);
  e.preventDefault();
});
board.addEventListener("pointerup", (e) => {
  if (!swipe || swipe.id !== e.pointerId) return;
  const dx = e.clientX - swipe.x, dy = e.clientY - swipe.y;
  swipe = null;
  if (Math.max(Math.abs(dx), Math.abs(dy)) < 20) return;   // a tap, not a swipe
  go(Math.abs(dx) > Math.abs(dy) ? (dx > 0 ? "right" : "left") : (dy > 0 ? "down" : "up"));
});
board.addEventListener("pointercancel", () => { swipe = null; });
board.addEventListener("touchmove", (e) => e.preventDefault(), { passive: false });   // no scrolling while swiping
board.tabIndex = 0;

$("new").addEventListener("click", () => newGame());
$("help").addEventListener("click", () => showHowto(true));
$("howto-ok").addEventListener("click", () => showHowto(false));
keepEl.addEventListener("click", () => {
  keepPlaying = true;
  keepEl.hidden = true;
  messageEl.textContent = "";
  board.focus();
});

// The guest's version and uptime, and its lifetime figures where the status has them (never made up here):
// woken (Unix seconds), wake_ms, requests and wakes_today. Fetched now and then, the uptime counted up in between.
let uptime = null, fetchedAt = 0;
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + " d " : "") + (d || h ? h + " h " : "") + m + " min " + Math.floor(s % 60) + " s";
}
function showUptime() {
  if (uptime !== null) $("uptime").textContent = duration(uptime + (Date.now() - fetchedAt) / 1000);
}
function lifetime(s) {
  const n = (k) => typeof s[k] === "number" && Number.isFinite(s[k]);
  const parts = [];
  if (n("woken")) parts.push(`Woken at ${new Date(s.woken * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" })}`);
  if (n("wake_ms")) parts.push(`the wake took ${(s.wake_ms / 1000).toFixed(1)} s`);
  if (n("requests")) parts.push(`${s.requests} requests served since`);
  if (n("wakes_today")) parts.push(`woken ${s.wakes_today} times today`);
  $("lifetime").textContent = parts.length ? parts.join(", ") + "." : "";
  $("lifetime").hidden = !parts.length;
}
// The board's other sites, from the figures dom0 sent this guest (their names, nothing made up here).
function others(s) {
  const links = $("links");
  const sites = s.sites && typeof s.sites === "object" ? s.sites : {};
  links.textContent = "";
  for (const [site, f] of Object.entries(sites)) {
    if (site === s.site || !f || !Array.isArray(f.names) || !f.names.length) continue;
    const a = document.createElement("a");
    a.href = "//" + f.names[0] + "/";
    a.textContent = f.names[0];
    if (links.childNodes.length) links.append(", ");
    links.append(a);
  }
  $("others").hidden = !links.childNodes.length;
}
function status() {
  fetch("/cgi-bin/status", { cache: "no-store" }).then((r) => r.json()).then((s) => {
    $("guest").textContent = `${s.name} ${s.version} (Linux ${s.kernel})`;
    uptime = s.uptime;
    fetchedAt = Date.now();
    showUptime();
    lifetime(s);
    others(s);
  }).catch(() => { $("guest").textContent = "(status unavailable)"; });
}
setInterval(showUptime, 1000);
setInterval(status, 60000);
status();
newGame(tilesParam());
if (!store.get("2048-howto-seen")) showHowto(true);

// The booth's sliding-tile game, and a footer saying which guest serves it and for how long it has been up.
// No libraries, no external assets: the guest serves this file and index.html, and /cgi-bin/status.
"use strict";

const board = document.getElementById("board");
const movesEl = document.getElementById("moves");
const timeEl = document.getElementById("time");
const bestEl = document.getElementById("best");
const messageEl = document.getElementById("message");

let size = Number(localStorage.getItem("size")) || 4;
let tiles = [];        // tiles[position] = number, 0 is the gap
let moves = 0;
let started = 0;       // when the first move of this game was made (ms), 0 before it
let won = false;
let timer = null;

function solved(n) {
  return Array.from({ length: n * n }, (_, i) => (i + 1) % (n * n));
}

function neighbours(pos) {
  const r = Math.floor(pos / size), c = pos % size, out = [];
  if (r > 0) out.push(pos - size);
  if (r < size - 1) out.push(pos + size);
  if (c > 0) out.push(pos - 1);
  if (c < size - 1) out.push(pos + 1);
  return out;
}

// Shuffle by random legal moves from the solved board, so every game can be solved.
function shuffle() {
  tiles = solved(size);
  let gap = tiles.indexOf(0), last = -1;
  for (let i = 0; i < size * size * 30; i++) {
    const options = neighbours(gap).filter((p) => p !== last);
    const pick = options[Math.floor(Math.random() * options.length)];
    [tiles[gap], tiles[pick]] = [tiles[pick], tiles[gap]];
    last = gap;
    gap = pick;
  }
  if (isSolved()) shuffle();
}

function isSolved() {
  return tiles.every((t, i) => t === (i + 1) % (size * size));
}

function bestKey() { return "best-" + size; }

function showBest() {
  const best = JSON.parse(localStorage.getItem(bestKey()) || "null");
  bestEl.textContent = best ? `${best.moves} / ${clock(best.ms)}` : "–";
}

function clock(ms) {
  const s = Math.floor(ms / 1000);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function tick() {
  timeEl.textContent = clock(started ? Date.now() - started : 0);
}

function render() {
  board.textContent = "";
  board.classList.toggle("won", won);
  const gapPx = 6, cell = (board.clientWidth - gapPx * (size + 1)) / size;
  tiles.forEach((t, pos) => {
    if (t === 0) return;
    const el = document.createElement("div");
    el.className = "tile" + (t === pos + 1 ? " home" : "");
    el.textContent = t;
    el.setAttribute("role", "gridcell");
    el.style.width = el.style.height = cell + "px";
    el.style.left = gapPx + (pos % size) * (cell + gapPx) + "px";
    el.style.top = gapPx + Math.floor(pos / size) * (cell + gapPx) + "px";
    el.style.fontSize = cell * 0.42 + "px";
    el.addEventListener("pointerdown", (e) => { e.preventDefault(); slide(pos); });
    board.appendChild(el);
  });
  movesEl.textContent = moves;
}

// Slide the tile at pos towards the gap; a tile further along the same row or column pushes the ones between.
function slide(pos) {
  if (won) return;
  const gap = tiles.indexOf(0);
  const sameRow = Math.floor(pos / size) === Math.floor(gap / size);
  const sameCol = pos % size === gap % size;
  if (pos === gap || (!sameRow && !sameCol)) return;
  const step = sameRow ? (pos > gap ? 1 : -1) : (pos > gap ? size : -size);
  for (let p = gap; p !== pos; p += step) {
    tiles[p] = tiles[p + step];
    moves++;
  }
  tiles[pos] = 0;
  if (!started) {
    started = Date.now();
    timer = setInterval(tick, 500);
  }
  if (isSolved()) finish();
  render();
}

function finish() {
  won = true;
  clearInterval(timer);
  const ms = Date.now() - started;
  tick();
  const best = JSON.parse(localStorage.getItem(bestKey()) || "null");
  const better = !best || moves < best.moves || (moves === best.moves && ms < best.ms);
  if (better) localStorage.setItem(bestKey(), JSON.stringify({ moves, ms }));
  messageEl.textContent = `Solved in ${moves} moves and ${clock(ms)}${better ? " – a new best!" : "!"}`;
  showBest();
}

function newGame(n) {
  size = n || size;
  localStorage.setItem("size", size);
  document.querySelectorAll("button[data-size]").forEach((b) => b.classList.toggle("on", Number(b.dataset.size) === size));
  clearInterval(timer);
  moves = 0;
  started = 0;
  won = false;
  messageEl.textContent = "";
  shuffle();
  tick();
  showBest();
  render();
}

document.getElementById("new").addEventListener("click", () => newGame());
document.querySelectorAll("button[data-size]").forEach((b) => b.addEventListener("click", () => newGame(Number(b.dataset.size))));
window.addEventListener("resize", render);
document.addEventListener("keydown", (e) => {
  const gap = tiles.indexOf(0), r = Math.floor(gap / size), c = gap % size;
  // An arrow moves the tile on that side of the gap in the arrow's direction.
  const from = { ArrowLeft: c < size - 1 ? gap + 1 : -1, ArrowRight: c > 0 ? gap - 1 : -1,
    ArrowUp: r < size - 1 ? gap + size : -1, ArrowDown: r > 0 ? gap - size : -1 }[e.key];
  if (from === undefined) return;
  e.preventDefault();
  if (from >= 0) slide(from);
});

// The guest's version and uptime: fetched now and then, counted up in between.
let uptime = null, fetchedAt = 0;
function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor(s / 3600) % 24, m = Math.floor(s / 60) % 60;
  return (d ? d + " d " : "") + (d || h ? h + " h " : "") + m + " min " + Math.floor(s % 60) + " s";
}
function showUptime() {
  if (uptime !== null) document.getElementById("uptime").textContent = duration(uptime + (Date.now() - fetchedAt) / 1000);
}
function status() {
  fetch("/cgi-bin/status", { cache: "no-store" }).then((r) => r.json()).then((s) => {
    document.getElementById("guest").textContent = `${s.name} ${s.version} (Linux ${s.kernel})`;
    uptime = s.uptime;
    fetchedAt = Date.now();
    showUptime();
  }).catch(() => { document.getElementById("guest").textContent = "(status unavailable)"; });
}
setInterval(showUptime, 1000);
setInterval(status, 60000);
status();
newGame();

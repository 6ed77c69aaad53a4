// The rules of 2048 as pure functions, for the page (global `Rules`) and for node's tests (module.exports).
// A grid is an array of rows of numbers, 0 for an empty cell; no function changes the grid it is given.
// Randomness comes in as a function returning [0, 1), like Math.random, so that tests and ?seed=N are repeatable.
"use strict";

const Rules = (() => {
  const DIRECTIONS = ["left", "right", "up", "down"];

  // One row slid to the left: each pair of equal neighbours (after the gaps close) merges once, left first.
  function slideRow(row) {
    const tiles = row.filter((v) => v !== 0), out = [];
    let score = 0;
    for (let i = 0; i < tiles.length; i++) {
      if (tiles[i] === tiles[i + 1]) {
        out.push(tiles[i] * 2);
        score += tiles[i] * 2;
        i++;                          // the merged tile does not merge again in this move
      } else {
        out.push(tiles[i]);
      }
    }
    while (out.length < row.length) out.push(0);
    return { row: out, score };
  }

  const transpose = (grid) => grid[0].map((_, c) => grid.map((row) => row[c]));
  const reverse = (grid) => grid.map((row) => [...row].reverse());
  const same = (a, b) => a.every((row, r) => row.every((v, c) => v === b[r][c]));

  // The grid after a move in a direction, the points it scored (the sum of the merged tiles) and whether it moved.
  function move(grid, direction) {
    if (!DIRECTIONS.includes(direction)) throw new Error(`no such direction: ${direction}`);
    const vertical = direction === "up" || direction === "down";
    const backwards = direction === "right" || direction === "down";
    let g = vertical ? transpose(grid) : grid;
    if (backwards) g = reverse(g);
    let score = 0;
    g = g.map((row) => { const s = slideRow(row); score += s.score; return s.row; });
    if (backwards) g = reverse(g);
    if (vertical) g = transpose(g);
    return { grid: g, score, moved: !same(grid, g) };
  }

  function emptyCells(grid) {
    const cells = [];
    grid.forEach((row, r) => row.forEach((v, c) => { if (v === 0) cells.push([r, c]); }));
    return cells;
  }

  // A 2 (nine times in ten) or a 4 in one of the empty cells; the grid as it was if none is empty.
  function spawn(grid, random = Math.random) {
    const cells = emptyCells(grid);
    if (cells.length === 0) return grid;
    const [r, c] = cells[Math.min(cells.length - 1, Math.floor(random() * cells.length))];
    const value = random() < 0.9 ? 2 : 4;
    return grid.map((row, i) => row.map((v, j) => (i === r && j === c ? value : v)));
  }

  function newGrid(size = 4, random = Math.random) {
    const empty = Array.from({ length: size }, () => new Array(size).fill(0));
    return spawn(spawn(empty, random), random);
  }

  // A player's move: the move, then a new tile if anything moved; a move that changes nothing spawns nothing.
  // `slid` is the grid before the new tile.
  function play(grid, direction, random = Math.random) {
    const m = move(grid, direction);
    return { ...m, slid: m.grid, grid: m.moved ? spawn(m.grid, random) : m.grid };
  }

  const hasWon = (grid, target = 2048) => grid.some((row) => row.some((v) => v >= target));
  const canMove = (grid) => DIRECTIONS.some((d) => move(grid, d).moved);

  // A small seeded generator (mulberry32) for ?seed=N.
  function seeded(seed) {
    let a = seed >>> 0;
    return () => {
      a = (a + 0x6d2b79f5) >>> 0;
      let t = a;
      t = Math.imul(t ^ (t >>> 15), t | 1);
      t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
      return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
    };
  }

  return { DIRECTIONS, slideRow, move, emptyCells, spawn, play, newGrid, hasWon, canMove, seeded };
})();

if (typeof module !== "undefined") module.exports = Rules;

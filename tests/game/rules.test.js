// The rules of the demo guest's 2048 (guest/site/rules.js), with node's own test runner: node --test tests/game/
"use strict";

const test = require("node:test");
const assert = require("node:assert/strict");
const path = require("node:path");

const Rules = require(path.join(__dirname, "..", "..", "guest", "site", "rules.js"));

// A random source that returns the given values in turn, and counts how many it was asked for.
function sequence(...values) {
  const next = () => {
    if (next.calls >= values.length) throw new Error("asked for more random numbers than the test gave");
    return values[next.calls++];
  };
  next.calls = 0;
  return next;
}

const G = [
  [2, 0, 2, 4],
  [0, 4, 4, 4],
  [8, 0, 0, 8],
  [2, 4, 8, 16],
];

test("a row slides left and equal neighbours merge", () => {
  assert.deepEqual(Rules.slideRow([0, 2, 0, 2]), { row: [4, 0, 0, 0], score: 4 });
  assert.deepEqual(Rules.slideRow([2, 4, 0, 8]), { row: [2, 4, 8, 0], score: 0 });
  assert.deepEqual(Rules.slideRow([0, 0, 0, 0]), { row: [0, 0, 0, 0], score: 0 });
});

test("a merged tile does not merge again in the same move", () => {
  assert.deepEqual(Rules.slideRow([2, 2, 2, 2]).row, [4, 4, 0, 0]);
  assert.deepEqual(Rules.slideRow([4, 4, 8, 0]).row, [8, 8, 0, 0]);
  assert.deepEqual(Rules.slideRow([2, 2, 2, 0]).row, [4, 2, 0, 0]);   // the pair nearest the wall merges
  assert.deepEqual(Rules.move([[0, 2, 2, 2]], "right").grid, [[0, 0, 2, 4]]);
});

test("moves left, right, up and down", () => {
  assert.deepEqual(Rules.move(G, "left").grid, [[4, 4, 0, 0], [8, 4, 0, 0], [16, 0, 0, 0], [2, 4, 8, 16]]);
  assert.deepEqual(Rules.move(G, "right").grid, [[0, 0, 4, 4], [0, 0, 4, 8], [0, 0, 0, 16], [2, 4, 8, 16]]);
  assert.deepEqual(Rules.move(G, "up").grid, [[2, 8, 2, 8], [8, 0, 4, 8], [2, 0, 8, 16], [0, 0, 0, 0]]);
  assert.deepEqual(Rules.move(G, "down").grid, [[0, 0, 0, 0], [2, 0, 2, 8], [8, 0, 4, 8], [2, 8, 8, 16]]);
  assert.throws(() => Rules.move(G, "sideways"), /no such direction/);
});

test("a move leaves the grid it was given as it was", () => {
  const copy = G.map((row) => [...row]);
  Rules.move(G, "left");
  Rules.play(G, "down", sequence(0, 0));
  assert.deepEqual(G, copy);
});

test("the score of a move is the sum of the tiles its merges made", () => {
  assert.equal(Rules.move(G, "left").score, 4 + 8 + 16);
  assert.equal(Rules.move([[2, 2, 2, 2]], "left").score, 8);
  assert.equal(Rules.move([[2, 4, 8, 16]], "left").score, 0);
});

test("a move that changes nothing spawns nothing", () => {
  const random = sequence(0, 0);
  const stuck = [[2, 4], [0, 0]];
  const m = Rules.play(stuck, "up", random);
  assert.equal(m.moved, false);
  assert.deepEqual(m.grid, stuck);
  assert.equal(random.calls, 0);
});

test("a move that changes the grid spawns one tile", () => {
  const m = Rules.play([[2, 0], [0, 0]], "right", sequence(0, 0.5));
  assert.equal(m.moved, true);
  assert.deepEqual(m.grid, [[2, 2], [0, 0]]);   // the first empty cell after the move is where the 2 went
  assert.deepEqual(m.slid, [[0, 2], [0, 0]]);   // the grid before the new tile
});

test("a new tile goes only into an empty cell: a 2 nine times in ten, else a 4", () => {
  const grid = [[2, 0, 4], [0, 8, 0], [16, 32, 64]];
  assert.deepEqual(Rules.emptyCells(grid), [[0, 1], [1, 0], [1, 2]]);
  assert.deepEqual(Rules.spawn(grid, sequence(0, 0)), [[2, 2, 4], [0, 8, 0], [16, 32, 64]]);
  assert.deepEqual(Rules.spawn(grid, sequence(0.5, 0.89)), [[2, 0, 4], [2, 8, 0], [16, 32, 64]]);
  assert.deepEqual(Rules.spawn(grid, sequence(0.99, 0.9)), [[2, 0, 4], [0, 8, 4], [16, 32, 64]]);
  const full = [[2, 4], [8, 16]];
  assert.equal(Rules.spawn(full, sequence()), full);
  // Any random number below 1 lands in an empty cell, and every value is a 2 or a 4.
  for (let i = 0; i < 200; i++) {
    const random = Rules.seeded(i);
    const g = Rules.spawn(grid, random);
    const changed = g.flat().map((v, j) => [v, grid.flat()[j]]).filter(([a, b]) => a !== b);
    assert.equal(changed.length, 1);
    assert.equal(changed[0][1], 0);
    assert.ok(changed[0][0] === 2 || changed[0][0] === 4);
  }
});

test("a new game has two tiles", () => {
  const g = Rules.newGrid(4, Rules.seeded(7));
  assert.equal(g.length, 4);
  assert.equal(g.flat().filter((v) => v !== 0).length, 2);
  assert.deepEqual(Rules.newGrid(4, Rules.seeded(7)), g);   // a seed gives the same start every time
});

test("the game is won with a 2048 tile", () => {
  assert.equal(Rules.hasWon([[1024, 1024], [0, 0]]), false);
  assert.equal(Rules.hasWon(Rules.move([[1024, 1024], [0, 0]], "left").grid), true);
  assert.equal(Rules.hasWon([[4096, 0], [0, 0]]), true);
  assert.equal(Rules.hasWon([[8, 0], [0, 0]], 8), true);
});

test("the game is over when no move is left", () => {
  assert.equal(Rules.canMove([[2, 4], [4, 2]]), false);
  assert.equal(Rules.canMove([[2, 4, 2], [4, 2, 4], [2, 4, 2]]), false);
  assert.equal(Rules.canMove([[2, 4], [2, 8]]), true);      // a column can merge
  assert.equal(Rules.canMove([[2, 2], [4, 8]]), true);      // a row can merge
  assert.equal(Rules.canMove([[2, 4], [8, 0]]), true);      // a cell is empty
});

// The chat panel's browser-free logic (web/kontext_thread.js), run with node's own test runner:
//     node --test tests/js/
import assert from "node:assert/strict";
import { test } from "node:test";

import * as T from "../../web/kontext_thread.js";

// A graph's turns as the panel reads them: image 4 -> 10 -> 11 -> 12, and 13 branching from 10.
const turn = (id, parent, extra = {}) => ({ id, parent, imageFrom: parent == null ? 4 : null, instruction: `edit ${id}`, seed: id, ...extra });
const chain = () => [turn(10, null), turn(11, 10), turn(12, 11)];
const ids = (view) => view.map((v) => v.turn.id);

test("a chain reads as one thread, the newest turn active when the graph names none", () => {
  const tree = T.makeTree(chain());
  const state = T.resolveState(tree, undefined, () => false);
  assert.deepEqual(state, { active: 12, source: null });
  const view = T.threadView(tree, state.active);
  assert.deepEqual(ids(view), [10, 11, 12]);
  assert.deepEqual(view.map((v) => v.number), [1, 2, 3]);
  assert.deepEqual(view.map((v) => v.active), [false, false, true]);
  assert.deepEqual(view.map((v) => v.ahead), [false, false, false]);
});

test("an earlier active turn shows the turns after it as ahead; a branch from it is its own thread", () => {
  let tree = T.makeTree(chain());
  const view = T.threadView(tree, 10);
  assert.deepEqual(ids(view), [10, 11, 12]);
  assert.deepEqual(view.map((v) => v.ahead), [false, true, true]);

  tree = T.makeTree([...chain(), turn(13, 10)]);
  const branched = T.threadView(tree, 13);
  assert.deepEqual(ids(branched), [10, 13]);
  assert.deepEqual(branched[1].branch, { index: 1, count: 2 });
  assert.deepEqual(branched[0].branch, { index: 0, count: 1 });
  // Stepping back to the other branch lands on its end; stepping on wraps around.
  assert.equal(T.switchBranch(tree, 13, -1), 12);
  assert.equal(T.switchBranch(tree, 11, +1), 13);
  assert.equal(T.switchBranch(tree, 10, +1), 10); // no sibling: stays
  // From the first turn the thread follows the newest branch.
  assert.deepEqual(ids(T.threadView(tree, 10)), [10, 13]);
});

test("several first turns in one graph are siblings: one conversation each", () => {
  const tree = T.makeTree([...chain(), turn(40, null), turn(41, 40)]);
  assert.deepEqual(T.threadView(tree, 41)[0].branch, { index: 1, count: 2 });
  assert.equal(T.switchBranch(tree, 40, 1), 12);
});

test("the stored active turn wins; a deleted one falls back to the stored image, then to the newest turn", () => {
  const tree = T.makeTree(chain());
  assert.deepEqual(T.resolveState(tree, { active: 11, source: null }, () => true), { active: 11, source: null });
  assert.deepEqual(T.resolveState(tree, { active: 99, source: 7 }, (id) => id === 7), { active: null, source: 7 });
  assert.deepEqual(T.resolveState(tree, { active: 99, source: 7 }, () => false), { active: 12, source: null });
  assert.deepEqual(T.resolveState(T.makeTree([]), {}, () => false), { active: null, source: null });
  assert.deepEqual(T.threadView(tree, null), []);
});

test("undo removes the newest turn of the active branch, never one with children", () => {
  const tree = T.makeTree([...chain(), turn(13, 10)]);
  assert.deepEqual(T.undoPlan(tree, 13), { remove: 13, active: 10, source: null });
  // The active turn is earlier: the end of its branch goes, the active turn stays.
  assert.deepEqual(T.undoPlan(tree, 11), { remove: 12, active: 11, source: null });
  assert.deepEqual(T.undoPlan(tree, 10), { remove: 13, active: 10, source: null });
  // The last turn of a conversation: what is left is its image, ready for a new first instruction.
  assert.deepEqual(T.undoPlan(T.makeTree([turn(10, null)]), 10), { remove: 10, active: null, source: 4 });
  assert.equal(T.undoPlan(tree, null), null);
});

test("again is the same instruction from the same parent with a different seed", () => {
  const tree = T.makeTree(chain());
  const seeds = [11 / T.MAX_SEED, 0.5]; // the first draw repeats turn 11's seed and is drawn again
  const plan = T.againPlan(tree, 11, () => seeds.shift());
  assert.deepEqual(plan, { like: 11, parent: 10, imageFrom: null, instruction: "edit 11", seed: T.MAX_SEED / 2 });
  const first = T.againPlan(tree, 10, () => 0.25);
  assert.equal(first.parent, null);
  assert.equal(first.imageFrom, 4);
  assert.equal(T.againPlan(tree, 99), null);
});

test("a graph wired into a cycle by hand does not hang the thread", () => {
  const tree = T.makeTree([turn(1, 2), turn(2, 1), turn(3, 3)]);
  assert.deepEqual(T.pathTo(tree, 1), [2, 1]);
  assert.equal(T.tipOf(tree, 3), 3);
  assert.ok(T.threadView(tree, 1).length <= 2);
});

test("an empty instruction is refused; a real one is trimmed", () => {
  assert.match(T.checkInstruction("  \n ").error, /empty one is not sent/);
  assert.match(T.checkInstruction(undefined).error, /Type an edit instruction/);
  assert.deepEqual(T.checkInstruction("  make it dusk \n"), { text: "make it dusk" });
});

test("MODEL / CLIP / VAE: the active turn's source, else the quantized model, else the first; loader files by pattern", () => {
  const c = [{ id: 1, slot: 0, nodeType: "UNETLoader" }, { id: 5, slot: 0, nodeType: "KontextTRT_LoadQuantized" },
             { id: 7, slot: 0, nodeType: "CheckpointLoaderSimple" }];
  assert.equal(T.pickSource(c, { id: 7, slot: 0 }), c[2]);
  assert.equal(T.pickSource(c, { id: 7, slot: 1 }), c[1]);
  assert.equal(T.pickSource(c, null), c[1]);
  assert.equal(T.pickSource(c.slice(0, 1), null), c[0]);
  assert.equal(T.pickSource([], null), null);
  const files = ["sd15.safetensors", "flux1-dev.safetensors", "flux1-kontext-dev.safetensors"];
  assert.equal(T.pickFile(files, [/kontext/i, /flux/i]), "flux1-kontext-dev.safetensors");
  assert.equal(T.pickFile(files.slice(0, 2), [/kontext/i, /flux/i]), "flux1-dev.safetensors");
  assert.equal(T.pickFile(["a"], [/b/]), "a");
  assert.equal(T.pickFile([], [/b/]), null);
});

test("image values become ComfyUI /view parameters", () => {
  assert.deepEqual(T.imageRef("photo.png"), { filename: "photo.png", subfolder: "", type: "input" });
  assert.deepEqual(T.imageRef("clips/a b.png [output]"), { filename: "a b.png", subfolder: "clips", type: "output" });
  assert.equal(T.viewQuery({ filename: "a b.png", subfolder: "x/y", type: "temp" }), "filename=a+b.png&subfolder=x%2Fy&type=temp");
});

test("times and ComfyUI's refusals read as text", () => {
  assert.equal(T.formatSeconds(2140), "2.1 s");
  assert.equal(T.formatSeconds(125000), "2 min 05 s");
  assert.equal(T.formatSeconds(null), "");
  const body = { error: { type: "prompt_outputs_failed_validation", message: "Prompt outputs failed validation", details: "" },
                 node_errors: { 3: { class_type: "VAELoader", errors: [{ message: "Value not in list", details: "vae_name: 'x' not in []" }] } } };
  assert.equal(T.formatPromptError(body, (id, type) => `${type} #${id}`),
               "Prompt outputs failed validation\nVAELoader #3: Value not in list: vae_name: 'x' not in []");
  assert.equal(T.formatPromptError({ error: "no outputs" }), "no outputs");
  assert.match(T.formatPromptError({}), /no reason given/);
});

test("execution events: a fresh result carries its time, a cached replay does not", () => {
  let now = 0;
  const tr = new T.RunTracker(() => now);
  tr.queued("p1", 10);
  assert.equal(tr.state(10).status, "queued");
  assert.deepEqual(tr.busyPrompts(), ["p1"]);
  tr.executionStart({ prompt_id: "p1" });
  tr.executing("1");
  now = 1000;
  tr.executing("10");
  assert.equal(tr.progress({ node: "10", value: 1, max: 2, prompt_id: "p1" }), "10");
  assert.deepEqual([tr.state(10).value, tr.state(10).max], [1, 2]);
  assert.equal(tr.progress({ node: "99", value: 1, max: 2 }), null); // a node not running
  now = 3500;
  const image = { filename: "ComfyUI_temp_x_00001_.png", subfolder: "", type: "temp" };
  assert.deepEqual(tr.executed({ node: "10", output: { images: [image] }, prompt_id: "p1" }),
                   { id: "10", image, ms: 2500, fresh: true });
  tr.executing(null);
  assert.equal(tr.success({ prompt_id: "p1" }), "10");
  assert.deepEqual(tr.busyPrompts(), []);
  // The next prompt replays turn 10's cached result without executing it.
  tr.queued("p2", 11);
  tr.executionStart({ prompt_id: "p2" });
  assert.deepEqual(tr.executed({ node: "10", output: { images: [image] }, prompt_id: "p2" }),
                   { id: "10", image, ms: null, fresh: false });
  assert.equal(tr.executed({ node: "1", output: { text: ["x"] } }), null); // no image: not a turn's result
});

test("an error anywhere in a prompt is its target turn's; a stop too", () => {
  const tr = new T.RunTracker(() => 0);
  tr.queued("p3", 12);
  tr.executionStart({ prompt_id: "p3" });
  tr.executing("2");
  const failed = tr.error({ prompt_id: "p3", node_id: "2", node_type: "VAELoader", exception_message: "file not found: ae.safetensors" });
  assert.deepEqual(failed, { id: "12", error: "VAELoader (#2): file not found: ae.safetensors" });
  assert.equal(tr.state(12).status, "error");
  assert.equal(tr.state(2).status, "error");
  assert.deepEqual(tr.busyPrompts(), []);
  tr.queued("p4", 13);
  tr.executing("13");
  assert.deepEqual(tr.interrupted({ prompt_id: "p4", node_id: "13" }), { id: "13", error: "stopped" });
  assert.equal(tr.state(13).status, "error");
  // A prompt the panel did not queue: the failing node is the one named.
  assert.equal(tr.error({ prompt_id: "other", node_id: "20", exception_message: "x" }).id, "20");
  // ComfyUI refused the prompt before it ran.
  tr.refused(14);
  assert.equal(tr.state(14).status, "error");
  // A prompt whose target was all cached ends done.
  tr.queued("p5", 15);
  tr.success({ prompt_id: "p5" });
  assert.equal(tr.state(15).status, "done");
});

test("a prompt ComfyUI runs before its /prompt reply arrives keeps its state", () => {
  let now = 0;
  const tr = new T.RunTracker(() => now);
  tr.executionStart({ prompt_id: "p6" });
  tr.executing("16");
  tr.queued("p6", 16); // the reply comes while the turn samples: it stays running, timed from its start
  assert.equal(tr.state(16).status, "running");
  now = 700;
  assert.equal(tr.executed({ node: "16", output: { images: [{ filename: "a.png" }] }, prompt_id: "p6" }).ms, 700);
  assert.equal(tr.success({ prompt_id: "p6" }), "16");
  // Finished, or failed in a loader, before the reply: nothing stays busy, and the failure is the turn's.
  assert.equal(tr.success({ prompt_id: "p7" }), null);
  assert.equal(tr.queued("p7", 17), null);
  tr.error({ prompt_id: "p8", node_id: "3", node_type: "VAELoader", exception_message: "no file" });
  assert.deepEqual(tr.queued("p8", 18), { id: "18", error: "VAELoader (#3): no file" });
  assert.equal(tr.state(18).status, "error");
  assert.deepEqual(tr.busyPrompts(), []);
});

// The Kontext Edit panel's logic that needs no browser: the conversation read from the graph's Edit Turn
// nodes, what branching / undo / again change, and ComfyUI's execution events turned into per-turn state.
// Plain data in, plain data out: the panel (kontext_chat.js) reads LiteGraph into these records, and
// `node --test tests/js` checks this module without ComfyUI or a browser.

export const TURN_TYPE = "KontextTRT_EditTurn";
export const TURN_OUTPUT = "KONTEXT_EDIT_TURN"; // the type of its `turn` output, which a later turn's `previous` takes
// graph.extra[STATE_KEY] = {active, source}: which turn the next instruction continues (or which image a new
// conversation starts from); node.properties[STATE_KEY] = a turn's last result {image, ms, at} or {error}.
// Both are saved with the workflow, so re-opening it restores the conversation.
export const STATE_KEY = "kontext_edit";
export const SOURCE_KINDS = ["MODEL", "CLIP", "VAE"];
export const MAX_SEED = 2 ** 32;

export function checkInstruction(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return { error: "Type an edit instruction first (e.g. 'make it dusk'); an empty one is not sent." };
  return { text: trimmed };
}

export function newSeed(random = Math.random, avoid = null) {
  for (;;) {
    const seed = Math.floor(random() * MAX_SEED);
    if (seed !== avoid) return seed;
  }
}

/**
 * turns: [{id, parent, imageFrom, ...}] where parent is the id of the turn wired into `previous` (or null) and
 * imageFrom the id of the node wired into `image`. A turn whose parent is not a turn is a first turn.
 * LiteGraph gives nodes increasing ids, so a higher id is a newer turn.
 */
export function makeTree(turns) {
  const byId = new Map(turns.map((t) => [t.id, t]));
  const ordered = [...turns].sort((a, b) => a.id - b.id);
  const parentOf = (id) => {
    const parent = byId.get(id)?.parent;
    return parent != null && parent !== id && byId.has(parent) ? parent : null;
  };
  const children = new Map([[null, []]]);
  for (const t of ordered) children.set(t.id, []);
  for (const t of ordered) children.get(parentOf(t.id)).push(t.id);
  return { byId, children, parentOf };
}

// A graph can be wired into a cycle by hand; walks stop at a turn seen before instead of looping.
export function pathTo(tree, id) {
  const path = [];
  const seen = new Set();
  for (let cur = id; cur != null && !seen.has(cur); cur = tree.parentOf(cur)) {
    seen.add(cur);
    path.unshift(cur);
  }
  return path;
}

/** The end of the branch through `id`: from it, always the newest child. */
export function tipOf(tree, id) {
  const seen = new Set([id]);
  let cur = id;
  for (;;) {
    const kids = (tree.children.get(cur) ?? []).filter((k) => !seen.has(k));
    if (!kids.length) return cur;
    cur = kids[kids.length - 1];
    seen.add(cur);
  }
}

/**
 * What the panel shows: the stored active turn when it still exists; else the stored source image (a new
 * conversation) when that node still exists; else the newest turn.
 */
export function resolveState(tree, stored, nodeExists) {
  const { active = null, source = null } = stored ?? {};
  if (active != null && tree.byId.has(active)) return { active, source: null };
  if (source != null && nodeExists(source)) return { active: null, source };
  const ids = [...tree.byId.keys()];
  return { active: ids.length ? Math.max(...ids) : null, source: null };
}

/**
 * The thread: first turn to the end of the active branch. Turns after the active one are `ahead` (the next
 * instruction branches before them); `branch` says which of its siblings a turn is (first turns are
 * siblings of each other: several conversations in one graph).
 */
export function threadView(tree, active) {
  if (active == null || !tree.byId.has(active)) return [];
  const path = pathTo(tree, tipOf(tree, active));
  const activeAt = path.indexOf(active);
  return path.map((id, i) => {
    const siblings = tree.children.get(tree.parentOf(id));
    return {
      turn: tree.byId.get(id), number: i + 1, active: id === active, ahead: i > activeAt,
      branch: { index: siblings.indexOf(id), count: siblings.length },
    };
  });
}

/** The active turn after stepping from `id` to its previous (-1) or next (+1) sibling: that branch's end. */
export function switchBranch(tree, id, step) {
  const siblings = tree.children.get(tree.parentOf(id));
  const at = siblings.indexOf(id);
  if (at < 0 || siblings.length < 2) return id;
  return tipOf(tree, siblings[(at + step + siblings.length) % siblings.length]);
}

/**
 * Undo removes the newest turn of the active branch (the end of the thread shown), never a turn with
 * children. Removing the first turn leaves its image as a new conversation's source.
 */
export function undoPlan(tree, active) {
  if (active == null || !tree.byId.has(active)) return null;
  const remove = tipOf(tree, active);
  const next = remove === active ? tree.parentOf(remove) : active;
  return { remove, active: next, source: next == null ? tree.byId.get(remove).imageFrom ?? null : null };
}

/** "Again": the same instruction from the same parent (or image) with a new seed, as a sibling branch. */
export function againPlan(tree, id, random = Math.random) {
  const turn = tree.byId.get(id);
  if (!turn) return null;
  return { like: id, parent: tree.parentOf(id), imageFrom: tree.parentOf(id) == null ? turn.imageFrom : null,
           instruction: turn.instruction, seed: newSeed(random, turn.seed) };
}

/**
 * candidates: [{id, slot, type, nodeType, label}] the graph's outputs of one kind; wired: {id, slot} the
 * active turn is wired to. Keeps the active turn's source, else prefers the pack's quantized model.
 */
export function pickSource(candidates, wired) {
  const same = wired && candidates.find((c) => c.id === wired.id && c.slot === wired.slot);
  return same ?? candidates.find((c) => c.nodeType === "KontextTRT_LoadQuantized") ?? candidates[0] ?? null;
}

/** A loader's file: the first option matching the first pattern that matches any, else the first option. */
export function pickFile(options, patterns) {
  for (const pattern of patterns) {
    const hit = options.find((o) => pattern.test(String(o)));
    if (hit !== undefined) return hit;
  }
  return options[0] ?? null;
}

/** A LoadImage value ("sub/dir/name.png", maybe annotated " [input]") as ComfyUI's /view parameters. */
export function imageRef(value, type = "input") {
  let name = String(value ?? "").trim();
  const annotated = name.match(/^(.*) \[(input|output|temp)\]$/);
  if (annotated) [, name, type] = annotated;
  const cut = name.lastIndexOf("/");
  return { filename: name.slice(cut + 1), subfolder: cut < 0 ? "" : name.slice(0, cut), type };
}

export function viewQuery(ref) {
  return new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "output" })
    .toString();
}

export function formatSeconds(ms) {
  if (ms == null || !Number.isFinite(ms)) return "";
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${String(Math.round(s % 60)).padStart(2, "0")} s`;
}

/** ComfyUI's refusal of a prompt (the /prompt response body) as lines a person reads. */
export function formatPromptError(body, titleOf = (id) => `#${id}`) {
  const lines = [];
  const error = body?.error;
  if (typeof error === "string") lines.push(error);
  else if (error?.message) lines.push(error.details ? `${error.message}: ${error.details}` : error.message);
  for (const [id, nodeError] of Object.entries(body?.node_errors ?? {})) {
    for (const reason of nodeError.errors ?? []) {
      const details = reason.details ? `: ${reason.details}` : "";
      lines.push(`${titleOf(id, nodeError.class_type)}: ${reason.message}${details}`);
    }
  }
  return lines.length ? lines.join("\n") : "ComfyUI refused the prompt (no reason given)";
}

/**
 * ComfyUI's execution events (execution_start, executing, progress, executed, execution_error,
 * execution_interrupted, execution_success) as per-node state. A prompt the panel queued has a target turn:
 * an error anywhere in that prompt (a loader, say) is that turn's error. ComfyUI may run a prompt, even
 * finish it, before the reply to its /prompt request arrives: a prompt's end seen before `queued` is kept
 * for it.
 */
export class RunTracker {
  constructor(clock = () => Date.now()) {
    this.clock = clock;
    this.targets = new Map(); // prompt id -> target turn id (as a string)
    this.nodes = new Map(); // node id (string) -> {status, value, max, started, prompt}
    this.ended = new Map(); // prompt id -> {error} for prompts that ended before they were `queued` here
    this.current = null; // the running prompt
  }

  state(id) {
    return this.nodes.get(String(id)) ?? null;
  }

  busyPrompts() {
    return [...this.targets.keys()];
  }

  /** The panel's prompt for turn `turnId` was accepted; returns {id, error} when it already failed. */
  queued(promptId, turnId) {
    const id = String(turnId);
    if (this.ended.has(promptId)) {
      const { error } = this.ended.get(promptId);
      this.ended.delete(promptId);
      if (!error) return null;
      this.nodes.set(id, { status: "error", prompt: promptId });
      return { id, error };
    }
    this.targets.set(promptId, id);
    if (this.nodes.get(id)?.prompt !== promptId) this.nodes.set(id, { status: "queued", prompt: promptId });
    return null;
  }

  refused(turnId) {
    this.nodes.set(String(turnId), { status: "error" });
  }

  executionStart(detail) {
    this.current = detail?.prompt_id ?? null;
  }

  executing(nodeId) {
    if (nodeId == null) { // the prompt is done
      this.current = null;
      return;
    }
    this.nodes.set(String(nodeId), { status: "running", value: 0, max: 0, started: this.clock(), prompt: this.current });
  }

  progress(detail) {
    const entry = this.nodes.get(String(detail?.node));
    if (!entry || entry.status !== "running") return null;
    entry.value = detail.value;
    entry.max = detail.max;
    return String(detail.node);
  }

  /** A node's result: {id, image, ms, fresh}; fresh is false for ComfyUI's replay of a cached node's result. */
  executed(detail) {
    const id = String(detail?.node);
    const image = detail?.output?.images?.[0];
    const entry = this.nodes.get(id);
    const fresh = entry?.status === "running";
    const ms = fresh ? this.clock() - entry.started : null;
    this.nodes.set(id, { status: "done", prompt: detail?.prompt_id ?? entry?.prompt });
    return image ? { id, image, ms, fresh } : null;
  }

  #end(promptId, error) {
    const id = this.targets.get(promptId);
    this.targets.delete(promptId);
    if (id == null && promptId != null) {
      this.ended.set(promptId, { error });
      if (this.ended.size > 64) this.ended.delete(this.ended.keys().next().value); // prompts queued elsewhere
    }
    return id;
  }

  /** The turn an error belongs to and its text: {id, error}. */
  error(detail) {
    const failed = String(detail?.node_id);
    const where = detail?.node_type ? `${detail.node_type} (#${failed})` : `#${failed}`;
    const error = `${where}: ${detail?.exception_message ?? "failed"}`.trim();
    const id = this.#end(detail?.prompt_id, error) ?? failed;
    this.nodes.set(failed, { status: "error", prompt: detail?.prompt_id });
    this.nodes.set(id, { status: "error", prompt: detail?.prompt_id });
    return { id, error };
  }

  interrupted(detail) {
    const error = "stopped";
    const id = this.#end(detail?.prompt_id, error) ?? String(detail?.node_id);
    if (detail?.node_id != null) this.nodes.set(String(detail.node_id), { status: "error", prompt: detail?.prompt_id });
    this.nodes.set(id, { status: "error", prompt: detail?.prompt_id });
    return { id, error };
  }

  /** The prompt finished; a target never executed (all of it cached) is done too. Returns the target. */
  success(detail) {
    const id = this.#end(detail?.prompt_id, null);
    if (id == null) return null;
    if (this.nodes.get(id)?.status !== "error") this.nodes.set(id, { status: "done", prompt: detail?.prompt_id });
    return id;
  }
}

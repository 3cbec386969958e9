// Kontext Edit: a sidebar tab that edits an image like a conversation. Each instruction appends one Edit Turn
// node wired to the active turn and queues it through ComfyUI's API (only that turn: ComfyUI's partial
// execution, its cache keeps the earlier turns); the thread is read back from the graph, so the workflow is
// the conversation. Progress, results and errors come from ComfyUI's own websocket events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import * as T from "./kontext_thread.js";

const TAB_ID = "kontext-edit";
const tracker = new T.RunTracker();
const picks = {}; // MODEL / CLIP / VAE -> "nodeId:slot" chosen in the panel this session
let settings = null; // steps / guidance / resize for new turns once the person changed them
let notice = ""; // the panel's one-line message (a refused instruction, an upload error)
let root = null; // the tab's element while the tab is open

// ---- the graph -------------------------------------------------------------------------------------------

const graph = () => app.rootGraph ?? app.graph;
const nodesOf = (g) => g.nodes ?? g._nodes ?? [];
const widgetOf = (node, name) => node?.widgets?.find((w) => w.name === name);

function linkInto(node, input) {
  const slot = node.findInputSlot(input);
  const link = slot < 0 ? null : node.getInputLink(slot);
  return link ? { id: link.origin_id, slot: link.origin_slot } : null;
}

function readTurn(node) {
  const saved = node.properties?.[T.STATE_KEY] ?? {};
  return {
    id: node.id, parent: linkInto(node, "previous")?.id ?? null, imageFrom: linkInto(node, "image")?.id ?? null,
    instruction: widgetOf(node, "instruction")?.value ?? "", seed: widgetOf(node, "seed")?.value,
    image: saved.image ?? null, ms: saved.ms ?? null, at: saved.at ?? null, error: saved.error ?? null,
  };
}

function readThread() {
  const g = graph();
  const tree = T.makeTree(nodesOf(g).filter((n) => n.type === T.TURN_TYPE).map(readTurn));
  const state = T.resolveState(tree, g.extra?.[T.STATE_KEY], (id) => !!g.getNodeById(id));
  return { g, tree, state };
}

function candidates(kind) {
  const out = [];
  for (const node of nodesOf(graph())) {
    (node.outputs ?? []).forEach((o, slot) => {
      if (o.type === kind) out.push({ id: node.id, slot, type: kind, nodeType: node.type, label: `${node.title} #${node.id}` });
    });
  }
  return out;
}

function chosenSource(kind, activeNode) {
  const list = candidates(kind);
  const picked = list.find((c) => `${c.id}:${c.slot}` === picks[kind]);
  return picked ?? T.pickSource(list, activeNode ? linkInto(activeNode, kind.toLowerCase()) : null);
}

// Tell ComfyUI the graph changed: its change tracker (undo, the unsaved mark) and its workflow persistence
// (a reload restores the graph) listen for this.
function graphChanged() {
  const g = graph();
  g.setDirtyCanvas?.(true, true);
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
  refresh();
}

function setState(state) {
  const g = graph();
  g.extra = g.extra ?? {};
  g.extra[T.STATE_KEY] = { active: state.active ?? null, source: state.source ?? null };
}

function saveResult(node, result) {
  node.properties = node.properties ?? {};
  node.properties[T.STATE_KEY] = result;
}

function placeRightOf(node, anchor, row) {
  const [x, y] = anchor?.pos ?? [60, 60];
  const [w, h] = anchor?.size ?? [300, 200];
  node.pos = [x + w + 60, y + row * (h + 60)];
}

// The Edit Turn node's own defaults, from its definition as ComfyUI sent it to the frontend.
function nodeDefault(name) {
  const input = LiteGraph.registered_node_types[T.TURN_TYPE]?.nodeData?.input ?? {};
  return (input.required?.[name] ?? input.optional?.[name])?.[1]?.default ?? null;
}

const SETTINGS = ["steps", "guidance", "resize", "reference_method"];

// A turn's sampling settings, or the node's defaults where there is no turn.
function turnSettings(node) {
  return Object.fromEntries(SETTINGS.map((name) => [name, (node ? widgetOf(node, name)?.value : null) ?? nodeDefault(name)]));
}

// What the next turn uses: what the person set in the panel, else the turn it continues, else the node's defaults.
function settingsFor(likeNode) {
  return settings ?? turnSettings(likeNode);
}

/** A new Edit Turn wired to its parent turn (or image) and to the chosen MODEL / CLIP / VAE. */
function addTurn({ parent, imageFrom, instruction, seed, sources, values }) {
  const g = graph();
  const parentNode = parent != null ? g.getNodeById(parent) : null;
  const imageNode = imageFrom != null ? g.getNodeById(imageFrom) : null;
  const node = LiteGraph.createNode(T.TURN_TYPE);
  g.add(node);
  const anchor = parentNode ?? imageNode;
  const out = parentNode ? parentNode.outputs.findIndex((o) => o.type === T.TURN_OUTPUT) : 0;
  placeRightOf(node, anchor, anchor?.outputs?.[out]?.links?.length ?? 0); // branches stack downwards
  widgetOf(node, "instruction").value = instruction;
  widgetOf(node, "seed").value = seed;
  for (const [name, value] of Object.entries(values)) if (value != null) widgetOf(node, name).value = value;
  // The seed is the turn's identity: ComfyUI's default "randomize after queueing" would give every turn a new
  // seed on the next Run, and the whole conversation would sample again differently.
  const control = widgetOf(node, "control_after_generate");
  if (control) control.value = "fixed";
  for (const kind of T.SOURCE_KINDS) {
    const src = sources[kind];
    g.getNodeById(src.id).connect(src.slot, node, kind.toLowerCase());
  }
  if (parentNode) parentNode.connect(out, node, "previous");
  else imageNode.connect(0, node, "image");
  return node;
}

async function queueTurn(node) {
  saveResult(node, {});
  try {
    const prompt = await app.graphToPrompt();
    const res = await api.queuePrompt(0, prompt, { partialExecutionTargets: [String(node.id)] });
    if (res.node_errors && Object.keys(res.node_errors).length) throw { response: res };
    const early = tracker.queued(res.prompt_id, node.id);
    if (early) saveResult(node, { error: early.error });
  } catch (e) {
    const titleOf = (id, type) => `${graph().getNodeById(Number(id))?.title ?? type} (#${id})`;
    tracker.refused(node.id);
    saveResult(node, { error: e?.response ? T.formatPromptError(e.response, titleOf) : String(e?.message ?? e) });
  }
  graphChanged();
}

// ---- actions ---------------------------------------------------------------------------------------------

function say(text) {
  notice = text;
  const line = root?.querySelector(".kx-notice");
  if (line) line.textContent = text;
}

/** Appends the turn and queues it; true once the instruction is taken (the box may be cleared at once). */
function send(text) {
  const checked = T.checkInstruction(text);
  if (checked.error) return say(checked.error), false;
  const { g, state } = readThread();
  const active = state.active != null ? g.getNodeById(state.active) : null;
  if (!active && state.source == null) return say("Drop or pick an image to edit first."), false;
  const sources = {};
  for (const kind of T.SOURCE_KINDS) {
    sources[kind] = chosenSource(kind, active);
    if (!sources[kind]) return say(`No ${kind} in the graph: pick one or press "Add loaders".`), false;
  }
  say("");
  const node = addTurn({ parent: active?.id ?? null, imageFrom: active ? null : state.source, instruction: checked.text,
                         seed: T.newSeed(), sources, values: settingsFor(active) });
  setState({ active: node.id });
  graphChanged(); // the new turn shows as queued at once
  queueTurn(node);
  return true;
}

async function again() {
  const { g, tree, state } = readThread();
  const plan = T.againPlan(tree, state.active);
  if (!plan) return say("No turn to run again.");
  const like = g.getNodeById(plan.like);
  const sources = {};
  for (const kind of T.SOURCE_KINDS) {
    const wired = linkInto(like, kind.toLowerCase());
    if (!wired) return say(`Turn #${like.id} has no ${kind} wired.`);
    sources[kind] = wired;
  }
  const node = addTurn({ ...plan, sources, values: turnSettings(like) }); // that turn again, as it was set
  setState({ active: node.id });
  graphChanged(); // the new turn shows as queued at once
  await queueTurn(node);
}

function undo() {
  const { g, tree, state } = readThread();
  const plan = T.undoPlan(tree, state.active);
  if (!plan) return say("Nothing to undo.");
  g.remove(g.getNodeById(plan.remove));
  setState(plan);
  graphChanged();
}

function activate(id) {
  setState({ active: id });
  graphChanged();
}

async function stop() {
  for (const promptId of tracker.busyPrompts()) {
    if (promptId === tracker.current) {
      await api.interrupt(promptId); // ComfyUI answers with execution_interrupted
      continue;
    }
    await api.deleteItem("queue", promptId); // a prompt still waiting ends silently
    const { id, error } = tracker.interrupted({ prompt_id: promptId });
    const node = liveTurn(id);
    if (node) saveResult(node, { error });
  }
  graphChanged();
}

async function save() {
  const { tree, state } = readThread();
  const turn = tree.byId.get(state.active);
  if (!turn?.image) return say("The active turn has no image yet.");
  const res = await api.fetchApi(`/view?${T.viewQuery(turn.image)}`);
  if (res.status !== 200) return say(`ComfyUI no longer has this turn's image (${res.status}): queue the turn again.`);
  // Through a blob: ComfyUI's Content-Disposition would otherwise name the file after its temp file.
  const url = URL.createObjectURL(await res.blob());
  const a = el("a", { href: url, download: `kontext_turn${T.pathTo(tree, turn.id).length}_seed${turn.seed}.png` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

async function useImage(file) {
  if (!file || !file.type.startsWith("image/")) return say(`${file?.name ?? "That"} is not an image.`);
  const body = new FormData();
  body.append("image", file);
  body.append("type", "input");
  let saved;
  try {
    const res = await api.fetchApi("/upload/image", { method: "POST", body });
    if (res.status !== 200) return say(`ComfyUI refused the upload of ${file.name}: ${res.status} ${await res.text()}`);
    saved = await res.json();
  } catch (e) {
    return say(`The upload of ${file.name} to ComfyUI failed: ${e?.message ?? e}`);
  }
  const value = saved.subfolder ? `${saved.subfolder}/${saved.name}` : saved.name;
  const g = graph();
  const node = LiteGraph.createNode("LoadImage");
  g.add(node);
  const lowest = nodesOf(g).filter((n) => n !== node).reduce((y, n) => Math.max(y, n.pos[1] + (n.size?.[1] ?? 0)), 0);
  node.pos = [60, lowest + 80];
  const widget = widgetOf(node, "image");
  const values = widget.options?.values;
  if (Array.isArray(values) && !values.includes(value)) values.push(value);
  widget.value = value;
  widget.callback?.(value); // the node's own preview
  say("");
  // A new conversation keeps the settings the panel showed for the last one.
  const { state } = readThread();
  settings = settingsFor(state.active != null ? g.getNodeById(state.active) : null);
  setState({ active: null, source: node.id });
  graphChanged();
}

function addLoaders() {
  const g = graph();
  const made = [];
  const make = (type, files) => {
    const node = LiteGraph.createNode(type);
    g.add(node);
    node.pos = [60, 60 + made.length * 160];
    for (const [name, patterns] of Object.entries(files)) {
      const w = widgetOf(node, name);
      const choice = T.pickFile(w?.options?.values ?? [], patterns);
      if (w && choice != null) w.value = choice;
    }
    made.push(node);
  };
  if (!candidates("MODEL").length) make("UNETLoader", { unet_name: [/kontext/i, /flux/i] });
  if (!candidates("CLIP").length) make("DualCLIPLoader", { clip_name1: [/clip_l/i], clip_name2: [/t5xxl/i], type: [/^flux$/] });
  if (!candidates("VAE").length) make("VAELoader", { vae_name: [/^ae\./i, /flux/i] });
  say(made.length ? `Added ${made.map((n) => n.title).join(", ")}: check their files.` : "The graph already has a model, text encoders and a VAE.");
  graphChanged();
}

// ---- ComfyUI's events ------------------------------------------------------------------------------------

function liveTurn(id) {
  const node = graph().getNodeById(Number(id));
  return node?.type === T.TURN_TYPE ? node : null;
}

function listen() {
  api.addEventListener("execution_start", ({ detail }) => tracker.executionStart(detail));
  api.addEventListener("executing", ({ detail }) => {
    tracker.executing(detail);
    refresh();
  });
  api.addEventListener("progress", ({ detail }) => {
    const id = tracker.progress(detail);
    if (id != null) showProgress(id);
  });
  api.addEventListener("executed", ({ detail }) => {
    const result = tracker.executed(detail);
    const node = result && liveTurn(result.id);
    const had = node?.properties?.[T.STATE_KEY]?.image;
    if (node && (result.fresh || had?.filename !== result.image.filename)) {
      saveResult(node, { image: result.image, ms: result.ms, at: Date.now() });
      graphChanged();
    } else refresh();
  });
  api.addEventListener("execution_error", ({ detail }) => {
    const { id, error } = tracker.error(detail);
    const node = liveTurn(id);
    if (node) saveResult(node, { error });
    graphChanged();
  });
  api.addEventListener("execution_interrupted", ({ detail }) => {
    const { id, error } = tracker.interrupted(detail);
    const node = liveTurn(id);
    if (node) saveResult(node, { error });
    graphChanged();
  });
  api.addEventListener("execution_success", ({ detail }) => {
    tracker.success(detail);
    refresh();
  });
  // Any edit on the canvas (a turn deleted, rewired, a workflow opened) reaches the panel through this.
  api.addEventListener("graphChanged", () => refresh());
}

// ---- the panel -------------------------------------------------------------------------------------------

const STYLE = `
.kx-panel { display: flex; flex-direction: column; height: 100%; gap: 8px; padding: 8px; box-sizing: border-box;
  color: var(--fg-color); font-size: 13px; }
.kx-panel h3 { margin: 0; font-size: 15px; }
.kx-sources { display: grid; grid-template-columns: auto 1fr; gap: 4px 6px; align-items: center; }
.kx-panel select, .kx-panel input, .kx-panel textarea { background: var(--comfy-input-bg); color: var(--input-text);
  border: 1px solid var(--border-color); border-radius: 4px; padding: 3px 4px; font: inherit; min-width: 0; }
.kx-settings { display: flex; gap: 4px 10px; align-items: center; flex-wrap: wrap; }
.kx-settings span { white-space: nowrap; }
.kx-settings input { width: 52px; }
.kx-thread { flex: 1; overflow-y: auto; display: flex; flex-direction: column; gap: 8px; min-height: 120px; }
.kx-card { border: 1px solid var(--border-color); border-radius: 6px; padding: 6px; cursor: pointer;
  background: var(--comfy-menu-bg); }
.kx-card.kx-active { border-color: #4a9eff; box-shadow: 0 0 0 1px #4a9eff; }
.kx-card.kx-ahead { opacity: 0.55; }
.kx-card img { display: block; width: 100%; height: auto; max-height: 180px; object-fit: contain; margin: 4px auto;
  border-radius: 4px; }
.kx-instruction { font-weight: 600; white-space: pre-wrap; }
.kx-meta { opacity: 0.7; font-size: 11px; display: flex; gap: 8px; align-items: center; flex-wrap: wrap; }
.kx-branch button { padding: 0 5px; }
.kx-error { color: #ff6b6b; white-space: pre-wrap; font-size: 12px; }
.kx-bar { height: 4px; background: var(--border-color); border-radius: 2px; overflow: hidden; margin: 4px 0; }
.kx-bar > div { height: 100%; background: #4a9eff; width: 0; }
.kx-drop { border: 2px dashed var(--border-color); border-radius: 6px; padding: 16px; text-align: center; }
.kx-drop.kx-over { border-color: #4a9eff; }
.kx-actions { display: flex; gap: 4px; flex-wrap: wrap; }
.kx-panel button { background: var(--comfy-input-bg); color: var(--input-text); border: 1px solid var(--border-color);
  border-radius: 4px; padding: 3px 8px; cursor: pointer; font: inherit; }
.kx-panel button:disabled { opacity: 0.4; cursor: default; }
.kx-compose textarea { width: 100%; box-sizing: border-box; resize: vertical; }
.kx-notice { color: #ffb347; min-height: 1em; font-size: 12px; }
`;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (v != null && v !== false) node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c != null));
  return node;
}

const viewURL = (ref) => api.apiURL(`/view?${T.viewQuery(ref)}`);

function mount(container) {
  // Vue calls the tab's render from a ref callback, possibly more than once and before the element is in the
  // document: build once per element, refresh otherwise.
  if (container === root && container.querySelector(".kx-panel")) return refresh();
  root = container;
  container.style.height = "100%";
  if (!document.getElementById("kx-style")) document.head.append(el("style", { id: "kx-style" }, STYLE));
  const file = el("input", { type: "file", accept: "image/*", hidden: true,
                             onchange: (e) => { useImage(e.target.files[0]); e.target.value = ""; } });
  const text = el("textarea", { rows: 3, class: "kx-input", placeholder: "Describe an edit, e.g. make it dusk (Enter sends, Shift+Enter: new line)" });
  text.addEventListener("keydown", (e) => {
    e.stopPropagation(); // ComfyUI's shortcuts must not fire while typing
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      if (send(text.value)) text.value = "";
    }
  });
  const panel = el("div", { class: "kx-panel" },
    el("h3", {}, "Kontext Edit"),
    el("div", { class: "kx-sources" }),
    el("div", { class: "kx-settings" }),
    el("div", { class: "kx-thread" }),
    el("div", { class: "kx-compose" }, text),
    el("div", { class: "kx-actions" },
      el("button", { class: "kx-send", onclick: () => { if (send(text.value)) text.value = ""; } }, "Send"),
      el("button", { class: "kx-undo", title: "Remove the newest turn of the active branch", onclick: undo }, "Undo"),
      el("button", { class: "kx-again", title: "Run the active turn's instruction again with a new seed (a new branch)", onclick: again }, "Again"),
      el("button", { class: "kx-save", title: "Download the active turn's image", onclick: save }, "Save image"),
      el("button", { class: "kx-pick", title: "Start a new conversation from an image", onclick: () => file.click() }, "New image"),
      el("button", { class: "kx-stop", title: "Stop the running turn (ComfyUI's interrupt)", onclick: stop }, "Stop"),
      file),
    el("div", { class: "kx-notice" }, notice));
  panel.addEventListener("dragover", (e) => { e.preventDefault(); e.stopPropagation(); });
  panel.addEventListener("drop", (e) => {
    e.preventDefault();
    e.stopPropagation(); // ComfyUI would open the dropped file as a workflow
    useImage(e.dataTransfer?.files?.[0]);
  });
  container.replaceChildren(panel);
  refresh();
}

function sourceRow(kind, label, activeNode) {
  const list = candidates(kind);
  const chosen = chosenSource(kind, activeNode);
  const select = el("select", { class: `kx-source-${kind.toLowerCase()}`,
                                onchange: (e) => { picks[kind] = e.target.value; } },
    ...list.map((c) => el("option", { value: `${c.id}:${c.slot}`, selected: c === chosen }, c.label)));
  if (!list.length) select.append(el("option", { value: "" }, `no ${kind} in the graph`));
  return [el("label", {}, label), select];
}

function settingsRow(activeNode) {
  const s = settingsFor(activeNode);
  const keep = (key, parse) => (e) => { settings = { ...settingsFor(activeNode), [key]: parse(e.target.value) }; };
  return [
    el("span", {}, el("label", {}, "Steps "), el("input", { class: "kx-steps", type: "number", min: 1, max: 100, value: s.steps, onchange: keep("steps", Number) })),
    el("span", {}, el("label", {}, "Guidance "), el("input", { class: "kx-guidance", type: "number", min: 0, max: 10, step: 0.1, value: s.guidance, onchange: keep("guidance", Number) })),
    el("select", { class: "kx-resize", onchange: keep("resize", String) },
      el("option", { value: "kontext", selected: s.resize === "kontext" }, "Kontext size"),
      el("option", { value: "keep", selected: s.resize === "keep" }, "keep size")),
  ];
}

function sourceCard(g, imageFrom) {
  const node = g.getNodeById(imageFrom);
  const value = widgetOf(node, "image")?.value;
  return el("div", { class: "kx-card kx-source" },
    value ? el("img", { src: viewURL(T.imageRef(value)), alt: "source image" }) : null,
    el("div", { class: "kx-meta" }, value ? `Source: ${value}` : `Source: ${node?.title ?? "?"} #${imageFrom}`));
}

function turnCard(tree, item) {
  const { turn, number, active, ahead, branch } = item;
  const live = tracker.state(turn.id);
  const running = live && (live.status === "queued" || live.status === "running");
  const meta = [`seed ${turn.seed}`];
  if (turn.ms != null) meta.push(T.formatSeconds(turn.ms));
  if (turn.at) meta.push(new Date(turn.at).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }));
  const step = (dir) => (e) => { e.stopPropagation(); activate(T.switchBranch(tree, turn.id, dir)); };
  const switcher = branch.count > 1 ? el("span", { class: "kx-branch" },
    el("button", { class: "kx-prev", onclick: step(-1) }, "‹"), ` ${branch.index + 1}/${branch.count} `,
    el("button", { class: "kx-next", onclick: step(1) }, "›")) : null;
  let body = null;
  if (running) {
    const pct = live.max ? Math.round((100 * live.value) / live.max) : 0;
    body = el("div", {}, el("div", { class: "kx-bar" }, el("div", { style: `width:${pct}%` })),
      el("div", { class: "kx-status kx-meta" }, live.status === "queued" ? "queued" : live.max ? `step ${live.value}/${live.max}` : "running"));
  } else if (turn.error) {
    body = el("div", { class: "kx-error" }, turn.error);
  } else if (turn.image) {
    const img = el("img", { src: viewURL(turn.image), alt: turn.instruction, class: "kx-result" });
    // Previews live in ComfyUI's temp folder, emptied when it restarts; the same turn (same seed) makes it again.
    const rerun = (e) => { e.stopPropagation(); const node = liveTurn(turn.id); if (node) queueTurn(node); };
    img.addEventListener("error", () => img.replaceWith(el("div", { class: "kx-meta kx-gone" },
      "ComfyUI no longer has this image (it restarted). ", el("button", { class: "kx-rerun", onclick: rerun }, "Run it again"))));
    body = img;
  } else {
    body = el("div", { class: "kx-meta" }, "not run yet");
  }
  return el("div", { class: `kx-card kx-turn${active ? " kx-active" : ""}${ahead ? " kx-ahead" : ""}`, "data-turn": turn.id,
                     title: "Make this the active turn: the next instruction continues from it", onclick: () => activate(turn.id) },
    el("div", { class: "kx-instruction" }, `${number}. ${turn.instruction}`),
    body,
    el("div", { class: "kx-meta" }, meta.join(" · "), switcher));
}

function showProgress(id) {
  const live = tracker.state(id);
  const card = root?.querySelector(`[data-turn="${id}"]`);
  const bar = card?.querySelector(".kx-bar > div");
  if (!bar || !live?.max) return refresh();
  bar.style.width = `${Math.round((100 * live.value) / live.max)}%`;
  const status = card.querySelector(".kx-status");
  if (status) status.textContent = `step ${live.value}/${live.max}`;
}

// Each part is rebuilt only when what it shows changed: ComfyUI reports graph changes on pointer events, and a
// card replaced between pointerdown and pointerup would swallow the click.
const shown = new WeakMap();
function update(part, what, build) {
  const key = JSON.stringify(what);
  if (shown.get(part) === key) return false;
  shown.set(part, key);
  part.replaceChildren(...build());
  return true;
}

function refresh() {
  if (!root || !graph()) return;
  const { g, tree, state } = readThread();
  const activeNode = state.active != null ? g.getNodeById(state.active) : null;
  const kinds = [["MODEL", "Model"], ["CLIP", "Text encoders"], ["VAE", "VAE"]];
  update(root.querySelector(".kx-sources"), kinds.map(([k]) => [candidates(k), chosenSource(k, activeNode)]), () => [
    ...kinds.flatMap(([kind, label]) => sourceRow(kind, label, activeNode)),
    el("span"), el("button", { class: "kx-loaders", title: "Add ComfyUI's usual FLUX loaders for what the graph lacks", onclick: addLoaders }, "Add loaders")]);
  update(root.querySelector(".kx-settings"), settingsFor(activeNode), () => settingsRow(activeNode));
  const items = T.threadView(tree, state.active);
  const first = items[0]?.turn.imageFrom ?? state.source;
  const firstNode = first != null ? g.getNodeById(first) : null;
  const thread = root.querySelector(".kx-thread");
  const rebuilt = update(thread, [first, widgetOf(firstNode, "image")?.value, items.map((i) => [i, tracker.state(i.turn.id)?.status])], () => [
    firstNode ? sourceCard(g, first) : el("div", { class: "kx-drop" }, "Drop an image here, or ",
      el("button", { onclick: () => root.querySelector("input[type=file]").click() }, "pick one")),
    ...items.map((item) => turnCard(tree, item))]);
  const active = rebuilt && thread.querySelector(".kx-active");
  if (active) { // in view now, and again once its image has its height
    active.scrollIntoView({ block: "nearest" });
    active.querySelector("img")?.addEventListener("load", () => active.scrollIntoView({ block: "nearest" }));
  }
  const activeTurn = tree.byId.get(state.active);
  root.querySelector(".kx-undo").disabled = !items.length;
  root.querySelector(".kx-again").disabled = !activeTurn;
  root.querySelector(".kx-save").disabled = !activeTurn?.image;
  root.querySelector(".kx-stop").disabled = !tracker.busyPrompts().length;
}

app.registerExtension({
  name: "KontextTRT.EditChat",
  async setup() {
    listen();
    app.extensionManager.registerSidebarTab({
      id: TAB_ID, icon: "pi pi-comments", title: "Kontext Edit", label: "Kontext Edit",
      tooltip: "Kontext Edit: edit an image like a conversation", type: "custom",
      render: (container) => mount(container),
      destroy: () => { root = null; },
    });
  },
  async afterConfigureGraph() {
    settings = null; // another workflow: its turns' settings and sources apply
    for (const kind of T.SOURCE_KINDS) delete picks[kind];
    refresh();
  },
});

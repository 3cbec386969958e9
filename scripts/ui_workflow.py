"""ComfyUI's UI-format workflow (what the frontend saves and what comfyui-workflow-templates ships) to the API
format ComfyUI's /prompt and PromptExecutor take.

Hand-written because only the frontend has this converter (graphToPrompt, in its JavaScript bundle); neither
ComfyUI nor any Python package offers one. It does what graphToPrompt does for the nodes a template holds:
widgets_values mapped onto each node class's widget inputs in INPUT_TYPES order (skipping the frontend's own
control_after_generate value after a seed, and the upload/refresh button values an image input adds at the end),
links to inputs, subgraphs expanded (inner node ids "outer:inner", as the frontend writes them), bypassed nodes
(mode 4) passed through to their input of the same type, muted nodes (mode 2) and notes dropped, reroutes followed.
"""
from __future__ import annotations

BYPASS, MUTED = 4, 2
NOTES = {"Note", "MarkdownNote"}  # frontend-only, no inputs or outputs
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}


def widget_inputs(cls) -> list[tuple[str, dict]]:
    """The inputs the frontend shows as widgets, in the order it saves their values."""
    spec = cls.INPUT_TYPES()
    out = []
    for section in ("required", "optional"):
        for name, s in spec.get(section, {}).items():
            typ, opts = s[0], (s[1] if len(s) > 1 and isinstance(s[1], dict) else {})
            if (isinstance(typ, (list, tuple)) or typ in WIDGET_TYPES) and not opts.get("forceInput"):
                out.append((name, opts))
    return out


def widget_values(node: dict, cls) -> dict:
    values = list(node.get("widgets_values") or [])
    if isinstance(node.get("widgets_values"), dict):
        raise ValueError(f"node {node['id']} ({node['type']}): widgets_values is a dict; expected the list ComfyUI's "
                         "frontend saves for core-style nodes")
    out, i, buttons = {}, 0, False
    for name, opts in widget_inputs(cls):
        if i >= len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected one for "
                             f"widget {name!r} (widgets: {[n for n, _ in widget_inputs(cls)]})")
        out[name] = values[i]
        i += 1
        if (opts.get("control_after_generate") or name in ("seed", "noise_seed")) and i < len(values) \
                and values[i] in CONTROL_VALUES:
            i += 1
        buttons |= bool(opts.get("image_upload") or opts.get("remote"))
    if i < len(values) and not buttons:
        raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, expected {i} for widgets "
                         f"{list(out)}: {values}")
    return out


def _links(graph: dict) -> dict:
    """link id -> (origin node id, origin slot), from either the list form (top level) or the dict form (subgraphs)."""
    out = {}
    for link in graph.get("links", []):
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            out[link[0]] = (link[1], link[2])
    return out


class _Expansion:
    """One graph (the workflow, or one instance of a subgraph) with how its subgraph inputs are bound."""

    def __init__(self, converter, graph: dict, prefix: str, bound_inputs: dict):
        self.c, self.graph, self.prefix, self.bound = converter, graph, prefix, bound_inputs
        self.nodes = {n["id"]: n for n in graph["nodes"]}
        self.links = _links(graph)
        self.inner: dict = {}  # subgraph node id -> its _Expansion

    def source(self, link_id):
        """What feeds a link: ("node", api id, slot), ("value", v), or None (nothing: muted/bypassed to nothing)."""
        if link_id is None:
            return None
        origin, slot = self.links[link_id]
        if origin == -10:  # this subgraph's input node
            return self.bound.get(slot)
        node = self.nodes[origin]
        if node.get("mode") == MUTED:
            return None
        if node.get("mode") == BYPASS:
            return self.source(_passthrough(node, slot))
        if node["type"] == "Reroute":
            return self.source(node["inputs"][0].get("link"))
        if node["type"] in self.c.subgraphs:
            return self.expand(node).output(slot)
        return ("node", self.prefix + str(origin), slot)

    def output(self, slot):
        for link in self.graph.get("links", []):
            if isinstance(link, dict) and link["target_id"] == -20 and link["target_slot"] == slot:
                return self.source(link["id"])
        return None

    def expand(self, node: dict) -> "_Expansion":
        if node["id"] in self.inner:
            return self.inner[node["id"]]
        sub = self.c.subgraphs[node["type"]]
        names = [i["name"] for i in sub["inputs"]]
        bound = {}
        for inp in node.get("inputs", []):
            if inp["name"] in names and inp.get("link") is not None:
                bound[names.index(inp["name"])] = self.source(inp["link"])
        # Promoted widgets: the instance's widgets_values are the values of its proxyWidgets, less the frontend's
        # control_after_generate (which it saves nowhere on the instance).
        proxies = [p for p in node.get("properties", {}).get("proxyWidgets", []) if p[1] != "control_after_generate"]
        values = list(node.get("widgets_values") or [])
        if len(values) != len(proxies):
            raise ValueError(f"subgraph node {node['id']} ({sub.get('name')}): {len(values)} widget values for "
                             f"{len(proxies)} promoted widgets {proxies}")
        overrides = {}
        for (target, widget), value in zip(proxies, values):
            if str(target) == "-1":
                bound.setdefault(names.index(widget), ("value", value))
            else:
                overrides[(int(target), widget)] = value
        inner = self.inner[node["id"]] = _Expansion(self.c, sub, f"{self.prefix}{node['id']}:", bound)
        inner.overrides = overrides
        inner.emit()
        return inner

    overrides: dict = {}

    def emit(self):
        for node in self.graph["nodes"]:
            if node.get("mode") in (MUTED, BYPASS) or node["type"] in NOTES or node["type"] == "Reroute":
                continue
            if node["type"] in self.c.subgraphs:
                self.expand(node)
                continue
            cls = self.c.classes.get(node["type"])
            if cls is None:
                raise ValueError(f"node {node['id']}: type {node['type']!r} is not a node this ComfyUI has")
            inputs = widget_values(node, cls)
            inputs.update({w: v for (nid, w), v in self.overrides.items() if nid == node["id"]})
            for inp in node.get("inputs", []):
                src = self.source(inp.get("link"))
                if src is None:
                    continue  # unconnected (or fed by a muted node): the widget's own value, or absent
                inputs[inp["name"]] = src[1] if src[0] == "value" else [src[1], src[2]]
            self.c.api[self.prefix + str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                                          "_meta": {"title": node.get("title", node["type"])}}


def _passthrough(node: dict, slot: int):
    """The link a bypassed node's output `slot` passes on: its input of the output's type, the same slot first."""
    want = node["outputs"][slot]["type"]
    inputs = node.get("inputs", [])
    order = ([inputs[slot]] if slot < len(inputs) else []) + inputs
    for inp in order:
        if inp.get("type") == want and inp.get("link") is not None:
            return inp["link"]
    return None


class _Converter:
    def __init__(self, workflow: dict, classes: dict):
        self.classes = classes
        self.subgraphs = {s["id"]: s for s in workflow.get("definitions", {}).get("subgraphs", [])}
        self.api: dict = {}


def ui_to_api(workflow: dict, classes: dict | None = None) -> dict:
    """API-format prompt of a UI-format workflow. classes: node id -> class (ComfyUI's nodes.NODE_CLASS_MAPPINGS)."""
    if "nodes" not in workflow or "links" not in workflow:
        raise ValueError(f"workflow: expected ComfyUI's UI format (keys 'nodes' and 'links'), got keys {sorted(workflow)}")
    if classes is None:
        import nodes

        classes = nodes.NODE_CLASS_MAPPINGS
    c = _Converter(workflow, classes)
    _Expansion(c, workflow, "", {}).emit()
    return c.api

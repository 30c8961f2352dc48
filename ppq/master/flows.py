"""The master's side of workflows: the plain data of ``push_workflow`` checked and turned into
the records ``FlowStore.push_workflow`` stores (ppq/store/flows.py).

The data is nested dicts and lists::

    {"chain": [step, ...]}                          each step after the previous, given its result
    {"group": [step, ...]}                          all at once, results listed in order
    {"chord": {"group": [...]} | [...], "callback": step, "on_error": "fail" | "run"}
    {"func": ..., "module": ..., "args": [...], ..., "immutable": false}   a leaf: push_task's fields

Every node gets an id made here: the root a fresh one (or the caller's ``workflow_id``), the
others ``<root>.<n>``, n counting the nodes depth first. A chord is stored as a node of kind
``chord`` holding its group and its callback, run as a chain of the two.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from .. import codec
from ..config import LimitsConfig
from ..errors import CodecError, InvalidTaskError
from ..task import check_push, check_task_id, decode_body, new_id, show
from ..workflow import MAX_DEPTH, ON_ERROR, STEP_REFUSED

# Deepest nesting of lists and dicts in a workflow's data: each level of nodes is a dict and its
# list of steps, a leaf's fields a dict, its args a list holding what the codec packs.
MAX_DATA_DEPTH = 2 * (MAX_DEPTH + 1) + 2 + codec.MAX_DEPTH
# What a value other than a string, bytes, list or dict counts for in measure().
SCALAR_BYTES = 9
# Shapes of steps a Builder remembers (see Builder.leaf).
MAX_TEMPLATES = 1000
NONE = type(None)
# The longest a root id may be: its nodes' ids add '.' and up to 6 digits within the 64 a task id may have.
MAX_ROOT_ID = 56


class FlowRecord(NamedTuple):
    """One node to store: its id, its record's fields (flat name/value pairs) and its children's ids."""

    id: str
    fields: list[Any]
    kids: list[str]


def measure(data: Any, max_bytes: int, max_depth: int = MAX_DATA_DEPTH) -> int:
    """The size of a workflow's data in bytes, about as msgpack would pack it (a string or
    bytes its length plus one, any other value SCALAR_BYTES, a list or dict one more per
    item), counting a sub-object as often as it appears, walked with its own stack. Before
    anything else is made of the data: InvalidTaskError as soon as the count passes
    ``max_bytes`` or the nesting ``max_depth`` (a cycle is nested without end)."""
    total = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    pop, push = stack.pop, stack.append
    scalars = (int, float, bool, NONE)
    while stack and total <= max_bytes:
        item, depth = pop()
        kind = item.__class__
        if kind is dict or (kind is not list and kind is not tuple and isinstance(item, Mapping)):
            children: Iterable[Any] = item.values()
            for key in item:
                if key.__class__ is str:
                    total += len(key) + 1
                else:
                    push((key, depth + 1))
        elif kind is list or kind is tuple or isinstance(item, (list, tuple)):
            children = item
        else:
            total += len(item) + 1 if isinstance(item, (str, bytes, bytearray)) else SCALAR_BYTES
            continue
        if depth >= max_depth:
            raise InvalidTaskError(f"workflow: the data nests deeper than {max_depth} levels of lists and dicts")
        total += 1 + len(item)
        for child in children:
            kind = child.__class__
            if kind is str:
                total += len(child) + 1
            elif kind in scalars:
                total += SCALAR_BYTES
            else:
                push((child, depth + 1))
    if total > max_bytes:
        raise InvalidTaskError(f"workflow: its data is more than {max_bytes} bytes (limits.max_message), its "
                               f"shared parts counted each time they appear")
    return total


def carry_layout(body: bytes, args: Any = None, kwargs: Any = None) -> str:
    """Where a leaf's body holds what ``workflow.lua`` needs to put the previous result first
    among its arguments: "H S E n" (the body's first H bytes are everything before the
    parameters; body[S:E] are the n args' items; body[E:] the kwargs' msgpack).

    ``args`` and ``kwargs``, when the push gave them as a list and a dict (or None), spare
    decoding the body."""
    if isinstance(args, (list, tuple)) and isinstance(kwargs, (dict, type(None))):
        args, kwargs = list(args), kwargs or {}
        size = len(codec.pack([args, kwargs]))
    else:
        params = decode_body(body)["params"]
        args, kwargs = codec.decode_parameters(params)
        size = len(params)
    bin_header = 2 if size < 0x100 else (3 if size < 0x10000 else 5)
    head = len(body) - size - bin_header
    start = head + bin_header + 1 + (1 if len(args) < 16 else (3 if len(args) < 0x10000 else 5))
    end = len(body) - len(codec.pack(kwargs))
    return f"{head} {start} {end} {len(args)}"


class Builder:
    """Walks one workflow's data, checking every node; collects the records to store."""

    def __init__(self, root_id: str, queue_index: int, queue_indexes: Iterable[int], limits: LimitsConfig,
                 ttl: int) -> None:
        self.root_id = root_id
        self.queue_index = queue_index
        self.queue_indexes = list(queue_indexes)
        self.limits = limits
        self.ttl = ttl
        self.records: list[FlowRecord] = []
        self.by_id: dict[str, FlowRecord] = {}
        # The shape of a step (its options but its arguments) -> (its body's head, its options as fields).
        self.templates: dict[Any, tuple[bytes, list[Any]]] = {}
        self.leaves = 0
        self.count = 0

    def _id(self) -> str:
        self.count += 1
        return self.root_id if self.count == 1 else f"{self.root_id}.{self.count - 1}"

    def node(self, data: Any, path: str, parent: str, pos: int, depth: int) -> str:
        """Check ``data`` (found at ``path``) and record it and its subtree; return its id."""
        if not isinstance(data, Mapping):
            raise InvalidTaskError(f"{path or 'workflow'}: a step must be a dict ({{'chain': [...]}}, "
                                   f"{{'group': [...]}}, {{'chord': ..., 'callback': ...}} or a task's fields), "
                                   f"got {show(data)}")
        kinds = [k for k in ("chain", "group", "chord") if k in data]
        if not kinds:
            return self.leaf(data, path, parent, pos)
        kind = kinds[0]
        if depth > MAX_DEPTH:
            raise InvalidTaskError(f"{path or 'workflow'}: workflows nest {depth} deep here, more than the limit "
                                   f"of {MAX_DEPTH}")
        allowed = {"chord", "callback", "on_error"} if kind == "chord" else {kind}
        extra = sorted(show(k) for k in data if k not in allowed)
        if len(kinds) > 1 or extra:
            raise InvalidTaskError(f"{path or 'workflow'}: a {kind} node holds only {', '.join(sorted(allowed))}; "
                                   f"got {', '.join(extra or kinds)}")
        if self.count - self.leaves >= self.limits.max_workflow_tasks:
            # Chains of one step wrapped in groups of one add nodes, not tasks: held to the same number.
            raise InvalidTaskError(f"workflow: more than {self.limits.max_workflow_tasks} chains, groups and chords "
                                   f"(limits.max_workflow_tasks)")
        node_id = self._id()
        here = f"{path}.{kind}" if path else kind
        fields: list[Any] = ["kind", kind, "state", "pending", "ttl", self.ttl]
        if parent:
            fields += ["parent", parent, "pos", pos]
        record = FlowRecord(node_id, fields, [])
        self.records.append(record)
        self.by_id[node_id] = record
        if kind == "chord":
            on_error = data.get("on_error", "fail")
            if on_error not in ON_ERROR:
                raise InvalidTaskError(f"{here}.on_error: must be one of {', '.join(ON_ERROR)}, got {show(on_error)}")
            header = data["chord"]
            if isinstance(header, (list, tuple)):
                header = {"group": header}
            if not (isinstance(header, Mapping) and set(header) == {"group"}):
                raise InvalidTaskError(f"{here}: must be a group ({{'group': [...]}}) or a list of steps")
            if "callback" not in data:
                raise InvalidTaskError(f"{here}: a chord needs a callback")
            group_id = self.node(header, here, node_id, 1, depth + 1)
            if on_error == "run":
                self.by_id[group_id].fields.extend(["onerr", "run"])
            record.kids.extend([group_id, self.node(data["callback"], f"{here}.callback", node_id, 2, depth + 1)])
            fields += ["n", 2, "next", 0]
            return node_id
        steps = data[kind]
        if not isinstance(steps, (list, tuple)) or not steps:
            raise InvalidTaskError(f"{here}: must be a non-empty list of steps, got {show(steps)}")
        for i, step in enumerate(steps):
            record.kids.append(self.node(step, f"{here}[{i}]", node_id, i + 1, depth + 1))
        fields += ["n", len(steps)]
        # maxr: the most bytes a group's results may hold together (they make one value).
        fields += ["next", 0] if kind == "chain" else ["remaining", len(steps), "maxr", self.limits.max_message]
        return node_id

    def leaf(self, data: Mapping[str, Any], path: str, parent: str, pos: int) -> str:
        self.leaves += 1
        if self.leaves > self.limits.max_workflow_tasks:
            raise InvalidTaskError(f"workflow: more than {self.limits.max_workflow_tasks} tasks "
                                   f"(limits.max_workflow_tasks)")
        where = path or "workflow"
        options = dict(data)
        immutable = options.pop("immutable", False)
        if not isinstance(immutable, bool):
            raise InvalidTaskError(f"{where}: immutable must be true or false, got {show(immutable)}")
        for name in STEP_REFUSED:
            if options.get(name) is not None and not (name == "queue_index" and options[name] == self.queue_index):
                raise InvalidTaskError(f"{where}: {name} is not an option of a workflow step (a workflow lives in "
                                       f"one queue_index, given to push_workflow, and its ids are made by the master)")
            options.pop(name, None)
        if options.get("parameters") is not None and codec.is_pickle(codec.from_wire(options["parameters"])):
            raise InvalidTaskError(f"{where}: parameters are pickled; workflows pass msgpack parameters only")
        node_id = self._id()
        options["queue_index"] = self.queue_index
        args, kwargs = options.get("args"), options.get("kwargs")
        plain = options.get("parameters") is None and args.__class__ is list and kwargs.__class__ in (dict, NONE)
        # Steps alike but for their arguments (a big group's) are checked once: the first is
        # checked whole, the others reuse its body's head and options.
        shape: Any = None
        if plain:
            try:
                shape = tuple(sorted((k, v) for k, v in options.items() if k not in ("args", "kwargs")))
                hash(shape)
            except TypeError:
                shape = None
        template = self.templates.get(shape) if shape is not None else None
        try:
            if template is not None:
                head, extra = template
                body = head + codec.pack(self._parameters(args, kwargs))
            else:
                spec = check_push(dict(options, task_id=node_id), self.queue_indexes, self.limits, False)
                body = spec.body
                extra = [x for pair in spec.options for x in pair]
                if shape is not None and len(self.templates) < MAX_TEMPLATES:
                    head = body[:len(body) - len(codec.pack(self._parameters(args, kwargs)))]
                    self.templates[shape] = (head, extra)
        except InvalidTaskError as exc:
            raise type(exc)(f"{where}: {exc}") from None
        fields: list[Any] = ["state", "pending", "body", body, "wf", parent or "", "pos", pos]
        if not parent:
            fields[4:8] = []
        if not immutable:
            # maxp: the most bytes its parameters may hold once the previous result is put first.
            fields += ["take", carry_layout(body, args if options.get("parameters") is None else None, kwargs),
                       "maxp", self.limits.max_payload]
        fields += extra
        record = FlowRecord(node_id, fields, [])
        self.records.append(record)
        self.by_id[node_id] = record
        return node_id

    def _parameters(self, args: Any, kwargs: Any) -> bytes:
        """A step's parameters as task.check_push packs a list of args and a dict of kwargs."""
        if kwargs and not all(isinstance(k, str) for k in kwargs):
            raise InvalidTaskError("kwargs must be a dict with string keys")
        try:
            params = codec.pack([args, kwargs or {}])
        except CodecError as exc:
            raise CodecError(f"args/kwargs: {exc}") from None
        if len(params) > self.limits.max_payload:
            raise InvalidTaskError(f"parameters are {len(params)} bytes, more than the limit of "
                                   f"{self.limits.max_payload}")
        return params

    def start(self, node_id: str) -> None:
        """Mark what runs as soon as the workflow is stored (state 'pending' is a record's
        first field/value pair after 'kind'): the root, the first step of each chain or chord
        started, every member of each group started; those leaves are 'queued'."""
        record = self.by_id[node_id]
        fields = record.fields
        at = fields.index("state") + 1
        if not record.kids:
            fields[at] = "queued"
            return
        fields[at] = "running"
        if fields[1] == "group":
            for kid in record.kids:
                self.start(kid)
        else:
            fields[fields.index("next") + 1] = 1
            self.start(record.kids[0])


def build(data: Any, queue_index: int, queue_indexes: Iterable[int], limits: LimitsConfig, ttl: int,
          workflow_id: Any = None) -> list[FlowRecord]:
    """The records of a workflow, its root first; InvalidTaskError naming the path of a bad node."""
    if workflow_id is None:
        root = new_id()
    else:
        root = check_task_id(workflow_id, "workflow_id")
        if len(root) > MAX_ROOT_ID:
            raise InvalidTaskError(f"workflow_id is longer than {MAX_ROOT_ID} characters")
    measure(data, limits.max_message)
    builder = Builder(root, queue_index, queue_indexes, limits, ttl)
    builder.start(builder.node(data, "", "", 0, 1))
    return builder.records

"""What each operator accepts: one spec per op, written once.

A spec lists the op's parameters (with the Python type each must have) and
its rules, each a condition over the parameters, an error type and a message.
From that one list come three checkers, generated when this module loads:

- ``check_types``: the public wrappers' isinstance checks, so a ``None`` or a
  list where a tensor belongs is a TypeError naming the argument;
- ``validate``: the eager call's check, all conditions as ONE expression (a
  closure and a ``torch._check`` per condition cost more than the kernel
  launch), running the detailed checks only to build the message once it fails;
- ``check_symbolic``: a ``torch._check_type``/``torch._check_value`` per rule,
  for the fakes and decompositions, where shapes may be symbolic;
- ``decided``: whether every size rule (below) holds with no symbol involved.

A size rule (``sizes=True``) guards memory or id capacity with an inequality
between sizes (``start + n <= len(load)``, ``num_physical <= 128`` for int8
ids). A guard on it would vanish where a compiled caller drops Dynamo's guards
(vLLM does), and Inductor compiles backed sizes' runtime assertions out, so
``check_symbolic`` never guards on one: it raises when the rule is false for the sizes
being traced, passes when it holds with no symbol involved, and otherwise
leaves it undecided. An op with an undecided size rule stays whole in the
compiled graph (``_library.py``), and its implementation's ``validate``
checks the real sizes on every call.

Rules read metadata only (dtype, shape, strides, device): no host sync, and
the same answer in the eager call and in the fake at trace time. Generating
the checkers (as ``dataclasses`` does its methods) is what keeps a condition
from being written twice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx.experimental.symbolic_shapes import is_concrete_bool, statically_known_true

TENSOR, OPTIONAL_TENSOR, INT = "a torch.Tensor", "a torch.Tensor or None", "an int"

# uint8 is left out: it cannot hold -1, the id of an invalid slot.
ID_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)
_ID_CAPACITY = {torch.int8: 2**7, torch.int16: 2**15}  # ids 0 .. capacity - 1, besides -1
NARROW_ID_DTYPES = tuple(_ID_CAPACITY)


def id_capacity(dtype: torch.dtype) -> int | None:
    """The number of physical ids ``dtype`` holds (ids 0 .. capacity - 1), None for int32 and int64."""
    return _ID_CAPACITY.get(dtype)


def ids_hold(dtype: torch.dtype, count) -> bool:
    """Whether ``dtype`` holds -1 and every id below ``count``. Static for the wide
    dtypes, so no guard on a symbolic count; narrow ones compare the count."""
    capacity = _ID_CAPACITY.get(dtype)
    return True if capacity is None else count <= capacity


def show(value) -> str:
    """A size as the caller passed it: a symbolic size shows its value at trace time
    (where torch would print the symbol, e.g. ``s44``)."""
    if isinstance(value, torch.SymInt):
        node = value.node
        # SymNode.has_hint/hint: the same on torch 2.11 through 2.14; an
        # unbacked size has no hint and shows as its symbol.
        if getattr(node, "has_hint", lambda: False)():
            return str(node.hint)
    return str(value)


def shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(show(s) for s in t.shape) + ("," if t.dim() == 1 else "") + ")"


def dtype_note(dtype: torch.dtype) -> str:
    return ": uint8 cannot hold -1, the id of an invalid slot" if dtype == torch.uint8 else ""


@dataclass(frozen=True)
class Rule:
    condition: str  # a Python expression over the op's parameter names
    error: type[Exception]  # TypeError (a dtype) or ValueError (a shape, a device, a value)
    message: str  # the body of an f-string over the same names
    sizes: bool = False  # a size rule: checked without a guard (see the module's docstring)


def known(condition) -> bool:
    """Whether ``condition`` holds for every size the graph may see. Only a
    condition free of symbols qualifies: a symbolic one proved from ranges or
    earlier guards (a backed size is >= 2 only while its guard stands) would
    not survive dropped guards."""
    return is_concrete_bool(condition) and bool(condition)


def check_sizes(check, condition, message) -> None:
    """``check`` (torch._check_type or _check_value) on a size rule, never guarding:
    a symbolic condition raises only when it is false for this very call (known
    false from the sizes traced now); otherwise the op stays whole and validates
    on each call."""
    if not is_concrete_bool(condition):
        if not statically_known_true(torch.sym_not(condition)):
            return
        condition = False
    check(bool(condition), message)


def same_device(name: str, first: str, optional: bool = False) -> Rule:
    condition = f"{name}.device == {first}.device"
    return Rule(
        f"{name} is None or {condition}" if optional else condition,
        ValueError,
        f"{name} is on {{{name}.device}} but {first} is on {{{first}.device}}; all tensors must be on one device",
    )


def scalar(name: str, dtype: str, optional: bool = False) -> list[Rule]:
    prefix = f"{name} is None or " if optional else ""
    return [
        Rule(f"{prefix}{name}.dtype == torch.{dtype}", TypeError,
             f"{name} must be a torch.{dtype} scalar tensor, got dtype {{{name}.dtype}}"),
        Rule(f"{prefix}{name}.numel() == 1", ValueError,
             f"{name} must hold exactly one element, got shape {{shape({name})}}"),
    ]


MAP_RULES = [
    Rule("topk_ids.dtype in ID_DTYPES", TypeError,
         "topk_ids must be an integer tensor, got {topk_ids.dtype} "
         "(expected int8, int16, int32 or int64{dtype_note(topk_ids.dtype)})"),
    Rule("topk_ids.dim() == 2", ValueError, "topk_ids must be 2-D [tokens, k], got shape {shape(topk_ids)}"),
    Rule("logical_to_physical_map.dtype == torch.int64", TypeError,
         "logical_to_physical_map must be int64, got {logical_to_physical_map.dtype}"),
    Rule("logical_to_physical_map.dim() == 2", ValueError,
         "logical_to_physical_map must be 2-D [num_logical, slots], got shape {shape(logical_to_physical_map)}"),
    Rule("logical_replica_count.dtype in (torch.int32, torch.int64)", TypeError,
         "logical_replica_count must be int32 or int64, got {logical_replica_count.dtype}"),
    Rule("logical_replica_count.dim() == 1 and logical_replica_count.shape[0] == logical_to_physical_map.shape[0]",
         ValueError,
         "logical_replica_count must be 1-D with one entry per row of logical_to_physical_map "
         "({show(logical_to_physical_map.shape[0])}), got shape {shape(logical_replica_count)}"),
    same_device("logical_to_physical_map", "topk_ids"),
    same_device("logical_replica_count", "topk_ids"),
]

LOAD_RULES = [
    Rule("expert_load_view.dtype == torch.int32", TypeError,
         "expert_load_view must be int32, got {expert_load_view.dtype}"),
    Rule("expert_load_view.dim() == 1", ValueError,
         "expert_load_view must be 1-D [num_physical_experts], got shape {shape(expert_load_view)}"),
    Rule("expert_load_view.is_contiguous()", ValueError,
         "expert_load_view must be contiguous, got stride {expert_load_view.stride()}"),
    *scalar("record_enabled", "bool"),
]


def capacity_rule(count: str, what: str) -> Rule:
    """``topk_ids``' dtype must hold every physical id below ``count`` (and -1):
    returned ids that wrapped would disagree with the load."""
    return Rule(
        f"ids_hold(topk_ids.dtype, {count})",
        TypeError,
        f"topk_ids of dtype {{topk_ids.dtype}} cannot hold every physical id: {what} ids up to "
        f"{{show({count} - 1)}}; use a wider dtype (int16, int32 or int64)",
        sizes=True,
    )


class Spec:
    """The parameters and rules of one op, and the three checkers made from them."""

    def __init__(self, op: str, params: tuple[tuple[str, str], ...], rules: list[Rule]):
        self.op, self.params, self.rules = op, params, rules
        names = ", ".join(name for name, _ in params)
        def check_line(r: Rule) -> str:
            checker = f"_check_{'type' if r.error is TypeError else 'value'}"
            if r.sizes:
                return f"    check_sizes({checker}, {r.condition}, lambda: f{r.message!r})\n"
            return f"    {checker}({r.condition}, lambda: f{r.message!r})\n"

        checks = "".join(check_line(r) for r in rules)
        size_rules = [r.condition for r in rules if r.sizes] or ["True"]
        kinds = [(name, kind, _isinstance(name, kind)) for name, kind in params]
        raises = "".join(
            f"        if not {test}:\n            raise TypeError({op + ': ' + name + ' must be ' + kind + ', got '!r}"
            f" + type({name}).__name__)\n"
            for name, kind, test in kinds
        )
        # A Python int past int64 would fail in the dispatcher's argument parsing, naming no rule.
        for name, kind, _ in kinds:
            if kind == INT:
                raises += (f"        if not {_in_int64(name)}:\n            raise ValueError("
                           f"f{op + ': ' + name + ' must fit in int64 (-2**63 to 2**63 - 1), got {' + name + '}'!r})\n")
        kinds = [(name, kind, f"({test} and {_in_int64(name)})" if kind == INT else test)
                 for name, kind, test in kinds]
        source = (
            f"def check_symbolic({names}):\n{checks}"
            f"def validate({names}):\n    if not ({' and '.join(f'({r.condition})' for r in rules)}):\n"
            f"        check_symbolic({names})\n"
            f"def check_types({names}):\n    if not ({' and '.join(test for _, _, test in kinds)}):\n{raises}"
            f"def decided({names}):\n    return {' and '.join(f'known({c})' for c in size_rules)}\n"
        )
        namespace = {
            "torch": torch, "ID_DTYPES": ID_DTYPES, "ids_hold": ids_hold, "show": show, "shape": shape,
            "dtype_note": dtype_note, "known": known, "check_sizes": check_sizes,
            "_check_type": torch._check_type, "_check_value": torch._check_value,
        }
        exec(compile(source, f"<eplb_compile.ops {op} validation>", "exec"), namespace)  # noqa: S102
        self.check_symbolic, self.validate = namespace["check_symbolic"], namespace["validate"]
        self.check_types, self.decided = namespace["check_types"], namespace["decided"]


def _in_int64(name: str) -> str:
    # Not while Dynamo traces: a symbolic int is an int64, and the test would only add guards.
    return f"(torch.compiler.is_compiling() or isinstance({name}, torch.SymInt) or -2**63 <= {name} < 2**63)"


def _isinstance(name: str, kind: str) -> str:
    return {
        TENSOR: f"isinstance({name}, torch.Tensor)",
        OPTIONAL_TENSOR: f"({name} is None or isinstance({name}, torch.Tensor))",
        INT: f"(isinstance({name}, (int, torch.SymInt)) and not isinstance({name}, bool))",
    }[kind]


_MAP_PARAMS = (("topk_ids", TENSOR), ("logical_to_physical_map", TENSOR), ("logical_replica_count", TENSOR))

MAP_AND_RECORD = Spec(
    "map_and_record",
    (*_MAP_PARAMS, ("expert_load_view", TENSOR), ("record_enabled", TENSOR), ("num_unpadded_tokens", OPTIONAL_TENSOR)),
    [
        *MAP_RULES,
        *LOAD_RULES,
        capacity_rule("expert_load_view.shape[0]", "expert_load_view has {show(expert_load_view.shape[0])} "
                      "physical experts, so"),
        *scalar("num_unpadded_tokens", "int32", optional=True),
        same_device("expert_load_view", "topk_ids"),
        same_device("record_enabled", "topk_ids"),
        same_device("num_unpadded_tokens", "topk_ids", optional=True),
    ],
)

MAP_ONLY = Spec(
    "map_only",
    (*_MAP_PARAMS, ("num_unpadded_tokens", OPTIONAL_TENSOR)),
    [
        *MAP_RULES,
        # No load here: a valid map names each physical expert once, so its
        # entry count bounds the physical ids (metadata only, no map values read).
        # An invalid, sparse map's id past the dtype comes back -1 (_torch_impl.fit_ids).
        capacity_rule("logical_to_physical_map.shape[0] * logical_to_physical_map.shape[1]",
                      "logical_to_physical_map has {show(logical_to_physical_map.shape[0])} x "
                      "{show(logical_to_physical_map.shape[1])} entries, so"),
        *scalar("num_unpadded_tokens", "int32", optional=True),
        same_device("num_unpadded_tokens", "topk_ids", optional=True),
    ],
)

RECORD_COUNTS = Spec(
    "record_counts",
    (("expert_load_view", TENSOR), ("counts", TENSOR), ("start", INT), ("record_enabled", TENSOR)),
    [
        *LOAD_RULES,
        Rule("counts.dtype == torch.int32", TypeError, "counts must be int32, got {counts.dtype}"),
        Rule("counts.dim() == 1", ValueError, "counts must be 1-D, got shape {shape(counts)}"),
        Rule("start >= 0", ValueError, "start must be >= 0, got {show(start)}", sizes=True),
        Rule("start + counts.shape[0] <= expert_load_view.shape[0]", ValueError,
             "counts of length {show(counts.shape[0])} starting at start={show(start)} overrun "
             "expert_load_view of length {show(expert_load_view.shape[0])}", sizes=True),
        same_device("counts", "expert_load_view"),
        same_device("record_enabled", "expert_load_view"),
    ],
)

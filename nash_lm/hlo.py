"""The collective inventory of a compiled program: what each device sends and receives per step, from HLO text.

What this module owns: parsing the optimised HLO module that `jax.jit(...).lower(...).compile().as_text()`
prints (any backend: the 8 fake CPU devices of the tests, a deviceless TPU topology), and listing its
collectives with where they run and how often.

  * `parse(text) -> Module`: the computations, their instructions (name, result shape, opcode, operands,
    called computations, `op_name` metadata, `backend_config`) and the entry computation.
  * `loops(module) -> {while name: Loop}`: every `while` with its body, its `op_name` (the JAX named scope
    path, e.g. '.../sample_y_y2/while') and its trip count: `known_trip_count` when XLA recorded one, else
    an upper bound derived from the condition: ceil((limit - init) / step) for `ROOT induction < limit` with
    the start and the body's increment read where they are constants (0 and 1 otherwise); for a compare fused
    elsewhere in the condition, the largest LT-compared constant minus a constant start; None when no such
    compare is found.
  * `inventory(text_or_compiled, trip_counts=None) -> [Collective]`: every all-gather, all-reduce,
    reduce-scatter, all-to-all, ragged-all-to-all, collective-permute and collective-broadcast, synchronous or
    asynchronous (an `X-start`/`X-done` pair is one collective, listed at the start, sized by the done's
    result; `async-start` wrappers are followed into the computation they call). For each: its kind, result
    shape and bytes per execution (the per-device result: the whole gathered array for an all-gather, the
    shard for a reduce-scatter), the computation it sits in, the enclosing while loops (outermost first,
    reached transitively through fusions, calls, conditionals and nested loops) and `count`, its executions
    per step: the sum over call paths from the entry of the product of the loops' trip counts. A loop with
    no known count uses its derived bound (`exact` is then False), or `trip_counts[while name]` when given.
  * `summary(collectives, within=None) -> dict`: totals (count, bytes per execution, bytes per step =
    sum(bytes x count)) inside and outside loops, per kind; `within` (a regular expression) restricts
    "inside" to loops whose op_name matches it, e.g. r'sample_y_y2/while$' for the decode loops.

The byte counts are those of the HLO shapes, per device (SPMD programs are per-partition). Layout and tiling
annotations (`{1,0:T(8,128)}`) are ignored: bytes = elements x element size, sub-byte types rounded up.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Iterable, Mapping

__all__ = ["Instruction", "Module", "Loop", "Collective", "parse", "loops", "inventory", "summary",
           "shape_bytes", "shape_dims", "COLLECTIVE_KINDS"]

COLLECTIVE_KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all",
                    "collective-permute", "collective-broadcast")
_COLLECTIVE_RE = re.compile(r"^(%s)(-start)?$" % "|".join(map(re.escape, COLLECTIVE_KINDS)))
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]+m[0-9]+[a-z]*)?)\[([0-9,]*)\]")
_NAME_RE = re.compile(r"%([\w.\-]+)")
_CALL_KEYS = ("calls", "body", "condition", "to_apply", "branch_computations", "true_computation",
              "false_computation", "called_computations")
_ATTR_RE = re.compile(r"\b(%s)=(\{[^}]*\}|%%[\w.\-]+)" % "|".join(_CALL_KEYS))
_OP_NAME_RE = re.compile(r'op_name="([^"]*)"')

_BITS = {"pred": 8, "token": 0, "c64": 64, "c128": 128}


def _element_bits(dtype: str) -> int:
    if dtype in _BITS:
        return _BITS[dtype]
    m = re.match(r"[a-z]+([0-9]+)", dtype)
    if not m:
        raise ValueError(f"unknown HLO element type {dtype!r}")
    return int(m.group(1))


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """[(element type, dims), ...] of every array in an HLO shape (one for an array, several for a tuple)."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY_RE.findall(shape)]


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape (an array or a tuple of arrays): elements x element size, layouts ignored."""
    return sum(math.ceil(math.prod(dims) * _element_bits(t) / 8) for t, dims in shape_dims(shape))


# ------------------------------------------------------------------------------------------------ parsing


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    calls: tuple[tuple[str, str], ...]  # (attribute, computation), e.g. ('body', 'region_0')
    op_name: str
    attrs: str  # the text after the operand list (backend_config, replica groups, ...)
    args: str = ""  # the raw text inside the operand parentheses (a constant's literal, a parameter's index)

    def int_literal(self) -> int | None:
        """The value of a scalar integer constant, else None."""
        if self.opcode == "constant" and re.fullmatch(r"[su](8|16|32|64)\[\]", self.shape.split("{")[0]):
            if re.fullmatch(r"-?\d+", self.args.strip()):
                return int(self.args)
        return None

    def parameter_index(self) -> int | None:
        return int(self.args) if self.opcode == "parameter" and self.args.strip().isdigit() else None


@dataclasses.dataclass
class Module:
    computations: dict[str, list[Instruction]]
    entry: str

    def instruction(self, name: str) -> Instruction | None:
        if not hasattr(self, "_by_name"):
            self._by_name = {i.name: i for insts in self.computations.values() for i in insts}
        return self._by_name.get(name)


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group that opens at text[start] == '('."""
    depth = 0
    for j in range(start, len(text)):
        c = text[j]
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]}")


def _parse_instruction(line: str) -> Instruction | None:
    s = line.strip()
    if s.startswith("ROOT "):
        s = s[5:]
    if not s.startswith("%") or " = " not in s:
        return None
    name, rest = s[1:].split(" = ", 1)
    if rest.startswith("("):
        end = _balanced(rest, 0)
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    m = re.match(r"([\w\-]+)\(", rest)
    if not m:
        return None
    opcode = m.group(1)
    end = _balanced(rest, m.end() - 1)
    args = rest[m.end():end - 1]
    operands = tuple(_NAME_RE.findall(args))
    attrs = rest[end:]
    calls = []
    for key, value in _ATTR_RE.findall(attrs):
        calls.extend((key, c) for c in _NAME_RE.findall(value))
    op = _OP_NAME_RE.search(attrs)
    return Instruction(name, shape, opcode, operands, tuple(calls), op.group(1) if op else "", attrs, args)


def parse(text: str) -> Module:
    """The computations of an HLO module's text (one `HloModule`)."""
    comps: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if not line:
            continue
        if line[0] not in " \t}" and line.rstrip().endswith("{") and "(" in line:
            head = line.split("(", 1)[0].split()
            is_entry = head[0] == "ENTRY"
            current = head[-1].lstrip("%")
            comps[current] = []
            if is_entry:
                entry = current
            continue
        if line.startswith("}"):
            current = None
            continue
        if current is not None:
            inst = _parse_instruction(line)
            if inst is not None:
                comps[current].append(inst)
    if entry is None:
        raise ValueError("HLO text has no ENTRY computation")
    return Module(comps, entry)


# -------------------------------------------------------------------------------------------------- loops


@dataclasses.dataclass(frozen=True)
class Loop:
    name: str                 # the while instruction
    computation: str          # the computation it sits in
    body: str
    condition: str
    op_name: str
    trip_count: int | None    # XLA's known_trip_count
    trip_bound: int | None    # derived upper bound when trip_count is None

    @property
    def trips(self) -> int | None:
        return self.trip_count if self.trip_count is not None else self.trip_bound


def _constants(module: Module, comp: str) -> dict[str, int]:
    """Scalar integer constants of a computation, by instruction name."""
    return {i.name: v for i in module.computations.get(comp, ()) if (v := i.int_literal()) is not None}


def _limits_in(module: Module, comp: str, depth: int = 0) -> list[int]:
    """Constants compared with direction=LT (operand 1) in `comp` and the computations it calls."""
    out = []
    consts = _constants(module, comp)
    for inst in module.computations.get(comp, ()):
        if inst.opcode == "compare" and "direction=LT" in inst.attrs and len(inst.operands) == 2:
            if inst.operands[1] in consts:
                out.append(consts[inst.operands[1]])
        if depth < 4:
            for _, callee in inst.calls:
                out.extend(_limits_in(module, callee, depth + 1))
        if inst.opcode == "fusion" and depth < 4:  # a constant passed into the fused compare as a parameter
            callee = next((c for k, c in inst.calls if k == "calls"), None)
            params = [i for i in module.computations.get(callee, ()) if i.opcode == "parameter"]
            for p in params:
                idx = p.parameter_index()
                if idx is not None and idx < len(inst.operands) and inst.operands[idx] in consts:
                    users = [u for u in module.computations[callee]
                             if u.opcode == "compare" and "direction=LT" in u.attrs and len(u.operands) == 2
                             and u.operands[1] == p.name]
                    out.extend(consts[inst.operands[idx]] for _ in users)
    return out


def loops(module: Module) -> dict[str, Loop]:
    """Every while loop of the module, by instruction name."""
    out = {}
    for comp, insts in module.computations.items():
        for inst in insts:
            if inst.opcode != "while":
                continue
            body = next((c for k, c in inst.calls if k == "body"), None)
            cond = next((c for k, c in inst.calls if k == "condition"), None)
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', inst.attrs)
            trip = int(m.group(1)) if m else None
            bound = None
            if trip is None and cond is not None:
                bound = _direct_bound(module, comp, inst, cond, body)
            if trip is None and bound is None and cond is not None:
                limits = _limits_in(module, cond)
                if limits:
                    bound = max(limits)
                    init = re.search(r'"known_init_step":\{"init":"(-?\d+)","step":"(\d+)"\}', inst.attrs)
                    if init:
                        bound = max(0, math.ceil((bound - int(init.group(1))) / max(1, int(init.group(2)))))
                    else:
                        start = _loop_start(module, comp, inst, cond)
                        if start is not None:
                            bound = max(0, bound - start)
            out[inst.name] = Loop(inst.name, comp, body, cond, inst.op_name, trip, bound)
    return out


def _gte_index(inst: Instruction | None) -> int | None:
    if inst is None or inst.opcode != "get-tuple-element":
        return None
    m = re.search(r"index=(\d+)", inst.attrs)
    return int(m.group(1)) if m else None


def _trace_constant(module: Module, comp: str, name: str) -> int | None:
    """The value of `name` in `comp` if it is a scalar integer constant, possibly behind copies/bitcasts."""
    insts = {i.name: i for i in module.computations.get(comp, ())}
    for _ in range(8):
        i = insts.get(name)
        if i is None:
            return None
        if i.opcode == "constant":
            return i.int_literal()
        if i.opcode not in ("copy", "bitcast") or not i.operands:
            return None
        name = i.operands[0]
    return None


def _direct_bound(module: Module, comp: str, inst: Instruction, cond: str, body: str | None) -> int | None:
    """ceil((limit - init) / step) for a condition `ROOT compare(gte(param, k), constant limit), LT` whose
    induction variable k starts at a constant (the while's init tuple) and grows by a constant in the body
    (`add(gte(param, k), constant step)` at index k of the body's root tuple); init 0 / step 1 when those are
    not constants (the bound then assumes a non-negative start and a step of at least 1)."""
    cinsts = {i.name: i for i in module.computations.get(cond, ())}
    root = module.computations.get(cond, [None])[-1]
    if root is None or root.opcode != "compare" or "direction=LT" not in root.attrs or len(root.operands) != 2:
        return None
    k = _gte_index(cinsts.get(root.operands[0]))
    limit = _trace_constant(module, cond, root.operands[1])
    if k is None or limit is None:
        return None
    init = 0
    tup = next((t for t in module.computations[comp] if t.name == (inst.operands or [None])[0]), None)
    if tup is not None and tup.opcode == "tuple" and k < len(tup.operands):
        v = _trace_constant(module, comp, tup.operands[k])
        init = v if v is not None else 0
    step = 1
    binsts = {i.name: i for i in module.computations.get(body, ())}
    broot = module.computations.get(body, [None])[-1]
    if broot is not None and broot.opcode == "tuple" and k < len(broot.operands):
        add = binsts.get(broot.operands[k])
        if add is not None and add.opcode == "add" and len(add.operands) == 2:
            for a, b in (add.operands, add.operands[::-1]):
                if _gte_index(binsts.get(a)) == k and (c := _trace_constant(module, body, b)) is not None and c > 0:
                    step = c
    return max(0, math.ceil((limit - init) / step))


def _loop_start(module: Module, comp: str, inst: Instruction, cond: str) -> int | None:
    """Initial value of the induction variable when the while's init tuple holds a constant at the index the
    condition compares (found through the condition's get-tuple-element feeding the LT compare)."""
    gte_idx = set()
    for c in module.computations.get(cond, ()):
        if c.opcode == "get-tuple-element":
            m = re.search(r"index=(\d+)", c.attrs)
            if m and c.shape.split("{")[0] in ("s32[]", "s64[]", "u32[]"):
                gte_idx.add(int(m.group(1)))
    if len(gte_idx) != 1 or not inst.operands:
        return None
    (idx,) = gte_idx
    tup = next((t for t in module.computations[comp] if t.name == inst.operands[0]), None)
    if tup is None or tup.opcode != "tuple" or idx >= len(tup.operands):
        return None
    consts = _constants(module, comp)
    name = tup.operands[idx]
    insts = {i.name: i for i in module.computations[comp]}
    for _ in range(8):
        if name in consts:
            return consts[name]
        i = insts.get(name)
        if i is None or i.opcode != "copy" or not i.operands:
            return None
        name = i.operands[0]
    return None


# ------------------------------------------------------------------------------------------------ inventory


@dataclasses.dataclass(frozen=True)
class Collective:
    name: str
    kind: str                  # one of COLLECTIVE_KINDS
    is_async: bool             # an X-start / X-done pair
    shape: str                 # result shape (the done's for an async pair)
    bytes: int                 # per-device bytes of one execution's result
    computation: str
    loops: tuple[Loop, ...]    # enclosing while loops, outermost first (first call path from the entry)
    count: int                 # executions per step (sum over call paths of the products of trip counts)
    exact: bool                # False when a loop's count is a derived bound or unknown (taken as 1)
    op_name: str
    replica_groups: str

    @property
    def in_loop(self) -> bool:
        return bool(self.loops)

    @property
    def total_bytes(self) -> int:
        return self.bytes * self.count

    def inside(self, pattern: str) -> bool:
        """Whether one of the enclosing loops has an op_name matching the regular expression `pattern`."""
        return any(re.search(pattern, l.op_name) for l in self.loops)


def _text_of(x: Any) -> str:
    if isinstance(x, str):
        return x
    if hasattr(x, "as_text"):
        return x.as_text()
    raise TypeError(f"expected HLO text or a compiled executable, got {type(x).__name__}")


def inventory(hlo: Any, trip_counts: Mapping[str, int] | None = None) -> list[Collective]:
    """Every collective of a compiled program (`compiled` or `compiled.as_text()`); see the module docstring."""
    text = _text_of(hlo)
    module = parse(text)
    all_loops = loops(module)
    trip_counts = dict(trip_counts or {})

    def trips(loop: Loop) -> tuple[int, bool]:
        if loop.name in trip_counts:
            return int(trip_counts[loop.name]), True
        if loop.trip_count is not None:
            return loop.trip_count, True
        return (loop.trip_bound, False) if loop.trip_bound is not None else (1, False)

    # Call graph: callee -> [(caller, multiplicity, exact, loop or None)]. Reduction bodies (to_apply) are
    # scalar computations applied per element; they hold no collectives and are not followed.
    callers: dict[str, list[tuple[str, int, bool, Loop | None]]] = {}
    for comp, insts in module.computations.items():
        for inst in insts:
            for key, callee in inst.calls:
                if key == "to_apply" or callee not in module.computations:
                    continue
                if inst.opcode == "while" and key in ("body", "condition"):
                    loop = all_loops[inst.name]
                    n, ex = trips(loop)
                    callers.setdefault(callee, []).append((comp, n, ex, loop if key == "body" else None))
                else:
                    callers.setdefault(callee, []).append((comp, 1, True, None))

    memo: dict[str, tuple[int, bool, tuple[Loop, ...]]] = {}

    def executions(comp: str, stack=()) -> tuple[int, bool, tuple[Loop, ...]]:
        """(executions per step, exact, loops on the first path from the entry) of a computation."""
        if comp == module.entry:
            return 1, True, ()
        if comp in memo:
            return memo[comp]
        if comp in stack:  # not expected in HLO (no recursion); guard anyway
            return 0, False, ()
        total, exact, path = 0, True, None
        for caller, mult, ex, loop in callers.get(comp, ()):
            n, e, p = executions(caller, stack + (comp,))
            total += n * mult
            exact = exact and e and ex
            if path is None and n:
                path = p + ((loop,) if loop is not None else ())
        memo[comp] = (total, exact, path or ())
        return memo[comp]

    done_of = {}
    for insts in module.computations.values():
        for inst in insts:
            if inst.opcode.endswith("-done") and inst.operands:
                done_of[inst.operands[0]] = inst

    out = []
    for comp, insts in module.computations.items():
        for inst in insts:
            m = _COLLECTIVE_RE.match(inst.opcode)
            if not m:
                continue
            is_async = bool(m.group(2))
            shape = inst.shape
            if is_async:
                done = done_of.get(inst.name)
                if done is not None:
                    shape = done.shape
                else:  # the last array of the start's tuple is the result (a done is expected, though)
                    arrays = _ARRAY_RE.findall(shape)
                    shape = "%s[%s]" % arrays[-1] if arrays else shape
            n, exact, path = executions(comp)
            rg = re.search(r"replica_groups=(\S+(?: \{[^}]*\})?)", inst.attrs)
            out.append(Collective(inst.name, m.group(1), is_async, shape, shape_bytes(shape), comp, path, n,
                                  exact, inst.op_name, rg.group(1).rstrip(",") if rg else ""))
    return out


def summary(collectives: Iterable[Collective], within: str | None = None) -> dict:
    """Totals of an inventory: {'inside': {...}, 'outside': {...}, 'total': {...}}, each with `count`
    (collective instructions), `executions` (per step), `bytes_per_step` (sum of bytes x count) and the same
    per kind under 'by_kind'. `within`: only loops whose op_name matches this regular expression count as
    'inside' (default: any while loop)."""
    def empty():
        return {"count": 0, "executions": 0, "bytes_per_step": 0, "exact": True, "by_kind": {}}

    out = {"inside": empty(), "outside": empty(), "total": empty()}
    for c in collectives:
        inside = c.inside(within) if within is not None else c.in_loop
        for key in ("inside" if inside else "outside", "total"):
            d = out[key]
            d["count"] += 1
            d["executions"] += c.count
            d["bytes_per_step"] += c.total_bytes
            d["exact"] = d["exact"] and c.exact
            k = d["by_kind"].setdefault(c.kind, {"count": 0, "executions": 0, "bytes_per_step": 0})
            k["count"] += 1
            k["executions"] += c.count
            k["bytes_per_step"] += c.total_bytes
    return out


DECODE_LOOP = r"/decode/while$"  # the op name of `nash_lm.sampling`'s decode loops


def decode_trip_counts(text, pattern: str = DECODE_LOOP) -> dict:
    """{while name: maximum trips} of the sampler's chained decode loops (op names matching `pattern`): they may
    stop early at EOS, so XLA records no trip count; each is counted at its maximum, its derived bound (the limit
    of its condition: 128, 256, ...) minus the previous loop's."""
    decode = [l for l in loops(parse(text)).values()
              if l.trip_count is None and l.trip_bound is not None and re.search(pattern, l.op_name)]
    out, prev = {}, 0
    for l in sorted(decode, key=lambda l: l.trip_bound):
        out[l.name] = l.trip_bound - prev if l.trip_bound > prev else l.trip_bound
        prev = max(prev, l.trip_bound)
    return out

"""The HLO collective inventory on small programs whose collectives are known by hand: explicit all-gathers,
psums and psum_scatters inside and outside `lax.fori_loop`s of known length, nested loops, a data-dependent
`while_loop` and a hand-written async (TPU-style) HLO module. The expected byte counts come from the shapes
(elements x bytes per element), computed here independently of the module under test."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from nash_lm import hlo

N_DEV = 8


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((N_DEV,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:N_DEV])


def _compile(mesh, f, *args):
    sm = jax.shard_map(f, mesh=mesh, in_specs=(P("x"),) * len(args), out_specs=P("x"))
    shardings = tuple(NamedSharding(mesh, P("x")) for _ in args)
    return jax.jit(sm, in_shardings=shardings).lower(*args).compile()


def test_all_gather_in_fori_loop(mesh):
    """A loop-carried [8, 16] shard gathered to [64, 16] in each of 5 iterations, a psum after the loop."""
    rows, cols, trips = 8, 16, 5

    def f(x):  # x: this device's [rows, cols] block
        def body(i, x):
            full = jax.lax.all_gather(x, "x", tiled=True)  # [rows * N_DEV, cols], depends on the carry
            return x + jnp.mean(full) * 0.5
        x = jax.lax.fori_loop(0, trips, body, x)
        return x + jax.lax.psum(jnp.sum(x, axis=0, keepdims=True), "x")  # one all-reduce of [1, cols]

    c = _compile(mesh, f, jnp.ones((rows * N_DEV, cols), jnp.float32))
    inv = hlo.inventory(c)
    gathers = [x for x in inv if x.kind == "all-gather"]
    assert len(gathers) == 1
    g = gathers[0]
    assert g.bytes == rows * N_DEV * cols * 4
    assert g.in_loop and g.count == trips and g.exact
    assert [l.trip_count for l in g.loops] == [trips]
    reduces = [x for x in inv if x.kind == "all-reduce"]
    assert len(reduces) == 1 and not reduces[0].in_loop
    assert reduces[0].bytes == cols * 4 and reduces[0].count == 1
    s = hlo.summary(inv)
    assert s["inside"]["bytes_per_step"] == trips * rows * N_DEV * cols * 4
    assert s["outside"]["bytes_per_step"] == cols * 4
    assert s["total"]["bytes_per_step"] == trips * rows * N_DEV * cols * 4 + cols * 4


def test_nested_loops_multiply_trip_counts(mesh):
    """An int16 all-gather (2-byte elements; XLA:CPU would widen a bf16 one to f32) in an inner loop of 4 inside
    an outer loop of 3 (12 executions); a reduce-scatter (psum_scatter: the result is the shard) in the outer
    loop only (3 executions)."""
    rows, cols = 2, 32

    def f(x):
        def inner(j, x):
            full = jax.lax.all_gather(x.astype(jnp.int16), "x", tiled=True)  # [rows * N_DEV, cols] int16
            return x + jnp.mean(full.astype(jnp.float32))

        def outer(i, x):
            x = jax.lax.fori_loop(0, 4, inner, x)
            tiled = jnp.tile(x, (N_DEV, 1))  # [rows * N_DEV, cols]
            return x + jax.lax.psum_scatter(tiled, "x", scatter_dimension=0, tiled=True)  # -> [rows, cols]

        return jax.lax.fori_loop(0, 3, outer, x)

    c = _compile(mesh, f, jnp.ones((rows * N_DEV, cols), jnp.float32))
    inv = hlo.inventory(c)
    (g,) = [x for x in inv if x.kind == "all-gather"]
    assert g.bytes == rows * N_DEV * cols * 2 and g.count == 12 and len(g.loops) == 2
    assert sorted(l.trip_count for l in g.loops) == [3, 4]
    (rs,) = [x for x in inv if x.kind == "reduce-scatter"]
    assert rs.bytes == rows * cols * 4 and rs.count == 3 and [l.trip_count for l in rs.loops] == [3]
    assert hlo.summary(inv)["total"]["bytes_per_step"] == 12 * rows * N_DEV * cols * 2 + 3 * rows * cols * 4


def test_data_dependent_while_gets_a_bound(mesh):
    """A while loop that may stop early (`i < 7 and not converged`): XLA records no trip count, the inventory
    derives the bound 7 from the condition and marks the count inexact; `trip_counts` overrides it."""
    rows, cols = 4, 8

    def f(x):
        def cond(c):
            i, x = c
            return (i < 7) & (jnp.max(jnp.abs(x)) < 1e6)

        def body(c):
            i, x = c
            full = jax.lax.all_gather(x, "x", tiled=True)
            return i + 1, x * 1.5 + jnp.mean(full)

        return jax.lax.while_loop(cond, body, (jnp.int32(0), x))[1]

    c = _compile(mesh, f, jnp.ones((rows * N_DEV, cols), jnp.float32))
    inv = hlo.inventory(c)
    (g,) = [x for x in inv if x.kind == "all-gather"]
    (loop,) = g.loops
    assert loop.trip_count is None and loop.trip_bound == 7
    assert g.count == 7 and not g.exact
    assert g.bytes == rows * N_DEV * cols * 4
    (g2,) = [x for x in hlo.inventory(c, trip_counts={loop.name: 3}) if x.kind == "all-gather"]
    assert g2.count == 3 and g2.exact


# A hand-written module in the form XLA:TPU prints: an async all-gather pair (the start's result is the tuple
# (operand, result)), an async all-reduce inside a fusion called from a while body with known_trip_count 16,
# and tiled layouts with memory-space annotations.
_ASYNC_HLO = """HloModule m, entry_computation_layout={(bf16[128,256]{1,0})->bf16[1024,256]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner (p: f32[8,128]) -> f32[8,128] {
  %p = f32[8,128]{1,0:T(8,128)} parameter(0)
  %ars = f32[8,128]{1,0:T(8,128)S(1)} all-reduce-start(%p), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, to_apply=%add
  ROOT %ard = f32[8,128]{1,0:T(8,128)} all-reduce-done(%ars)
}

%body (t: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,128]{1,0} get-tuple-element(%t), index=1
  %one = s32[] constant(1)
  %i1 = s32[] add(%i, %one)
  %y = f32[8,128]{1,0} fusion(%x), kind=kCustom, calls=%inner, metadata={op_name="jit(f)/loop/while/body/psum"}
  ROOT %r = (s32[], f32[8,128]{1,0}) tuple(%i1, %y)
}

%cond (t: (s32[], f32[8,128])) -> pred[] {
  %t = (s32[], f32[8,128]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(16)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (w: bf16[128,256]) -> bf16[1024,256] {
  %w = bf16[128,256]{1,0:T(8,128)(2,1)} parameter(0)
  %ags = (bf16[128,256]{1,0:T(8,128)(2,1)}, bf16[1024,256]{1,0:T(8,128)(2,1)}) all-gather-start(%w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, metadata={op_name="jit(f)/gather"}
  %agd = bf16[1024,256]{1,0:T(8,128)(2,1)} all-gather-done(%ags)
  %zero = s32[] constant(0)
  %x0 = f32[8,128]{1,0} broadcast(%zero), dimensions={}
  %init = (s32[], f32[8,128]{1,0}) tuple(%zero, %x0)
  %loop = (s32[], f32[8,128]{1,0}) while(%init), condition=%cond, body=%body, metadata={op_name="jit(f)/loop/while"}, backend_config={"known_trip_count":{"n":"16"}}
  ROOT %out = bf16[1024,256]{1,0} copy(%agd)
}
"""


def test_async_pairs_and_fusions_in_hand_written_hlo():
    inv = {x.name: x for x in hlo.inventory(_ASYNC_HLO)}
    assert set(inv) == {"ags", "ars"}  # the -done halves are not separate collectives
    ag, ar = inv["ags"], inv["ars"]
    assert ag.kind == "all-gather" and ag.is_async and not ag.in_loop
    assert ag.bytes == 1024 * 256 * 2 and ag.count == 1  # the done's result, not the (operand, result) tuple
    assert ar.kind == "all-reduce" and ar.is_async and ar.computation == "inner"
    assert ar.count == 16 and ar.exact and ar.bytes == 8 * 128 * 4
    assert ar.inside(r"loop/while$") and not ag.inside(r"loop/while$")
    s = hlo.summary(inv.values(), within=r"loop/while$")
    assert s["inside"]["bytes_per_step"] == 16 * 8 * 128 * 4
    assert s["outside"]["by_kind"]["all-gather"]["bytes_per_step"] == 1024 * 256 * 2


def test_shape_bytes():
    assert hlo.shape_bytes("f32[2,3]{1,0}") == 24
    assert hlo.shape_bytes("bf16[4,128]{1,0:T(4,128)(2,1)S(1)}") == 4 * 128 * 2
    assert hlo.shape_bytes("(s32[], pred[5], f8e4m3fn[16])") == 4 + 5 + 16
    assert hlo.shape_bytes("s4[3]") == 2
    assert hlo.shape_bytes("f32[]") == 4


def test_bound_from_condition_start_and_step():
    """Without known_trip_count, the bound is ceil((limit - init) / step) from the condition's constant, the
    init tuple's constant and the body's increment: here init 0, step 2, limit 16 -> 8 executions; with init 5
    -> ceil(11 / 2) = 6."""
    text = (_ASYNC_HLO.replace(', backend_config={"known_trip_count":{"n":"16"}}', "")
            .replace("%one = s32[] constant(1)", "%one = s32[] constant(2)"))
    (loop,) = hlo.loops(hlo.parse(text)).values()
    assert loop.trip_count is None and loop.trip_bound == 8
    ar = next(x for x in hlo.inventory(text) if x.kind == "all-reduce")
    assert ar.count == 8 and not ar.exact
    text5 = text.replace("%init = (s32[], f32[8,128]{1,0}) tuple(%zero, %x0)",
                         "%five = s32[] constant(5)\n  %init = (s32[], f32[8,128]{1,0}) tuple(%five, %x0)")
    (loop5,) = hlo.loops(hlo.parse(text5)).values()
    assert loop5.trip_bound == 6

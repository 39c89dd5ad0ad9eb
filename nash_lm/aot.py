"""Ahead-of-time compilation of every stage of a pipeline for a TPU topology, on a machine without a TPU.

    python -m nash_lm.aot --config=configs/tiny.py --topology=v5e:2x2 [--config.x=v ...] [--out=aot.jsonl]

For each stage of the config's pipeline (a task job's `config.train`), the very program the trainer runs is
built and compiled through the same code (`nash_lm.train.spec.resolve` -> `inputs.StageInputs` with abstract
parameters -> `compile.StageProgram.lowered()`), for the devices of a TPU topology as libtpu names them (v4,
v5e, v5p, v6e, e.g. `v5e:4x4`; libtpu 0.0.52 comes with `pip install -e '.[tpu]'`, then run with
`JAX_PLATFORMS=cpu`) or, with `--topology=local`, for this machine's devices. One JSON line per
stage: per-chip argument / output / alias / temporary bytes from `memory_analysis()` against the chip's HBM,
the analytic FLOPs of a step (`nash_lm.train.algorithms.step_flops`), and every collective of the compiled
pieces (`nash_lm.hlo`: kind, bytes per step, whether inside the sampler's decode loops with their trip counts;
the weight-shaped all-gathers inside the decode loops counted on their own). A stage that does not fit exits 2
with one line naming the stage, the bytes it needs per chip and the chip's capacity (or, where the TPU compiler
itself refuses the program, its RESOURCE_EXHAUSTED message with the bytes); bad input is one line,
exit 2, as for `nash_lm.main`. Nothing is written but `--out`.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time

from absl import flags

from nash_lm import distributed
from nash_lm import main as main_lib  # its --config flag (and the one-line errors of a bad one) serve here too

GIB = 2**30
# HBM per chip (GiB) by topology prefix; published figures.
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}

_TOPOLOGY = flags.DEFINE_string("topology", None, "A TPU topology as libtpu names it (e.g. v5e:4x4), or 'local'.")
_OUT = flags.DEFINE_string("out", None, "Append the JSON lines to this file.")


def _fail(message: str):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def devices_of(topology: str):
    """The devices of a TPU topology (deviceless: libtpu compiles for them), or this machine's for 'local'."""
    import jax

    if topology == "local":
        return jax.devices(), None
    kind = topology.split(":", 1)[0]
    if kind not in HBM_GIB:
        raise ValueError(f"--topology: {topology!r}: expected one of {sorted(HBM_GIB)} followed by ':<shape>', "
                         f"e.g. v5e:4x4 (or 'local')")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices, HBM_GIB[kind] * GIB
    except Exception as e:  # libtpu missing, or a shape libtpu does not know
        raise ValueError(f"--topology: {topology!r}: libtpu cannot describe it ({str(e).strip().splitlines()[0]})"
                         ) from None


def _weight_shapes(params) -> set:
    """Shapes of the parameter matrices, whole and per layer (to recognise weight-sized all-gathers)."""
    import jax

    shapes = set()
    for leaf in jax.tree.leaves(params):
        dims = tuple(d for d in leaf.shape if d != 1)
        if len(dims) >= 2:
            shapes.add(dims)
            shapes.add(dims[1:])
    return shapes


def stage_report(spec, run, hbm_bytes):
    """One stage compiled; its JSON record."""
    import jax

    from nash_lm import hlo, parallel
    from nash_lm.data import synthetic
    from nash_lm.train import algorithms
    from nash_lm.train.compile import StageProgram
    from nash_lm.train.inputs import StageInputs

    inputs = StageInputs(spec, run, abstract=True)
    if spec.name in run.sources:  # records files: one tokenized row gives the shapes
        example = run.sources[spec.name]["train"].example()
    else:
        example = synthetic.dataset_for(spec.algorithm.data, run.data, "train")
    program = StageProgram(spec, run, inputs, example)
    t0 = time.time()
    with parallel.activate(run.mesh, run.rules):  # only now: eager work above must not target the topology
        try:
            pieces = [lowered.compile() for lowered in program.lowered()]
        except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that exceeds the HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            line = next((x for x in str(e).splitlines() if "RESOURCE_EXHAUSTED" in x), str(e)).strip()
            raise MemoryError(f"stage {spec.name}: does not fit {hbm_bytes / GIB if hbm_bytes else 0:.0f} GiB "
                              f"per chip ({line})") from None
    compile_s = time.time() - t0
    memory = {k: 0 for k in ("argument", "output", "alias", "temp")}
    collectives, weight_gathers = [], 0
    shapes = _weight_shapes(inputs.abstract_policy)
    for compiled in pieces:
        mem = compiled.memory_analysis()
        for k in memory:  # the pieces run one after the other: the largest of each is what a chip must hold
            memory[k] = max(memory[k], int(getattr(mem, f"{k}_size_in_bytes")))
        text = compiled.as_text()
        inv = hlo.inventory(text, trip_counts=hlo.decode_trip_counts(text))
        collectives += inv
        for c in inv:
            dims = hlo.shape_dims(c.shape)
            if (c.kind == "all-gather" and c.inside(hlo.DECODE_LOOP) and dims
                    and tuple(d for d in dims[0][1] if d != 1) in shapes):
                weight_gathers += c.total_bytes
    needed = memory["argument"] + memory["output"] - memory["alias"] + memory["temp"]
    summary = hlo.summary(collectives, within=hlo.DECODE_LOOP)
    judge = inputs.judge.kind if inputs.judge is not None else ""
    flops = algorithms.step_flops(spec.algorithm, spec.st, spec.model, run.data.prompt_len, run.data.response_len,
                                  judge)
    return {
        "stage": spec.name, "algorithm": spec.algorithm.name, "pieces": len(pieces), "chips": run.mesh.size,
        "mesh": dict(zip(run.mesh.axis_names, map(int, run.mesh.axis_sizes))), "compile_s": round(compile_s, 1),
        "memory_per_chip": memory, "needed_per_chip": needed, "hbm_per_chip": hbm_bytes,
        "fits": hbm_bytes is None or needed <= hbm_bytes, "analytic_flops_per_step": flops,
        "collectives": {k: {kk: summary[k][kk] for kk in ("count", "executions", "bytes_per_step", "exact",
                                                          "by_kind")} for k in ("inside", "outside", "total")},
        "weight_allgather_bytes_in_decode": weight_gathers,
        "params": int(sum(math.prod(x.shape) for x in jax.tree.leaves(inputs.abstract_policy))),
    }


def run(config, topology: str, out: str | None = None) -> list[dict]:
    """Every stage of `config`'s pipeline compiled for `topology`; the records (also printed, appended to `out`)."""
    from nash_lm.train import spec as spec_lib

    train = config if config.get("job") == "train" else config.get("train")
    if train is None:
        raise ValueError(f"config.job: {config.get('job')!r} has no training pipeline to compile")
    devices, hbm = devices_of(topology)
    with tempfile.TemporaryDirectory() as empty:  # a workdir that holds nothing: every input is abstract
        run_spec = spec_lib.resolve(train, empty, host_oracle=True, provided_data=True, devices=devices)
    records = []
    for spec in run_spec.stages.values():
        record = {"topology": topology, **stage_report(spec, run_spec, hbm)}
        line = json.dumps(record)
        print(line, flush=True)
        if out:
            distributed.append_line(out, line)
        records.append(record)
        if not record["fits"]:
            raise MemoryError(f"stage {spec.name}: needs {record['needed_per_chip'] / GIB:.2f} GiB per chip, "
                              f"{topology} has {hbm / GIB:.0f} GiB")
    return records


def main(argv=None):
    argv = list(sys.argv if argv is None else argv)
    try:
        flags.FLAGS(argv)
        config = main_lib.CONFIG.value
    except Exception as e:
        _fail(main_lib.flag_error(e, argv))
    if config is None or not _TOPOLOGY.value:
        _fail("--config and --topology are required (e.g. --config=configs/tiny.py --topology=v5e:2x2)")
    try:
        run(config, _TOPOLOGY.value, _OUT.value)
    except (ValueError, MemoryError) as e:
        _fail(str(e).strip().splitlines()[0])


if __name__ == "__main__":
    main()

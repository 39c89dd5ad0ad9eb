"""Whether the CPU benchmarks' compiled Nash-MD-PG step (bench/trl_workload.py's and bench/mfu.py's workloads, one
device, no mesh) is the same program with the default decode rules and with `decode_rules='training'` (None).

    PYTHONPATH=. python bench/decode_layout_same_program.py

Without a mesh `parallel.relayout` and `using_rules` are no-ops, so the two compiled texts should be identical.
"""
import dataclasses
import functools
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mfu  # noqa: E402
import nashmd_bench as nb  # noqa: E402


def main():
    for name, w0 in (("trl_workload", nb.Workload()), ("mfu", mfu.BIG)):
        texts = {}
        for rules in ("default", "training"):
            b = nb.build(dataclasses.replace(w0, decode_rules=rules))
            fn = functools.partial(nb.counted_step, b.w.hparams(), b.graphdef, b.judge, b.tx)
            batch = nb.make_batch(b, np.arange(b.w.batch))
            texts[rules] = jax.jit(fn, donate_argnums=0).lower(b.mut, b.frozen, batch).compile().as_text()
        digests = {k: hashlib.sha256(v.encode()).hexdigest()[:12] for k, v in texts.items()}
        same = texts["default"] == texts["training"]
        print(name, digests, "identical compiled programs" if same else "DIFFERENT programs")


if __name__ == "__main__":
    main()

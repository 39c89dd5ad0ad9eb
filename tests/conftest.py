"""Test set-up, applied before jax is imported anywhere.

- Eight fake CPU devices for the sharding tests; the CPU platform even where libtpu is installed (the TPU
  tests compile for deviceless topologies), and several processes may load libtpu at once.
- XLA's expensive CPU optimisation passes off: the test models are tiny, so compile time dominates, and the
  numbers the tests check do not depend on these passes. Benchmarks (bench/) run with the defaults.
"""
import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the test extra's jax[tpu]) takes a lock file per process; the deviceless TPU compiles of this process
# and of the subprocesses of tests/test_aot.py would otherwise refuse each other.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

"""Test set-up, applied before jax is imported anywhere.

- Eight fake CPU devices for the sharding tests.
- XLA's expensive CPU optimisation passes off: the test models are tiny, so compile time dominates, and the
  numbers the tests check do not depend on these passes. Benchmarks (bench/) run with the defaults.
"""
import os

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

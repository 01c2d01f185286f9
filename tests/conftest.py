"""Eight fake CPU devices for every test, set before JAX is imported anywhere."""

import os

# The tests' programs are small and run for a few steps, so compiling them is most of the suite's
# time; LLVM's -O0 compiles them about a third faster (tests/sharding_test.py and
# checkpoint_test.py: 107 s -> 72 s) and changes nothing the tests compare. Subprocesses the tests
# start (resumed runs, multi-process runs) inherit both flags.
os.environ["XLA_FLAGS"] = (
    "--xla_backend_optimization_level=0 "
    + os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8"
).strip()
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

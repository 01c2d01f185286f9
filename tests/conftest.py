"""Eight fake CPU devices for every test, set before JAX is imported anywhere."""

import os
import tempfile

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
# Many tests (and the subprocesses of resume and multi-process tests) compile the same small
# programs: a compilation cache shared by the workers compiles each once (suite ~14.4 -> ~11 min).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxllm-test-compilation-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

"""kosmos_jax.heap: freed memory stays in the process, unless the user set malloc up."""

import subprocess
import sys

from kosmos_jax import heap

# Mallocs, fills and frees a 256 MB block five times and prints the page
# faults of the last four: a fresh mapping faults its 65,536 pages in, a
# reused heap block none. (Through libc itself: numpy asks for huge pages.)
_CHILD = """
import ctypes, resource
from kosmos_jax import heap
print(heap.keep_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size, faults = 256 << 20, 0
for i in range(5):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
  if i:
    faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _run_child(**env):
  out = subprocess.run(
    [sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True, text=True
  ).stdout.split()
  return out[0] == "True", int(out[1])


def test_freed_memory_is_reused_without_faulting_it_in_again():
  applied, faults = _run_child(JAX_PLATFORMS="cpu")
  assert applied and faults < 1000


def test_glibc_defaults_fault_every_large_block_in_again():
  # The behaviour keep_freed_memory removes, and the opt-out: a MALLOC_*
  # variable of the user's own leaves glibc alone.
  applied, faults = _run_child(JAX_PLATFORMS="cpu", MALLOC_ARENA_MAX="8")
  assert not applied and faults > 4 * 60_000


def test_user_settings_are_left_alone():
  assert heap._user_configured({"MALLOC_ARENA_MAX": "2"})
  assert heap._user_configured({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
  assert not heap._user_configured({"PATH": "/usr/bin"})


def test_only_cpu_runs_are_changed():
  # A TPU VM's or GPU host's input pipeline runs many threads; one arena would serialise them.
  assert heap._runs_on_cpu({"JAX_PLATFORMS": "cpu"}, has_accelerator=True)
  assert not heap._runs_on_cpu({}, has_accelerator=True)
  assert not heap._runs_on_cpu({"JAX_PLATFORMS": "tpu,cpu"}, has_accelerator=False)
  assert heap._runs_on_cpu({}, has_accelerator=False)

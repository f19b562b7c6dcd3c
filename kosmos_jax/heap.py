"""Keeps freed host memory in the process, so a training loop stops faulting it back in.

With glibc's defaults every thread gets its own malloc arena and every freed
block over 32 MB goes back to the kernel. XLA's CPU buffers and tf.data's
batches are allocated and freed every step, so each step faults its memory in
again, page by page: on the 2-core CPU machine 200 steps of the demo's config
took 0.26 s each with 16M page faults in all, and 0.20 s with 0.9M once freed
memory stayed (the mid-size train benchmark: ~700,000 faults and 1.2 s of system time
per step). The cost is that the process keeps its peak heap until it exits.

`kosmos-jax train` and `kosmos-jax demo` call `keep_freed_memory()` first
thing. It changes nothing on a host with an accelerator (TPU VM, GPU) unless
JAX_PLATFORMS=cpu: there the device does the step's work, and the input
pipeline's many threads would queue on one arena's lock. Setting any
MALLOC_* variable, or GLIBC_TUNABLES, leaves glibc as you set it: e.g.
`MALLOC_ARENA_MAX=8 kosmos-jax train ...` keeps the defaults.
"""

import ctypes
import glob
import os
import sys

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_SETTINGS = (
  (_M_ARENA_MAX, 1),  # one arena: a block freed by one thread serves the next
  (_M_MMAP_MAX, 0),  # large blocks come from the heap, not their own mapping
  (_M_TRIM_THRESHOLD, -1),
)  # never hand the heap's free top back (mallopt(3))


def keep_freed_memory() -> bool:
  """Sets glibc's malloc to keep what the process frees; True if it did.

  Call before anything starts a thread (before jax or tensorflow run): a
  thread that has already allocated keeps its own arena. Does nothing, and
  returns False, off glibc, for a run on an accelerator or where the user
  configured malloc themselves.
  """
  if (
    not sys.platform.startswith("linux")
    or _user_configured(os.environ)
    or not _runs_on_cpu(os.environ, _has_accelerator())
  ):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and others: no glibc mallopt
    return False
  return all(mallopt(param, value) == 1 for param, value in _SETTINGS)


def _user_configured(environ) -> bool:
  return "GLIBC_TUNABLES" in environ or any(k.startswith("MALLOC_") for k in environ)


def _runs_on_cpu(environ, has_accelerator: bool) -> bool:
  platforms = environ.get("JAX_PLATFORMS", "")
  return platforms == "cpu" if platforms else not has_accelerator


def _has_accelerator() -> bool:
  # TPU v4 chips appear as /dev/accel*, v5e/v5p/v6e as VFIO groups; NVIDIA GPUs as /dev/nvidiaN.
  return any(
    glob.glob(pattern) for pattern in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")
  )

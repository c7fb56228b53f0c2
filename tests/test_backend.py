import os
import platform
import subprocess
import sys

import pytest

from flaxformer_lite import backend

# A child process that mallocs, touches and frees a 64 MiB block, then does it again and prints the page
# faults the second block cost: with freed memory kept for reuse they are (nearly) none, with glibc's
# defaults (mmap above its threshold) every page of the new block faults again.
_CHILD = r"""
import ctypes, resource, sys
from flaxformer_lite import backend
print(backend.keep_host_memory_for_reuse())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
def touch():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _child(**env) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=dict(environ, **env), capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_host_memory_is_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    changed, faults = _child()
    assert changed == "True" and faults < pages // 10, (changed, faults)
    changed, faults = _child(FLAXFORMER_LITE_MALLOC="default")  # The control: glibc's defaults.
    assert changed == "False" and faults > pages // 2, (changed, faults)


def test_the_allocator_is_left_alone_when_the_user_chose_one(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert backend.keep_host_memory_for_reuse() is False


def _cpuinfo(tmp_path, name: str, flags: str) -> str:
    """A /proc/cpuinfo of two processors; only the first one's flags count."""
    path = tmp_path / name
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu {flags}\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu\n")
    return str(path)


def test_bfloat16_is_emulated_on_an_x86_cpu_without_avx512_bf16_or_amx(tmp_path):
    avx2 = _cpuinfo(tmp_path, "avx2", "avx avx2")
    assert backend.host_cpu(avx2) == ("Test CPU 9000", frozenset({"fpu", "avx", "avx2"}))
    assert backend.is_cpu() and backend.emulated_bfloat16(avx2)
    assert not backend.emulated_bfloat16(_cpuinfo(tmp_path, "avx512", "avx2 avx512f avx512_bf16"))
    assert not backend.emulated_bfloat16(_cpuinfo(tmp_path, "amx", "avx2 amx_bf16 amx_tile"))
    # No flags line (an ARM CPU lists "Features") or no file at all: unknown, so no claim.
    assert backend.host_cpu(str(tmp_path / "missing"))[1] is None
    assert not backend.emulated_bfloat16(str(tmp_path / "missing"))

#!/usr/bin/env python3
"""Compile every kernels/*.cu with NVRTC for each target architecture (no GPU, no CUDA toolkit needed).

NVRTC comes from the `nvidia-cuda-nvrtc-cu12` wheel. Emits cubin for real architectures (sm_87 Orin, sm_90
Hopper), so a syntax or type error in a kernel fails CI. Usage: nvrtc-check.py [--resources] [ARCH ...] (default
sm_87 sm_90); --resources prints each kernel's registers, spills and shared memory as ptxas reports them (what bounds
its occupancy, read without a GPU).
"""
import ctypes
import glob
import os
import sys

import nvidia.cuda_nvrtc as pkg

LIB = os.path.join(list(pkg.__path__)[0], "lib", "libnvrtc.so.12")


def main() -> int:
    nvrtc = ctypes.CDLL(LIB)
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    args = sys.argv[1:]
    resources = "--resources" in args
    archs = [a for a in args if a != "--resources"] or ["sm_87", "sm_90"]
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "kernels")
    sources = sorted(glob.glob(os.path.join(root, "*.cu")))
    if not sources:
        print("nvrtc-check: no kernels/*.cu", file=sys.stderr)
        return 1
    failed = 0
    for path in sources:
        src = open(path, "rb").read()
        headers = sorted(glob.glob(os.path.join(root, "*.h")))
        for arch in archs:
            prog = ctypes.c_void_p()
            names = (ctypes.c_char_p * len(headers))(*[os.path.basename(h).encode() for h in headers])
            bodies = (ctypes.c_char_p * len(headers))(*[open(h, "rb").read() for h in headers])
            rc = nvrtc.nvrtcCreateProgram(
                ctypes.byref(prog), src, os.path.basename(path).encode(), len(headers), bodies, names
            )
            if rc:
                print(f"{path}: nvrtcCreateProgram: {nvrtc.nvrtcGetErrorString(rc).decode()}")
                failed += 1
                continue
            opts = [f"--gpu-architecture={arch}".encode(), b"--std=c++17", b"-default-device"]
            if resources:
                opts.append(b"--ptxas-options=-v")
            arr = (ctypes.c_char_p * len(opts))(*opts)
            rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
            size = ctypes.c_size_t()
            nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log = ctypes.create_string_buffer(size.value)
            nvrtc.nvrtcGetProgramLog(prog, log)
            text = log.value.decode(errors="replace").strip()
            cubin = ctypes.c_size_t()
            if rc == 0:
                nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
            status = "ok" if rc == 0 else "FAILED"
            print(f"{os.path.relpath(path)} {arch}: {status}" + (f" ({cubin.value} bytes of cubin)" if rc == 0 else ""))
            if text and (rc or "warning" in text):
                print(text)
            if resources and rc == 0:
                entry = None
                for line in text.splitlines():
                    if "Compiling entry function" in line:
                        entry = line.split("'")[1]
                    elif entry and ("Used" in line or "spill" in line):
                        print(f"  {entry}: {line.split(':', 1)[-1].replace('ptxas', '').strip(' .')}")
            failed += rc != 0
            nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Which reduced precisions a device computes in natively, as against emulating them (convert to float32,
compute, round back: bf16 autocast on an AVX2 CPU runs several times *slower* than float32).

:func:`reduced_precision_problem` is the one rule: :func:`segformer.inference.select_dtype` (``--dtype``,
``--amp``) turns a request the device would emulate into float32 with its one-line reason, and the model's
fast paths (:mod:`segformer.modeling`) run bfloat16 with oneDNN's kernels only where this CPU computes in it.
"""

from __future__ import annotations

import torch

# x86 flags as /proc/cpuinfo names them; aarch64 "Features": bf16 (ARMv8.6 BFloat16), asimdhp (half precision).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
NATIVE_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16", "asimdhp"})


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as Linux lists them (x86 "flags", ARM "Features" lines). Without that file
    (Windows, macOS), an x86 CPU's flags that matter here as PyTorch's cpuinfo library reports them
    (:func:`_x86_flags_from_torch`: bfloat16 was never chosen on a Windows AMX machine); else empty."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return _x86_flags_from_torch()


# /proc/cpuinfo's name of each x86 flag, and torch.cpu's check of it (AMX-TILE: every AMX CPU has AMX-BF16 with it)
_TORCH_CPU_CHECKS = {
    "avx2": "_is_avx2_supported",
    "avx512f": "_is_avx512_supported",
    "avx512_bf16": "_is_avx512_bf16_supported",
    "amx_bf16": "_is_amx_tile_supported",
    "amx_fp16": "_is_amx_fp16_supported",
}


def _x86_flags_from_torch() -> frozenset[str]:
    """The x86 flags of :data:`_TORCH_CPU_CHECKS` this CPU has, by PyTorch's checks (with "sse2", the mark of
    an x86 list); empty where none holds (ARM) or PyTorch has no such checks."""
    try:
        found = {flag for flag, check in _TORCH_CPU_CHECKS.items() if getattr(torch.cpu, check, lambda: False)()}
    except Exception:  # (a build without cpuinfo: nothing known, as before)
        return frozenset()
    return frozenset(found | {"sse2"}) if found else frozenset()


def reduced_precision_problem(
    dtype: torch.dtype,
    device: str | torch.device,
    *,
    cpu_capability: str | None = None,
    flags: frozenset[str] | set[str] | None = None,
    onednn_bf16: bool | None = None,
    onednn_fp16: bool | None = None,
    cuda_bf16: bool | None = None,
) -> str | None:
    """None when ``dtype`` runs natively on ``device`` and pays there; else one line saying why it would be
    emulated (or, float16 on a CPU, why it is slower than float32 all the same).

    float32 and float64 always run natively. CUDA: float16 always, bfloat16 where the GPU has bf16 arithmetic
    (``cuda_bf16``; default ``torch.cuda.is_bf16_supported(including_emulation=False)``). MPS: as given. CPU:
    bfloat16 needs the bf16 dot-product instructions (``flags``, default :func:`cpu_flags`: avx512_bf16 or
    amx_bf16; bf16 on ARM), PyTorch's AVX-512 kernels (``cpu_capability``, default
    ``torch.backends.cpu.get_cpu_capability()``, lowered by ATEN_CPU_CAPABILITY) and oneDNN's bf16 path
    (``onednn_bf16``, default ``torch.ops.mkldnn._is_mkldnn_bf16_supported()``, off under
    ONEDNN_MAX_CPU_ISA=AVX2); float16 likewise with avx512_fp16 / amx_fp16 (asimdhp on ARM) and oneDNN's fp16
    path — and where it has them, float16 still takes longer than float32 on a CPU (PyTorch's float16 kernels;
    this package's fast paths are float32 and bfloat16), so a CPU float16 request always gets a reason. Every
    machine fact is a parameter (read from this machine when None), so the rule can be tested for any CPU.
    """
    dev = torch.device(device)
    if dtype in (torch.float32, torch.float64) or dev.type not in ("cpu", "cuda"):
        return None
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype)
    if name is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    if dev.type == "cuda":
        if dtype == torch.float16:
            return None
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
        return None if cuda_bf16 else "this GPU has no bfloat16 arithmetic (it needs compute capability 8.0+)"
    flags = cpu_flags() if flags is None else frozenset(flags)
    capability = (torch.backends.cpu.get_cpu_capability() if cpu_capability is None else cpu_capability).upper()
    if dtype == torch.bfloat16:
        wanted, onednn = NATIVE_BF16_FLAGS, onednn_bf16
        if onednn is None:
            onednn = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    else:
        wanted, onednn = NATIVE_FP16_FLAGS, onednn_fp16
        if onednn is None:
            onednn = torch.ops.mkldnn._is_mkldnn_fp16_supported()
    if not flags:
        return f"cannot tell whether this CPU has {name} arithmetic (no /proc/cpuinfo, no x86 flags from PyTorch)"
    x86 = "sse2" in flags
    if not flags & wanted:
        listed = "/".join(sorted(f for f in wanted if f.startswith(("avx", "amx")) == x86))
        return f"this CPU has no {name} arithmetic (no {listed})"
    if x86 and not capability.startswith("AVX512"):
        return f"PyTorch runs its {capability} kernels here (ATEN_CPU_CAPABILITY?), which emulate {name}"
    if not onednn:
        return f"oneDNN has no native {name} path here (ONEDNN_MAX_CPU_ISA?)"
    if dtype == torch.float16:  # (native, yet no faster: an audit on an AVX512-FP16 Xeon)
        return (
            "slower than float32 here, even with the CPU's float16 arithmetic (the fast CPU paths compute in "
            "float32 and bfloat16; 1.2-1.4x float32's time on an AVX512-FP16 Xeon)"
        )
    return None


__all__ = ["NATIVE_BF16_FLAGS", "NATIVE_FP16_FLAGS", "cpu_flags", "reduced_precision_problem"]

"""Where the forward pass runs: PyTorch (eager or compiled ahead of time) or onnxruntime, with the compiled
artefacts cached across runs.

>>> from segformer.backends import runtime_model
>>> fast = runtime_model(model, backend="onnxruntime")   # exported once into the cache, verified, then reused
>>> probs = infer(fast, pixel_values, mode="slide")      # every inference mode works unchanged
>>> fast = runtime_model(model, compile=True)            # AOTInductor, one package per input shape, cached
>>> net = load_onnx_file("b0.onnx")                      # a file `segformer export` wrote, run as it is

Every backend is an ``nn.Module`` whose ``forward(pixel_values)`` takes (B, C, H, W) float32 normalised images and
returns the logits (B, K, ceil(H/4), ceil(W/4)) as a torch tensor, with the model's ``config``: the inference
modes of :mod:`segformer.inference` (whole, aligned, sliding window, multi-scale + flip) sit on top of it and do
not know which one runs.

The cache lives in ``$SEGFORMER_CACHE`` (default ``$XDG_CACHE_HOME/segformer``, else ``~/.cache/segformer``):
``onnx/KEY/`` and ``compiled/KEY/``.
KEY is a hash of everything the artefact depends on (:func:`artefact_key`): the weights and config, the export
options (dtype, opset, shape policy), the torch / onnxruntime versions and the source of the model file, so a new
checkpoint, option or version never reuses a stale file; a compiled package's also holds the instruction set it was
built for (:func:`compile_target`), so machines of two kinds can share one cache. Each entry is a folder built under
a temporary name and renamed into place, so two processes racing produce one complete entry (the loser discards its
own). Each file's SHA-256 is stored beside it (``manifest.json``) and checked on every use; a damaged entry is
reported, removed and rebuilt. A temporary folder is named after its builder (``.KEY.PID@HOST.XXXX.tmp``): one left
behind by a build that never finished (the process was killed) is removed by the next lookup or build in that cache
folder once its process is gone from this host, or once it is a day old whatever the host (the cache may be shared
by several machines); a folder of a live builder is never touched. Nothing here uses the network.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .fileio import atomic_write_text
from .modeling import check_pixel_values

BACKENDS = ("pytorch", "onnxruntime")
CACHE_ENV = "SEGFORMER_CACHE"
STALE_AFTER = 24 * 3600  # seconds: a temporary folder this old is abandoned whoever made it
logger = logging.getLogger("segformer")


# ----------------------------------------------------------------------------------------------- cache
def cache_root() -> Path:
    """``$SEGFORMER_CACHE``, else ``$XDG_CACHE_HOME/segformer``, else ``~/.cache/segformer``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "segformer"


# config entries that say where a checkpoint came from, not what it computes (the weights' dtype is the tensors')
_PROVENANCE = frozenset({"architectures", "transformers_version", "dtype", "torch_dtype"})


def config_identity(config: Any) -> dict[str, Any]:
    """The entries of ``config`` that decide what the model computes and calls its classes: all but its path
    (``_name_or_path``: a copied or moved checkpoint is the same model) and provenance (:data:`_PROVENANCE`)."""
    return {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k not in _PROVENANCE}


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of a model's config (JSON, :func:`config_identity`) and every tensor of its state dict (name, dtype,
    shape, bytes)."""
    h = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None:
        h.update(json.dumps(config_identity(config), sort_keys=True, default=str).encode())
    hash_state(h, model)
    return h.hexdigest()


def hash_state(h: Any, model: nn.Module) -> None:
    """Feed ``model``'s state dict to the hash ``h``: each entry's name, then its value (:func:`_hash_value`)."""
    for name, value in model.state_dict().items():
        h.update(f"{name}|".encode())
        _hash_value(h, value)


def _hash_value(h: Any, value: Any) -> None:
    """One state-dict value: a tensor's dtype, shape and bytes (a quantised one's integers and scales), a tuple's
    items (an int8 layer keeps its (weight, bias) so), anything else its repr."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.is_quantized:
            scheme = t.qscheme()
            if scheme in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                params: list[Any] = [t.q_scale(), t.q_zero_point()]
            else:
                params = [t.q_per_channel_scales().tolist(), t.q_per_channel_zero_points().tolist(),
                          t.q_per_channel_axis()]  # fmt: skip
            h.update(f"{scheme}|{params}|".encode())
            t = t.int_repr()
        t = t.contiguous()
        h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, (tuple, list)):
        for item in value:
            _hash_value(h, item)
    else:
        h.update(f"{value!r}|".encode())


def _code_digest() -> str:
    """The source of the modules that define the exported graph: a change to them is a new artefact."""
    h = hashlib.sha256()
    for name in ("modeling.py", "export.py", "backends.py"):
        h.update((Path(__file__).parent / name).read_bytes())
    return h.hexdigest()[:16]


def artefact_key(kind: str, weights: str, **options: Any) -> str:
    """The cache key of an artefact of ``kind`` ("onnx", "compiled") built from a model whose
    :func:`weights_digest` is ``weights``, with ``options`` (JSON values): 24 hex digits of SHA-256 over those,
    the segformer and torch versions and the source of the model file."""
    from . import __version__

    parts = {"kind": kind, "weights": weights, "options": options, "segformer": __version__,
             "torch": torch.__version__, "code": _code_digest()}  # fmt: skip
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_entry(folder: Path) -> dict[str, Any]:
    """The manifest of a complete, undamaged cache entry; ValueError (the reason) otherwise."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"unreadable manifest ({exc})") from None
    if not isinstance(files, dict) or not files:  # (every build writes a file: nothing listed, nothing checked)
        raise ValueError("the manifest lists no files")
    for name, digest in files.items():
        path = folder / name
        if not path.is_file():
            raise ValueError(f"{name} is missing")
        if _file_sha256(path) != digest:
            raise ValueError(f"{name} does not match its SHA-256")
    return manifest


def _owner() -> str:
    """``PID@HOST``: who builds (or deletes) a temporary folder, as its name records it. HOST is the host name
    and, on Linux, the PID namespace (``.nsINODE``): containers sharing a host name and a cache volume do not
    see each other's processes, so their folders count as another host's."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "unknown"
    try:
        host += ".ns" + "".join(c for c in os.readlink("/proc/self/ns/pid") if c.isdigit())
    except OSError:
        pass
    return f"{os.getpid()}@{host}"


# .NAME.PID@HOST.XXXX.tmp (a build, XXXX from mkdtemp) or .NAME.PID@HOST.NANOSECONDS.trash (a removal)
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)@(?P<host>[^@/]*)\.[A-Za-z0-9_]+\.(?:tmp|trash)")
_LEGACY_TEMPORARY = re.compile(r"\..+\.(?:tmp|trash)")  # folders of older versions: no owner recorded


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate it there; the age rule alone applies
    try:
        os.kill(pid, 0)  # signal 0: nothing is sent, only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, as another user
    except OSError:
        return True  # cannot tell: keep its folder
    return True


def _abandoned(path: Path, host: str, now: float) -> bool:
    """Whether the temporary folder ``path`` was left by a build or removal that will never finish."""
    name = path.name
    match = _TEMPORARY.fullmatch(name)
    if match is None and _LEGACY_TEMPORARY.fullmatch(name) is None:
        return False  # not ours
    try:
        if now - path.stat().st_mtime > STALE_AFTER:
            return True
    except OSError:
        return False  # gone already
    return match is not None and match["host"] == host and not _pid_alive(int(match["pid"]))


def sweep_abandoned(directory: Path) -> list[Path]:
    """Remove the temporary folders in the cache folder ``directory`` that builds (or removals) killed midway
    left behind: those whose process is gone from this host, and any older than ``STALE_AFTER`` (a day). The
    folder of a live process is kept. Returns what was removed; never raises."""
    host, now, removed = _owner().partition("@")[2], time.time(), []
    try:
        candidates = [p for p in directory.iterdir() if p.name.startswith(".") and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        if _abandoned(path, host, now) and _discard(path):
            logger.info(f"segformer cache: removed {path}, left behind by a build that did not finish")
            removed.append(path)
    return removed


def _discard(folder: Path) -> bool:
    """Remove a cache entry (or an abandoned temporary folder): renamed away first, so that no reader sees it
    half-deleted. False when it was gone already."""
    trash = folder.with_name(f".{folder.name}.{_owner()}.{time.monotonic_ns()}.trash")
    try:
        os.rename(folder, trash)
    except FileNotFoundError:
        return False  # another process removed it
    shutil.rmtree(trash, ignore_errors=True)
    return True


def cached_entry(folder: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, bool]:
    """``(folder, hit)``: the cache entry ``folder``, built by ``build(tmp_folder)`` when it is missing or damaged.

    ``build`` writes its files into an empty temporary folder beside ``folder`` and returns what the manifest
    should record besides the files' SHA-256 (e.g. a verification report); the folder is then renamed into
    place. When another process published the entry first, that one is kept and this build discarded. A damaged
    entry (a file missing or not matching its SHA-256) is reported in one warning line, removed and rebuilt.
    ``hit`` is True when an existing entry was used, False when this call built it. Temporary folders that
    killed builds left beside ``folder`` are removed first (:func:`sweep_abandoned`)."""
    sweep_abandoned(folder.parent)
    if folder.is_dir():
        try:
            _check_entry(folder)
            return folder, True
        except ValueError as exc:
            logger.warning(f"segformer cache: {folder} is damaged ({exc}); rebuilding it")
            _discard(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # The owner in the name lets a later sweep tell a killed build's folder from a live one's.
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.{_owner()}.", suffix=".tmp", dir=folder.parent))
    except OSError as exc:  # (a read-only home, a file where the cache should be: one line, and the way out)
        error = type(exc)(
            f"segformer cache {folder.parent}: cannot write there ({exc.strerror}); set ${CACHE_ENV} to a "
            "writable folder"
        )
        error.errno = exc.errno
        raise error from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700 folders; give the usual permissions
    try:
        info = build(tmp)
        files = {p.name: _file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {"files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info}
        atomic_write_text(tmp / "manifest.json", json.dumps(manifest, indent=1) + "\n")
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
            # Another process published the same entry first: keep its (equally verified) files.
            _check_entry(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder, False


# ----------------------------------------------------------------------------------------------- onnxruntime
def _require_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError(
            "the onnxruntime backend (--backend onnxruntime) needs the onnx and onnxruntime packages: "
            "pip install 'segformer[onnx]'"
        ) from None
    return onnxruntime


class OnnxRuntimeModel(nn.Module):
    """An onnxruntime session (CPU) behind a PyTorch module: ``forward(pixel_values)`` → logits tensor.

    ``path``: the verified ONNX file; ``config``: the model's SegformerConfig; ``from_cache``: whether the file
    came from the cache (False: exported by this call, or a file given as the model). ``weights_dtype``:
    "float32", or "float16" for an ``--fp16`` export (its metadata). The zero-size parameter tells :func:`infer`,
    ``evaluate`` and the predictor where inputs go (the CPU) and in which dtype (float32): the graph takes
    float32 whatever the precision of its weights.
    """

    def __init__(self, path: str | os.PathLike, config: Any, *, threads: int | None = None, from_cache: bool = False):
        super().__init__()
        ort = _require_onnxruntime()
        self.path, self.config, self.from_cache = Path(path), config, from_cache
        self.anchor = nn.Parameter(torch.empty(0), requires_grad=False)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()  # the threads PyTorch would use
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # shape-hint warnings for dynamic axes are expected
        # Idle onnxruntime threads spin by default, taking the cores from the PyTorch resize and softmax that
        # follow every forward pass here.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        # the precision of the graph's weights (an --fp16 export computes in float16 inside)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.weights_dtype = "float16" if meta.get("segformer.weights") == "float16" else "float32"
        self.eval()

    def train(self, mode: bool = True) -> OnnxRuntimeModel:
        """Inference only: stays in eval mode (:func:`infer` restores the mode it found)."""
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) float → (B, K, ceil(H/4), ceil(W/4)) float32 logits on the CPU; input the graph cannot
        take (another channel count: a one-channel model's predict) is the one-line ValueError PyTorch's gives."""
        check_pixel_values(pixel_values, self.config)
        x = pixel_values.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(["logits"], {"pixel_values": x})[0])

    def extra_repr(self) -> str:
        return f"path={str(self.path)!r}, from_cache={self.from_cache}"


def is_onnx_file(model: object) -> bool:
    """Whether ``model`` names an ONNX file (a path ending in .onnx that is no folder), to run as it is."""
    return (
        isinstance(model, (str, os.PathLike))
        and str(model).lower().endswith(".onnx")
        and not Path(model).expanduser().is_dir()  # (a checkpoint folder may have any name)
    )


def load_onnx_file(path: str | os.PathLike, *, threads: int | None = None) -> OnnxRuntimeModel:
    """An ONNX file written by ``segformer export`` as an :class:`OnnxRuntimeModel`, its config taken from the
    file's metadata (:func:`segformer.export.read_metadata`). A missing file, another tool's export (no
    segformer metadata) and a static graph (one input size only) raise ValueError naming the file."""
    from .config import SegformerConfig
    from .export import read_metadata

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: no such ONNX file")
    meta = read_metadata(path)
    if "segformer.config" not in meta:
        raise ValueError(
            f"{path}: no segformer metadata (another tool's export, or an earlier segformer's): write it with "
            "`segformer export MODEL --onnx FILE`, or pass the checkpoint and --backend onnxruntime"
        )
    axes = meta.get("segformer.axes", "dynamic")
    if axes != "dynamic":
        raise ValueError(f"{path}: exported with --static ({axes.split()[-1]} only); export it without --static")
    try:
        config = SegformerConfig.from_dict(json.loads(meta["segformer.config"]))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: its segformer.config metadata is not a valid config ({exc})") from None
    _require_onnxruntime()
    model = OnnxRuntimeModel(path, config, threads=threads, from_cache=False)
    classes = model.session.get_outputs()[0].shape[1]  # (an int where the graph fixes it, as exports do)
    if isinstance(classes, int) and classes != config.num_labels:
        raise ValueError(
            f"{path}: its graph has {classes} outputs but its segformer.config metadata {config.num_labels} classes "
            "(edited metadata?): export the checkpoint again"
        )
    return model


def onnxruntime_model(
    model: nn.Module,
    *,
    fp16: bool = False,
    opset: int | None = None,
    export_size: tuple[int, int] = (512, 512),
    cache_dir: str | os.PathLike | None = None,
    threads: int | None = None,
) -> OnnxRuntimeModel:
    """``model`` (a SegformerForSemanticSegmentation) as an :class:`OnnxRuntimeModel`, exported on first use
    into ``cache_dir`` (default :func:`cache_root`) ``/onnx/KEY/model.onnx`` and reused afterwards.

    The graph has dynamic batch, height and width (traced at ``export_size``), so one file serves every input
    size. The first export is verified by :func:`segformer.export.export_onnx`'s own check (onnxruntime against
    PyTorch at another size and batch 2, within what fp32 rounding allows this model there). ``fp16``: float16 weights
    (LayerNorm and softmax in float32). Needs onnx and onnxruntime (one-line RuntimeError otherwise)."""
    _require_onnxruntime()
    from .export import DEFAULT_OPSET, export_onnx
    from .modeling import SegformerForSemanticSegmentation

    if not isinstance(model, SegformerForSemanticSegmentation):
        raise TypeError(f"the onnxruntime backend needs a SegformerForSemanticSegmentation, got {type(model).__name__}")
    opset = DEFAULT_OPSET if opset is None else opset
    import onnxruntime

    options = {"fp16": fp16, "opset": opset, "axes": "dynamic", "export_size": list(export_size)}
    key = artefact_key("onnx", weights_digest(model), **options)
    root = Path(cache_dir) if cache_dir is not None else cache_root()

    def build(tmp: Path) -> dict[str, Any]:
        report = export_onnx(model, tmp / "model.onnx", size=export_size, opset=opset, fp16=fp16)
        return {"export": report.summary().replace(f"{tmp}{os.sep}", ""), "onnxruntime": onnxruntime.__version__,
                "options": options}  # fmt: skip

    folder, hit = cached_entry(root / "onnx" / key, build)
    return OnnxRuntimeModel(folder / "model.onnx", model.config, threads=threads, from_cache=hit)


# ----------------------------------------------------------------------------------------------- compiled
class _Logits(nn.Module):
    """What gets compiled: pixel_values (B, C, H, W) → logits (B, K, H/4, W/4)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values, return_dict=True).logits


# the CPU features that decide which instructions generated code may use (x86 and Arm names, as /proc/cpuinfo
# spells them)
_ISA_FLAGS = frozenset(
    "sse4_2 avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq avx512cd avx512_vnni avx512_bf16 avx512_fp16 "
    "avx_vnni amx_tile amx_bf16 amx_int8 amx_fp16 asimd asimddp asimdhp sve sve2 bf16 i8mm".split()
)


def compile_target(device: torch.device) -> str:
    """What AOTInductor builds a package for besides its shape: on the CPU the architecture, ATen's capability
    (which ``ATEN_CPU_CAPABILITY`` caps, and Inductor's choice of vector code with it) and the CPU's vector
    features; on CUDA the GPU's compute capability. A package built for another target could not run here (one
    built on an AVX-512 CPU dies of an illegal instruction on an AVX2 one) and a cache folder may be shared by
    several machines (a cluster's home directory). Cheap: no Inductor import, which a cache hit never pays."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda:sm_{major}{minor}"
    if device.type != "cpu":
        return device.type
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    flags = set(line.partition(":")[2].split())
                    break
    except OSError:  # (not Linux: the architecture and ATen's capability alone)
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return f"cpu:{platform.machine()}:{capability}:{','.join(sorted(flags & _ISA_FLAGS))}"


def _load_package(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """An AOTInductor package of ``_Logits`` as a function of the pixel values.

    ``torch._inductor.aoti_load_package`` imports the whole of torch._inductor and reads the archive in Python
    (about 5 s here, most of a second run's start-up); the C++ loader it ends in reads the same file in 0.15 s.
    The public function remains the fallback should that loader's signature change."""
    try:
        loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)
    except (AttributeError, TypeError):
        from torch import _inductor

        return _inductor.aoti_load_package(str(path))
    return lambda x: loader.run([x])[0]  # one tensor in, one out (the call spec of _Logits)


def _compiler_problem(exc: Exception) -> str:
    """One line for a C++ toolchain that cannot build AOTInductor's code: what the compiler said last, and what to
    install (the line was "CppCompileError: C++ compile error", the reason and the remedy cut off: audit)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = next((line for line in reversed(lines) if "error" in line.lower()), lines[-1] if lines else "")
    said = said if len(lines) > 1 else said.partition(": ")[2] or said  # (one line: its own name left out)
    remedy = {
        "win32": "the MSVC Build Tools, and run from a Developer Command Prompt",
        "darwin": "the Xcode command line tools and OpenMP (brew install libomp)",
    }.get(sys.platform, "g++ (or set CXX to a C++ compiler)")
    return f"--compile needs a working C++ compiler ({said[:300]}): install {remedy}, or run without --compile"


class CompiledModel(nn.Module):
    """``model`` compiled ahead of time by AOTInductor (``torch.export`` + ``aoti_compile_and_package``), one
    package per input shape, cached in ``cache_dir`` (default :func:`cache_root`) ``/compiled/KEY/model.pt2``.

    A shape seen before, in this process or any earlier one, loads its package in well under a second; a new
    shape is compiled first (33-42 s for b0 at 512x512 on two CPU cores; one warning line says so). The key holds
    the weights, the shape, the device, the dtype, the thread count (the generated code is built for it), the
    target (:func:`compile_target`) and the torch version. ``model`` stays a submodule: its parameters tell
    :func:`infer` the device and dtype, and ``compiled_shapes`` / ``cache_hits`` say what happened (for tests and
    logs). Inference only (no autograd).
    """

    def __init__(self, model: nn.Module, *, cache_dir: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.model = model.eval()
        self.config = model.config
        self.root = Path(cache_dir) if cache_dir is not None else cache_root()
        self.digest = weights_digest(model)
        self.runners: dict[tuple[int, ...], Any] = {}
        self.compiled_shapes: list[tuple[int, ...]] = []
        self.cache_hits: list[tuple[int, ...]] = []
        self.eval()

    def train(self, mode: bool = True) -> CompiledModel:
        """Inference only: the model stays in eval mode. (:func:`infer` restores the mode it found; a wrapper
        left in training mode would put the model into it, whose next forward pass updates BatchNorm's running
        statistics and so changes the weights the packages were compiled from.)"""
        return super().train(False)

    def package_folder(self, x: torch.Tensor) -> Path:
        """The cache folder of the package for inputs like ``x`` (shape, dtype, device)."""
        parts = {"shape": list(x.shape), "dtype": str(x.dtype), "device": x.device.type,
                 "threads": torch.get_num_threads(), "target": compile_target(x.device)}  # fmt: skip
        return self.root / "compiled" / artefact_key("compiled", self.digest, **parts)

    def _runner(self, x: torch.Tensor) -> Any:
        import warnings

        shape = tuple(x.shape)

        def build(tmp: Path) -> dict[str, Any]:
            logger.warning(
                f"segformer --compile: compiling for input shape {shape} (once per shape, 33-42 s for b0 at "
                f"512x512 on two CPU cores; cached in {self.root / 'compiled'})"
            )
            start = time.perf_counter()
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                from torch import _inductor

                program = torch.export.export(_Logits(self.model), (x,))
                try:
                    _inductor.aoti_compile_and_package(program, package_path=str(tmp / "model.pt2"))
                except Exception as exc:
                    toolchain = ("CppCompileError", "InvalidCxxCompiler")  # (Inductor wraps them in InductorError)
                    if type(exc).__name__ not in toolchain and str(exc).partition(":")[0] not in toolchain:
                        raise
                    raise RuntimeError(_compiler_problem(exc)) from None
            return {"shape": list(shape), "dtype": str(x.dtype), "compile_seconds": time.perf_counter() - start}

        folder, hit = cached_entry(self.package_folder(x), build)
        (self.cache_hits if hit else self.compiled_shapes).append(shape)
        return _load_package(folder / "model.pt2")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in the model's dtype and device → (B, K, ceil(H/4), ceil(W/4)) logits."""
        shape = tuple(pixel_values.shape)
        if shape not in self.runners:
            self.runners[shape] = self._runner(pixel_values)
        return self.runners[shape](pixel_values.contiguous())


# ----------------------------------------------------------------------------------------------- int8
def quantize_int8(model: nn.Module) -> nn.Module:
    """Dynamic int8 in place: every ``nn.Linear`` of the encoder (attention query/key/value/output, Mix-FFN
    dense layers) stores int8 weights and quantises its input per batch
    (``torch.ao.quantization.quantize_dynamic``); convolutions, LayerNorm and the folded decode head stay
    float32. CPU only. Returns ``model``."""
    import warnings

    encoder = getattr(model, "segformer", None)
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"int8 needs a SegFormer model with an encoder (.segformer), got {type(model).__name__}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("dtype int8 (dynamic quantisation) runs on the CPU; use device cpu")
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError:
        raise RuntimeError("dtype int8 needs torch.ao.quantization.quantize_dynamic, which this torch lacks") from None
    quantized = torch.backends.quantized
    engine = quantized_engine(quantized.engine, quantized.supported_engines)
    if engine != quantized.engine:
        quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch 2.10+ marks torch.ao.quantization deprecated (torchao replaces it)
        quantize_dynamic(model.float().segformer, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return model


def quantized_engine(current: str, supported: list[str]) -> str:
    """The quantized engine int8 layers run on: ``current`` where it is one, else the first of x86, fbgemm, onednn
    and qnnpack that this PyTorch build has (macOS wheels leave the engine "none": the first int8 product failed
    with "Didn't find engine ... NoQEngine"; portability audit); a ValueError where it has none."""
    if current != "none":
        return current
    usable = [engine for engine in ("x86", "fbgemm", "onednn", "qnnpack") if engine in supported]
    if not usable:
        raise ValueError(
            f"dtype int8: this PyTorch build has no quantized engine ({', '.join(supported) or 'none'}): use float32"
        )
    return usable[0]


# ----------------------------------------------------------------------------------------------- choice
def runtime_model(
    model: nn.Module,
    backend: str = "pytorch",
    *,
    compile: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """``model`` as the backend runs it: "pytorch" (the model itself, or with ``compile`` a
    :class:`CompiledModel`) or "onnxruntime" (an :class:`OnnxRuntimeModel` on the CPU, float32, or float16 for
    a float16 model). Artefacts are cached in ``cache_dir`` (default :func:`cache_root`). An
    :class:`OnnxRuntimeModel` (an ONNX file given as the model) is returned as it is, whatever ``backend``;
    ``compile`` is refused. Bad combinations raise ValueError naming the argument."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if isinstance(model, OnnxRuntimeModel):  # (an ONNX file given as the model: it runs as it is)
        if compile:
            raise ValueError("compile applies to PyTorch checkpoints; an ONNX file runs on onnxruntime as it is")
        return model
    if backend == "pytorch":
        return CompiledModel(model, cache_dir=cache_dir) if compile else model
    if compile:
        raise ValueError("compile applies to the pytorch backend; onnxruntime optimises its graph itself")
    param = next(model.parameters())
    if param.device.type != "cpu":
        raise ValueError(f"the onnxruntime backend runs on the CPU; got a model on {param.device} (use device cpu)")
    if param.dtype not in (torch.float32, torch.float16):
        name = str(param.dtype).removeprefix("torch.")
        raise ValueError(f"dtype {name}: the onnxruntime backend runs float32 or float16 graphs")
    return onnxruntime_model(model, fp16=param.dtype == torch.float16, cache_dir=cache_dir)


__all__ = [
    "BACKENDS",
    "CACHE_ENV",
    "CompiledModel",
    "OnnxRuntimeModel",
    "artefact_key",
    "cache_root",
    "cached_entry",
    "is_onnx_file",
    "load_onnx_file",
    "onnxruntime_model",
    "quantize_int8",
    "runtime_model",
    "sweep_abandoned",
    "weights_digest",
    "config_identity",
    "hash_state",
]

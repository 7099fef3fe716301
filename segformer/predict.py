"""Segment images: paths, PIL images or arrays in, label maps at each image's original resolution out.

>>> from segformer.predict import SegformerPredictor, segment
>>> labels = segment("street.jpg")                                  # (H, W) class ids, default ADE20K b0
>>> predictor = SegformerPredictor("nvidia/segformer-b0-finetuned-cityscapes-1024-1024", mode="slide",
...                                crop_size=(1024, 1024), stride=(768, 768), device="cuda", dtype="float16")
>>> result = predictor.predict("frame.png", return_probs=True)      # Segmentation: .labels, .probs
>>> for source, result in predictor.predict_iter(paths):            # bad files come back as ImageError
...     ...

This module is the library's predictor: images in, numpy out. The ``segformer predict`` program on top of it
(files and folders in; label PNGs, overlays, a summary and a legend out; each failure reported and skipped;
inputs shared out across the ranks of a ``torchrun`` job) is :func:`segformer.predict_folder.predict_to_folder`.

Choices worth knowing:

- Images are read by :mod:`segformer.images`, the one input layer: EXIF orientation applied, every mode and
  dtype turned into RGB by one documented rule, then /255 and ImageNet mean/std. A truncated file is an error,
  never silently half-decoded; so is a file whose header claims more than ``max_pixels`` pixels (a
  decompression bomb; Pillow's default limit, 89.5 million, unless told otherwise).
- Images smaller than ``min_size`` on either side (default: the model's minimum input, 29 px for the published
  configs) are reported and skipped in every mode, including those that resize anyway: a handful of pixels
  carries too little to segment, and one rule for all modes is easier to reason about.
- Only images of the same size share a batch (each batch is one tensor); the predictor groups each window of
  ``batch_size`` images by size.
- Labels alone are computed without the batch's (B, K, H, W) float32 probabilities
  (:func:`segformer.inference.predict_labels`: the model runs on the batch, the rest image by image; a huge
  photo in "aligned" mode is upsampled in row bands); ``return_probs=True`` returns those probabilities, so it
  holds them; ``return_confidence=True`` adds each pixel's top-class probability without them
  (:func:`segformer.inference.predict_confidence`).
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from .backends import BACKENDS, OnnxRuntimeModel, is_onnx_file, load_onnx_file, quantize_int8, runtime_model
from .hub import CheckpointError
from .images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageError,
    ImageInput,
    load_image,
    normalize,
    to_rgb,
)
from .inference import (
    InferenceOptions,
    WorkAreas,
    check_crop_size,
    infer,
    label_probability,
    labels_from_probs,
    predict_confidence,
    predict_labels,
    resolve_options,
    reuse_work_areas,
    select_dtype,
)
from .pretrained import resolve_dtype, select_device
from .visualize import class_names, palette_for

DEFAULT_MODEL = "nvidia/segformer-b0-finetuned-ade-512-512"


# ----------------------------------------------------------------------------------------------- model
def _is_int8(dtype: str | torch.dtype | None) -> bool:
    return str(dtype).removeprefix("torch.") in ("int8", "qint8")


def load_model(
    model: str | os.PathLike | nn.Module = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
) -> nn.Module:
    """A SegformerForSemanticSegmentation from a checkpoint directory or hub id (or a model, passed through; or
    an ONNX file ``segformer export`` wrote, as a :class:`segformer.backends.OnnxRuntimeModel` on the CPU),
    in eval mode on ``device`` in ``dtype`` (read by :func:`segformer.pretrained.select_device` and
    :func:`segformer.inference.select_dtype`: a reduced precision the device would only emulate becomes
    float32, with one warning line). ``dtype="int8"``: float32 with the encoder's linear layers dynamically
    quantised (:func:`segformer.backends.quantize_int8`; CPU only). A model given is moved to ``device`` and
    ``dtype`` and put in eval mode, as a pipeline takes a model; for int8 a quantised copy is made and the model
    given is left as it was.

    A checkpoint that cannot be found raises :class:`CheckpointError` with one line that says how to point
    at a local checkpoint and that hub ids need network or a populated cache."""
    dev = select_device(device)
    if is_onnx_file(model):  # (a file segformer export wrote: onnxruntime on the CPU, in the file's precision)
        if dtype is not None and str(dtype).removeprefix("torch.") != "float32":  # (as given: on every machine)
            name = str(dtype).removeprefix("torch.")
            raise ValueError(
                f"{model}: an ONNX file runs in the precision it was exported in: dtype {name} (--dtype) does not "
                "apply to it"
            )
        if dev.type != "cpu":
            raise ValueError(f"{model}: an ONNX file runs on the CPU (onnxruntime); got device {dev}")
        return load_onnx_file(model)
    int8 = _is_int8(dtype)
    if int8 and dev.type != "cpu":
        raise ValueError(f"dtype int8 (dynamic quantisation) runs on the CPU; got device {dev}")
    dt = torch.float32 if int8 else select_dtype(dtype, dev)
    finish = quantize_int8 if int8 else (lambda net: net)
    if isinstance(model, nn.Module):
        if int8:  # (quantize_int8 replaces layers in place: the caller's model would compute something else after)
            model = copy.deepcopy(model)
        return finish(model.to(device=dev, dtype=dt).eval())
    from .modeling import load_segmentation_model

    try:
        net = load_segmentation_model(model)
    except CheckpointError as exc:
        reason = str(exc).split(" (hub ids need")[0]  # the advice below replaces hub.py's shorter one
        reason = reason.removeprefix(f"{model}: ")
        if os.path.exists(os.path.expanduser(str(model))):  # a local checkpoint, there but damaged: no hub advice
            raise CheckpointError(f"cannot load model '{model}': {reason}") from None
        raise CheckpointError(
            f"cannot load model '{model}': {reason}. Pass a local checkpoint directory (written by "
            "save_pretrained or `segformer convert`); hub ids such as "
            "nvidia/segformer-b0-finetuned-ade-512-512 need network access or a populated Hugging Face "
            "cache (HF_HOME)"
        ) from None
    return finish(net.to(device=dev, dtype=dt).eval())


# ----------------------------------------------------------------------------------------------- predictor
@dataclass
class Segmentation:
    """The prediction for one image.

    labels: (H, W) class ids at the image's size (after EXIF orientation); uint8 for up to 256 classes,
    uint16 up to 65536, else int32. probs: (K, H, W) float32 class probabilities (K = num_labels; a one-label
    sigmoid model gives (1, H, W), the probability of class 1), or None unless asked for. confidence: (H, W)
    float32, each pixel's probability of the class it got (:func:`segformer.inference.predict_confidence`:
    without the (K, H, W) probabilities), or None unless asked for.
    """

    labels: np.ndarray
    probs: np.ndarray | None = None
    confidence: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL gives it."""
        return self.labels.shape[1], self.labels.shape[0]

    def areas(self, num_classes: int) -> np.ndarray:
        """(num_classes,) int64 pixel count of each class."""
        return np.bincount(self.labels.reshape(-1).astype(np.int64), minlength=num_classes)[:num_classes]


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed: CUDA's OutOfMemoryError, the CPU allocator's and MPS's RuntimeError, MemoryError."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return "can't allocate memory" in text or "out of memory" in text.lower()


class SegformerPredictor:
    """Segments images with a SegFormer; numpy label maps at each image's original resolution out.

    Args:
        model: a checkpoint directory, a hub id (default: ADE20K b0), a SegformerForSemanticSegmentation, or an
            ONNX file ``segformer export`` wrote (run by onnxruntime on the CPU, with the protocol and colours
            its metadata carries).
        device: "auto" / None (CUDA, else MPS, else CPU), "cpu", "cuda", "cuda:1", "mps" or a torch.device.
        dtype: "float32" (default), "float16" or "bfloat16" (where the device computes in it, else float32 with
            a warning: :func:`segformer.inference.select_dtype`), or "int8" (CPU: the encoder's linear layers
            dynamically quantised); probabilities are float32 whatever the dtype.
        options: the :class:`~segformer.inference.InferenceOptions` (default: the checkpoint's own protocol,
            ``inference_config.json`` as ``segformer train`` writes it, else :attr:`default_options`, the
            aligned mode). Its fields may also be given as keywords (``mode=``, ``crop_size=``, ``stride=``,
            ``short_side=``, ``long_side=``, ``align=``, ``scales=``, ``flip=``), alone or as changes to
            ``options``. Modes: "aligned" (default; resize keeping the ratio to fit (long_side, short_side),
            sides rounded up to a multiple of ``align`` (32) — the ADE20K protocol, and bounded work for huge
            images), "whole" (the image as is) or "slide" (``crop_size`` windows at ``stride`` — the Cityscapes
            protocol); scales, flip: multi-scale + flip test-time augmentation (e.g. scales=[0.75, 1.0, 1.25],
            flip=True). Invalid values raise ValueError.
        batch_size: images per forward pass (only images of the same size share one).
        max_pixels: refuse images with more pixels than this (decompression bombs); None: no limit.
        min_size: refuse images with a side shorter than this (default: the model's minimum input size).
        backend: None (default: "pytorch", or "onnxruntime" for an ONNX file), "pytorch" or "onnxruntime" (the
            model exported once into the cache, verified and reused; CPU only, so device "auto" means the CPU):
            see :func:`segformer.backends.runtime_model`. An ONNX file refuses "pytorch".
        compile: with the pytorch backend, compile the model ahead of time (AOTInductor), one package per input
            shape, cached across runs (:class:`segformer.backends.CompiledModel`).
    """

    def __init__(
        self,
        model: str | os.PathLike | nn.Module = DEFAULT_MODEL,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        options: InferenceOptions | None = None,
        batch_size: int = 1,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        min_size: int | None = None,
        backend: str | None = None,
        compile: bool = False,
        **keywords: Any,
    ) -> None:
        self.options = resolve_options(self.stored_options(model) if options is None else options, keywords)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_pixels is not None and max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit), got {max_pixels}")
        if is_onnx_file(model):
            given = [flag for flag, on in (("backend pytorch (--backend)", backend == "pytorch"),
                                           ("compile (--compile)", compile), ("dtype int8 (--dtype)", _is_int8(dtype)))
                     if on]  # fmt: skip
            if given:
                raise ValueError(
                    f"{model}: an ONNX file runs on onnxruntime as it is: {', '.join(given)} does not apply to it"
                )
            backend = "onnxruntime"
        backend = "pytorch" if backend is None else backend
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
        if _is_int8(dtype) and (backend != "pytorch" or compile):
            raise ValueError("dtype int8 runs on the eager pytorch backend (no onnxruntime, no compile)")
        if (backend == "onnxruntime" or _is_int8(dtype)) and (device is None or str(device) == "auto"):
            device = "cpu"  # onnxruntime and dynamic quantisation run on the CPU here
        net = load_model(model, device=device, dtype=dtype)
        # the weights' precision as they run (a reduced precision the device would only emulate fell back to float32)
        self.precision: str = (
            "int8" if _is_int8(dtype)
            else net.weights_dtype if isinstance(net, OnnxRuntimeModel)
            else str(next(net.parameters()).dtype).removeprefix("torch.")
        )  # fmt: skip
        self.model = runtime_model(net, backend, compile=compile)
        self.backend = backend
        self.model_name = str(model) if not isinstance(model, nn.Module) else type(model).__name__
        self.batch_size, self.max_pixels = batch_size, max_pixels
        from .modeling import min_input_size

        need = min_input_size(self.config)
        self.min_size = int(min_size) if min_size is not None else need
        check_crop_size(self.options, need)  # (before any output is written)
        k = self.config.num_labels
        # A one-label (binary) model predicts 0 = not the class, 1 = the class.
        self.num_classes = 2 if k == 1 else k
        names = class_names(self.config.id2label, k)
        self.class_names: list[str] = ["background", names[0]] if k == 1 else names
        # the data's own colours where the checkpoint's labels.json has them (segformer train writes it)
        from .run_files import stored_palette

        self.palette: np.ndarray = stored_palette(model, palette_for(self.class_names if k != 1 else 2))

    # The options of a predictor built without ``options`` for a checkpoint that stores none: the ADE20K
    # protocol, bounded work for huge images.
    default_options = InferenceOptions(mode="aligned")

    @classmethod
    def stored_options(cls, model: str | os.PathLike | nn.Module) -> InferenceOptions:
        """The evaluation protocol stored with a local checkpoint (``inference_config.json``), else
        :attr:`default_options`."""
        if isinstance(model, nn.Module):
            return cls.default_options
        from .run_files import load_inference_options

        return load_inference_options(model) or cls.default_options

    @property
    def config(self) -> Any:
        return self.model.config

    # Read-only views of self.options, as the attributes of earlier versions.
    mode = property(lambda self: self.options.mode)
    crop_size = property(lambda self: self.options.crop_size)
    stride = property(lambda self: self.options.stride)
    short_side = property(lambda self: self.options.short_side)
    long_side = property(lambda self: self.options.long_side)
    scales = property(lambda self: list(self.options.scales) if self.options.scales is not None else None)
    flip = property(lambda self: self.options.flip)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _labels_dtype(self) -> np.dtype:
        return np.dtype(np.uint8 if self.num_classes <= 256 else np.uint16 if self.num_classes <= 65536 else np.int32)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """RGB PIL image → (3, H, W) float32: /255, then ImageNet mean/std (:func:`segformer.images.normalize`)."""
        return torch.from_numpy(normalize(image))  # (3, H, W)

    def _check(self, image: Image.Image) -> None:
        if min(image.size) < self.min_size:
            raise ImageError(
                f"image is {image.width}x{image.height}, smaller than the minimum of {self.min_size} "
                "pixels a side for this model"
            )

    def load(self, source: ImageInput) -> Image.Image:
        """The RGB image the predictor would segment (see :func:`load_image`); raises ImageError."""
        image = load_image(source, max_pixels=self.max_pixels)
        self._check(image)
        return image

    # Above this many output elements per image (K·H·W), an aligned single pass's labels are upsampled from the
    # working size in row bands where the composed resizes do not apply (:func:`segformer.inference.predict_labels`'
    # band_above).
    chunk_threshold: int = 1 << 26

    def _run(self, images: list[Image.Image], return_probs: bool, return_confidence: bool) -> list[Segmentation]:
        """Same-size RGB images → one forward pass (through segformer.inference)."""
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)  # (B, 3, H, W)
        confidence = None
        if return_probs:
            probs = infer(self.model, batch, self.options)  # (B, K, H, W) float32 at the input size
            labels = labels_from_probs(probs)  # (B, H, W)
            if return_confidence:
                confidence = label_probability(probs, labels)
        elif return_confidence:  # the labels predict_labels gives, and no (B, K, H, W) probabilities
            probs = None
            labels, confidence = predict_confidence(self.model, batch, self.options, band_above=self.chunk_threshold)
        else:
            # Image by image at full resolution; a huge photo (7 GB of float32 logits for 150 classes at 12 MP)
            # without its full-size logits: through the composed resizes on the CPU, else in row bands from the
            # working size.
            probs = None
            labels = predict_labels(self.model, batch, self.options, band_above=self.chunk_threshold)
        labels_np = labels.cpu().numpy().astype(self._labels_dtype())
        probs_np = probs.float().cpu().numpy() if probs is not None else None
        top = confidence.float().cpu().numpy() if confidence is not None else None
        return [
            Segmentation(labels_np[i], None if probs_np is None else probs_np[i], None if top is None else top[i])
            for i in range(len(images))
        ]

    def predict_iter(
        self, images: Iterable[ImageInput], *, return_probs: bool = False, return_confidence: bool = False
    ) -> Iterator[tuple[ImageInput, Segmentation | ImageError]]:
        """Yield ``(source, Segmentation)`` for each input in order, or ``(source, ImageError)`` for one that
        cannot be read or is too small/large: a bad image never stops the others. The images share one set of
        full-resolution work areas (:class:`segformer.inference.WorkAreas`), kept by the iterator between images
        (b0, 150 classes, 640×480 photos, aligned: 285 instead of 527 ms per image)."""
        for source, _, result in self.predict_iter_with_images(
            images, return_probs=return_probs, return_confidence=return_confidence
        ):
            yield source, result

    def predict_iter_with_images(
        self, images: Iterable[ImageInput], *, return_probs: bool = False, return_confidence: bool = False
    ) -> Iterator[tuple[ImageInput, Image.Image | None, Segmentation | ImageError]]:
        """:meth:`predict_iter` that also yields the decoded RGB image each result belongs to (as :meth:`load`
        gives it; None for a failure): ``(source, image, Segmentation | ImageError)``, in order."""
        window: list[tuple[ImageInput, Image.Image | ImageError]] = []
        # the images' full-resolution work areas, mapped once for the whole iteration (not per image; those of the
        # caller's reuse_work_areas block if it is in one), held here between the yields: this thread's state is
        # the caller's own while the generator is suspended
        areas = WorkAreas.current()
        for source in images:
            try:
                loaded: Image.Image | ImageError = self.load(source)
            except ImageError as exc:
                loaded = exc
            window.append((source, loaded))
            if len(window) >= self.batch_size:
                yield from self._run_window(window, return_probs, return_confidence, areas)
                window = []
        if window:
            yield from self._run_window(window, return_probs, return_confidence, areas)

    def _run_window(
        self,
        window: list[tuple[ImageInput, Image.Image | ImageError]],
        return_probs: bool,
        return_confidence: bool,
        areas: WorkAreas,
    ) -> Iterator[tuple[ImageInput, Image.Image | None, Segmentation | ImageError]]:
        """One window of loaded images (or their errors) → results in order; same-size images share a pass."""
        results: dict[int, Segmentation | ImageError] = {}
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (_, img) in enumerate(window):
            if isinstance(img, ImageError):
                results[i] = img
            else:
                groups.setdefault(img.size, []).append(i)
        for idx in groups.values():
            failed = None  # the out-of-memory error's text: its traceback's frames hold the pass's tensors, so the
            try:  # retry below runs once the except clause has dropped them
                with reuse_work_areas(areas):
                    outs = self._run([window[i][1] for i in idx], return_probs, return_confidence)  # type: ignore
            except (RuntimeError, MemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                failed = str(exc)
            if failed is not None and len(idx) > 1:  # (the batch did not fit: each image on its own)
                for i in idx:
                    [(_, _, results[i])] = self._run_window([window[i]], return_probs, return_confidence, areas)
                continue
            if failed is not None:
                w, h = window[idx[0]][1].size  # type: ignore[union-attr]
                asked = re.search(r"allocate (\d+) bytes", failed)  # (the CPU allocator's words)
                gb = int(asked[1]) / 1e9 if asked else 0.0
                more = f"; {gb:,.0f} GB asked at once" if gb >= 10 else f"; {gb:.2g} GB asked at once" if asked else ""
                # (a raw allocator message, naming neither the image nor the option, ended the run: audit)
                outs = [ImageError(
                    f"not enough memory to segment it ({w}x{h}, {self.options.describe()}{more}): lower --scales or "
                    "--max-pixels, or use --mode slide", too_large=True,
                )]  # fmt: skip
            results.update(zip(idx, outs, strict=True))
        for i, (src, img) in enumerate(window):
            yield src, (img if isinstance(img, Image.Image) else None), results[i]

    def predict(
        self,
        images: ImageInput | Sequence[ImageInput],
        *,
        return_probs: bool = False,
        return_confidence: bool = False,
    ) -> Segmentation | list[Segmentation]:
        """One image → a :class:`Segmentation`; a list, a tuple or an iterator such as a generator (or a 4-D array /
        tensor, a batch of images) → a list. Raises :class:`ImageError` (naming the image) for the first input that
        cannot be segmented. A list's images share one set of full-resolution work areas, as :meth:`predict_iter`'s
        do (:func:`segformer.inference.reuse_work_areas`)."""
        batch = isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4
        single = not batch and not isinstance(images, (list, tuple, Iterator))  # (a generator: audit)
        items = [images] if single else list(images)
        out: list[Segmentation] = []
        for source, result in self.predict_iter(items, return_probs=return_probs, return_confidence=return_confidence):
            if isinstance(result, ImageError):
                if isinstance(source, (str, os.PathLike)):
                    raise ImageError(f"{source}: {result}")
                raise ImageError(f"image {len(out)}: {str(result).removeprefix('image: ')}")
            out.append(result)
        return out[0] if single else out

    __call__ = predict


def segment(
    images: ImageInput | Sequence[ImageInput],
    model: str | os.PathLike | nn.Module | SegformerPredictor = DEFAULT_MODEL,
    *,
    return_probs: bool = False,
    **options: Any,
) -> np.ndarray | tuple[np.ndarray, np.ndarray] | list:
    """Segment one image (or a list) in one call: (H, W) label maps at the original size.

    ``model``: a checkpoint directory, hub id, model or a ready :class:`SegformerPredictor` (reuse one for
    many calls: building it loads the weights). ``options`` go to SegformerPredictor (device, dtype, mode,
    scales, flip, batch_size, ...). With ``return_probs`` each result is ``(labels, probs)``, probs (K, H, W).
    """
    if isinstance(model, SegformerPredictor) and options:
        raise TypeError(
            f"segment() got {', '.join(sorted(options))} with a ready SegformerPredictor, which keeps the options "
            "it was built with: pass them to SegformerPredictor(...), or pass the model instead of the predictor"
        )
    predictor = model if isinstance(model, SegformerPredictor) else SegformerPredictor(model, **options)
    result = predictor.predict(images, return_probs=return_probs)
    pick = (lambda s: (s.labels, s.probs)) if return_probs else (lambda s: s.labels)
    return [pick(s) for s in result] if isinstance(result, list) else pick(result)


__all__ = [
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MODEL",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "ImageError",
    "SegformerPredictor",
    "Segmentation",
    "load_image",
    "load_model",
    "resolve_dtype",
    "segment",
    "select_device",
    "to_rgb",
]

"""Sub-commands of the ``segformer`` program, one module each (see segformer/cli.py), the few argument types
they share, and the inference options that ``segformer eval``, ``predict``, ``serve`` and ``train`` all declare
(:func:`add_inference_arguments`, read back with :func:`inference_options_from_args`)."""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segformer.inference import InferenceOptions


def scales_arg(text: str) -> list[float]:
    """argparse type for multi-scale ratios: ``0.75`` or ``0.75,1,1.25``; with ``nargs="+"`` both
    ``--scales 0.75 1 1.25`` and ``--scales 0.75,1,1.25`` work (flatten with :func:`flatten`)."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        # (--scales 0.75 1 1.25 photo.jpg: the photo is taken as one more scale, the message alone was puzzling)
        hint = (
            ": an existing path; put the inputs before --scales, or end the scales with --"
            if os.path.exists(text)
            else ""
        )
        raise argparse.ArgumentTypeError(f"expected numbers such as 0.75,1,1.25, got {text!r}{hint}") from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values):  # (nan passed here: audit)
        raise argparse.ArgumentTypeError(f"scales must be positive finite numbers, got {text!r}")
    return values


def flatten(groups: list[list[float]] | None) -> list[float] | None:
    return None if groups is None else [v for group in groups for v in group]


def pair_arg(text: str) -> tuple[int, int]:
    """argparse type for one-word sizes: ``N`` (N, N), ``H,W`` or ``HxW``."""
    parts = text.replace("x", ",").split(",")
    try:
        values = [int(p) for p in parts]  # (an empty part, "48,x" or "48,", is no number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or H,W, got {text!r}") from None
    if len(values) not in (1, 2) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected one or two positive integers (N or H,W), got {text!r}")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


class SizeAction(argparse.Action):
    """A (H, W) size from ``N``, ``H,W`` / ``HxW`` (one word) or ``H W`` (two words, where the option takes
    ``nargs="+"``: only in commands without positional arguments, which the words would swallow)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        words = values if isinstance(values, list) else [values]
        try:
            if len(words) == 1:
                size = pair_arg(words[0])
            elif len(words) == 2:
                size = pair_arg(",".join(words))
            else:
                raise argparse.ArgumentTypeError(f"expected N, H,W or H W, got {' '.join(words)!r}")
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentError(self, str(exc)) from None
        setattr(namespace, self.dest, size)


def int_at_least(minimum: int):
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text}")
        return value

    return parse


positive_int, non_negative_int = int_at_least(1), int_at_least(0)


def path_arg(text: str) -> Path:
    """argparse type: a path, not the empty string (``-o "$OUT"`` with OUT unset read as the current folder and
    wrote there: audit)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return Path(text)


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    value = non_negative_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


class _Once(argparse.Action):
    """An option that may be given once (argparse keeps the last of several: another model served without a
    word)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: Any = None):
        earlier = getattr(namespace, self.dest, None)
        if earlier is not None and earlier != values:
            parser.error(f"{option} given twice ({earlier} and {values}); give it once")
        setattr(namespace, self.dest, values)


def add_model_arguments(parser: argparse.ArgumentParser, help: str) -> None:
    """The model as a positional MODEL or as ``--model`` (as train, eval and predict take it); read it with
    :func:`model_argument`."""
    parser.add_argument("model", metavar="MODEL", nargs="?", help=f"{help} (or --model MODEL)")
    parser.add_argument("--model", dest="model_option", metavar="MODEL", action=_Once, help="the model, as MODEL")


def model_argument(args: argparse.Namespace) -> str:
    """The model :func:`add_model_arguments` read; ValueError when it is missing or given twice otherwise."""
    given, option = args.model, args.model_option
    if given is not None and option is not None and given != option:
        raise ValueError(f"the model is given twice ({given} and --model {option}); give it once")
    if given is None and option is None:
        raise ValueError("the model is required: MODEL or --model MODEL (a checkpoint directory, hub id or ONNX file)")
    return given if given is not None else option


def add_label_arguments(parser: argparse.ArgumentParser, *, evaluating: bool = False) -> None:
    """--ignore-index, --reduce-labels (how stored mask values become classes) and, for Hugging Face datasets,
    --image-column, --label-column, --labels. ``evaluating``: the help names the defaults a checkpoint gives."""
    model = (
        "; when not given, a checkpoint trained by segformer train gives its own, for data of its classes"
        if evaluating
        else ""
    )
    parser.add_argument(
        "--ignore-index",
        type=non_negative_int,
        metavar="N",
        help='mask value meaning "unlabelled", ignored by the loss and the metrics, besides 255 which always '
        f'is (also "ignore_index" in labels.json{model})',
    )
    reduce_default = ", else the model's own (its preprocessor_config.json)" if evaluating else ""
    parser.add_argument(
        "--reduce-labels",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ADE20K's label reduction: mask value 0 means 'other' (ignored) and value k is class k-1 "
        f'(default: on for ADE20K, else labels.json\'s "reduce_labels"{reduce_default}, else off)',
    )
    parser.add_argument("--image-column", help="Hugging Face dataset: the image column (default: detected)")
    parser.add_argument("--label-column", help="Hugging Face dataset: the mask column (default: detected)")
    parser.add_argument(
        "--labels",
        help="a labels.json with the class names (and label rules) to use instead of the one beside the data "
        "(own data: a folder layout or a Hugging Face dataset)",
    )


def _dests(prefix: str) -> dict[str, str]:
    """InferenceOptions field → argparse dest (``crop_size`` is stored as ``crop``, as it always was)."""
    from segformer.inference import InferenceOptions

    p = prefix.replace("-", "_")
    return {f: p + ("crop" if f == "crop_size" else f) for f in InferenceOptions.__dataclass_fields__}


def add_inference_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    prefix: str = "",
    *,
    defaults: dict[str, Any] | None = None,
    one_word_sizes: bool = False,
    protocol: str = "the data set protocol (folder: whole)",
    sizes_from: str = "checkpoint",
) -> None:
    """The options of :class:`segformer.inference.InferenceOptions`, each as ``--{prefix}NAME``: mode, crop,
    stride, short-side, long-side, align, scales, flip; read them back with :func:`inference_options_from_args`.

    ``defaults`` (InferenceOptions fields, e.g. {"mode": "aligned"}) over InferenceOptions' own become the
    options' defaults; without it every option defaults to None ("not given": the command then takes the
    checkpoint's and/or the data set's protocol, see ``sizes_from``). Sizes (``--crop-size``, alias ``--crop``, and
    ``--stride``) take ``N`` or ``H,W`` everywhere, and also ``H W`` unless ``one_word_sizes`` (commands with
    positional arguments, ``segformer predict``, which two words would swallow). ``protocol``: what the mode
    defaults to when ``defaults`` is None (for the help text). ``sizes_from`` (for the help text too): where the
    sizes' defaults come from when ``defaults`` is None: "checkpoint" (``segformer predict`` and ``serve``: the
    checkpoint's inference_config.json, else InferenceOptions' own), "checkpoint, data set" (``segformer eval``:
    the checkpoint's, else the data set's protocol) or "data set" (``segformer train``: the data set's protocol).
    """
    from segformer.inference import MODES, InferenceOptions

    dash, dest = f"--{prefix}", _dests(prefix)
    values = InferenceOptions(**defaults).to_dict() if defaults is not None else None

    def default(name: str) -> Any:
        value = None if values is None else values[name]
        return tuple(value) if isinstance(value, list) else value

    def shown(name: str, fallback: str) -> str:
        value = default(name)
        if value is None:
            return fallback
        if isinstance(value, tuple):
            return ",".join(map(str, value))
        return str(value)

    def fallback(plain: str, cityscapes: str | None = None) -> str:
        """The help's default when ``defaults`` is None: InferenceOptions' own value ``plain``, which the Cityscapes
        protocol replaces with ``cityscapes``, and a checkpoint's inference_config.json with its own."""
        data = plain if cityscapes is None else f"{plain}; Cityscapes {cityscapes}"
        if sizes_from == "checkpoint":
            return f"the checkpoint's, else {plain}"
        if sizes_from == "checkpoint, data set":
            return f"the checkpoint's, else {data}"
        return data

    crop = f"{dash}crop-size"
    parser.add_argument(
        f"{dash}mode",
        dest=dest["mode"],
        choices=list(MODES),
        default=default("mode"),
        help=f"whole: the image as is; aligned: resize keeping the ratio to fit {dash}long-side x {dash}short-side "
        f"and round the sides up to multiples of {dash}align (ADE20K); slide: {crop} windows at {dash}stride "
        f"(Cityscapes). Default: {shown('mode', protocol)}",
    )
    size: dict[str, Any] = dict(action=SizeAction, metavar="N|H,W")
    if not one_word_sizes:
        size["nargs"] = "+"
    for name, flags, what, otherwise, note in (
        ("crop_size", (crop, f"{dash}crop"), "window size", fallback("512,512", "1024,1024"), ""),
        (
            "stride",
            (f"{dash}stride",),
            "window stride",
            fallback("341,341", "768,768"),
            f"; {crop} given alone, below the stride in force, scales the stride with it (same ratio)",
        ),
    ):
        forms = "N or H,W" if one_word_sizes else "N, H,W or H W"
        help_text = f"slide mode: {what}, {forms} (default: {shown(name, otherwise)}){note}"
        parser.add_argument(*flags, dest=dest[name], default=default(name), **size, help=help_text)
    for name, flag, what, plain in (
        ("short_side", "short-side", "short-side target", "512"),
        ("long_side", "long-side", "long-side limit", "2048"),
        ("align", "align", "sides rounded up to multiples of this", "32"),
    ):
        parser.add_argument(
            f"{dash}{flag}",
            dest=dest[name],
            type=positive_int,
            default=default(name),
            help=f"aligned mode: {what} (default: {shown(name, fallback(plain))})",
        )
    parser.add_argument(
        f"{dash}scales",
        dest=dest["scales"],
        type=scales_arg,
        nargs="+",
        default=None,
        metavar="S",
        help="multi-scale test: size ratios, e.g. 0.75 1.0 1.25 or 0.75,1.0,1.25 (default: one pass at scale 1)",
    )
    parser.add_argument(
        f"{dash}flip",
        dest=dest["flip"],
        action=argparse.BooleanOptionalAction,
        default=default("flip"),
        help=(
            f"add horizontally flipped passes (probabilities averaged); --no-{prefix}flip turns off a flip that a "
            "checkpoint's inference_config.json asks for"
            if not prefix
            else "add horizontally flipped passes to the evaluations (probabilities averaged; default: off)"
        ),
    )


def inference_overrides(args: argparse.Namespace, prefix: str = "") -> dict[str, Any]:
    """The options :func:`add_inference_arguments` put into ``args`` as InferenceOptions fields, those not
    given (None) left out; ``scales`` flattened, sizes as tuples."""
    out: dict[str, Any] = {}
    for name, dest in _dests(prefix).items():
        value = getattr(args, dest, None)
        if name == "scales":
            value = flatten(value) or None
        elif isinstance(value, list):
            value = tuple(value)
        if value is not None:
            out[name] = value
    return out


def inference_options_from_args(
    args: argparse.Namespace, prefix: str = "", *, base: InferenceOptions | None = None
) -> InferenceOptions:
    """``base`` (default: InferenceOptions()) with the options given on the command line applied
    (see :func:`add_inference_arguments`); raises ValueError for an invalid combination. Sizes given for another
    mode than the one that runs (``--crop`` with whole or aligned: the mode comes from the checkpoint or the data
    set unless ``--mode`` is given) are warned about in one line: they change nothing, though the options record
    them."""
    from segformer.inference import InferenceOptions

    given = inference_overrides(args, prefix)
    try:
        options = (base if base is not None else InferenceOptions()).changed(**given)
    except ValueError as exc:  # (it names the fields: "stride (600, 600) is larger than crop_size (512, 512)")
        fields = "|".join(_dests(prefix))
        named = re.sub(rf"\b({fields})\b", lambda m: f"--{prefix}{m.group(1).replace('_', '-')}", str(exc))
        raise ValueError(named) from None
    options.warn_unused(given, prefix)
    return options


BACKENDS = ("pytorch", "onnxruntime")  # segformer.backends.BACKENDS (a test checks): importing it would load torch


def add_backend_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--backend and --compile: where the forward pass runs (:func:`segformer.backends.runtime_model`), shared
    by the commands that run a model over images (predict, eval, serve)."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        help="pytorch (default) or onnxruntime: the checkpoint exported to ONNX once, verified against PyTorch "
        "and cached ($SEGFORMER_CACHE, else $XDG_CACHE_HOME/segformer, else ~/.cache/segformer); CPU only, "
        "float32 (needs segformer[onnx]); an ONNX file given as the model runs on onnxruntime in the precision it "
        "was exported in",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the model ahead of time (AOTInductor; pytorch backend): 33-42 s per new input shape the "
        "first time (b0 at 512x512 on two CPU cores), cached as --backend's artefacts are, so later runs on the "
        "same shapes start in seconds and run each forward pass in 0.94-0.98x of the eager time (0.90-0.91x on "
        "an AVX2-only CPU); pays off for many images of one size",
    )


def backend_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """``{"backend": ..., "compile": ...}`` from :func:`add_backend_arguments`'s options; ValueError naming the
    flag for a combination that cannot run."""
    if args.compile and args.backend == "onnxruntime":
        raise ValueError("--compile applies to --backend pytorch; onnxruntime optimises its graph itself")
    return {"backend": args.backend, "compile": bool(args.compile)}  # (backend None: the model's own)

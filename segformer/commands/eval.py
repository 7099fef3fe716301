"""``segformer eval``: mIoU / aAcc / mAcc of a checkpoint on a data set (also under torchrun)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from . import (
    add_backend_arguments,
    add_inference_arguments,
    add_label_arguments,
    backend_arguments,
    inference_options_from_args,
    inference_overrides,
    non_negative_int,
    path_arg,
    positive_int,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: per-class IoU, mIoU, aAcc, mAcc",
        description="Evaluate a segmentation checkpoint on a data set's split. Prints a per-class table and, "
        'with --json, writes {"mIoU", "aAcc", "mAcc", "IoU": {class: value}, "Acc": {class: value}, "num_pixels", '
        '"num_images", "inference": the options used, "amp": the autocast that ran (and "amp_fallback_reason" where '
        'it was not the one asked for), "model", "data", "split", "dataset" (its kind) and "labels" (how the masks '
        'were read: "num_labels", "reduce_labels", "ignore_values", "value_map")} (fractions in [0, 1]; IoU null '
        "for a class absent from both labels and predictions, Acc null for one absent from the labels). Runs under "
        "torchrun too (images split over ranks). "
        "--corruptions adds a robustness study (the paper's Cityscapes-C: the images corrupted on the fly, "
        "mIoU per corruption and severity, relative robustness, a heat map; resumable); --report DIR writes an "
        "HTML report with the confusion matrix, per-class IoU and the worst images.",
        epilog="examples:\n"
        "  segformer eval --data ADEChallengeData2016 --model nvidia/segformer-b0-finetuned-ade-512-512\n"
        "  segformer eval --data cityscapes --model runs/city/best --mode slide --scales 0.5 1.0 1.5 --flip\n"
        "  segformer eval --data cityscapes --model runs/city/best --corruptions all --output city-c --report rep\n"
        "  segformer eval --data my_data --model runs/x/best --corruptions noise,fog --severities 1,3,5 --json r.json\n"
        "\n"
        "corruptions (--corruptions all, a category or names):\n"
        "  noise    gaussian_noise, shot_noise, impulse_noise, speckle_noise\n"
        "  blur     defocus_blur, glass_blur, motion_blur, gaussian_blur\n"
        "  weather  snow, spatter, fog, frost\n"
        "  digital  brightness, contrast, saturate, jpeg_compression",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        help="data: a folder layout, ADE20K or Cityscapes directory, or a "
        "Hugging Face dataset (save_to_disk folder, parquet folder, hub id)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="checkpoint directory (save_pretrained layout), hub id, or an ONNX file `segformer export` wrote (run by "
        "onnxruntime on the CPU)",
    )
    p.add_argument(
        "--dataset",
        default="auto",
        choices=["auto", "folder", "ade20k", "cityscapes", "hf"],
        help="data layout (default: detected)",
    )
    p.add_argument("--split", default="val", help="split to evaluate: train, val or test (default: val)")
    add_label_arguments(p, evaluating=True)  # --ignore-index N, --reduce-labels
    # --mode, --crop H W, --stride H W, --short-side, ..., --scales, --flip
    add_inference_arguments(
        p,
        protocol="the checkpoint's own (inference_config.json, from segformer train), else the data set's",
        sizes_from="checkpoint, data set",
    )
    p.add_argument(
        "--json",
        type=path_arg,
        help='write the metrics to this JSON file (with --corruptions, the study too, under "robustness")',
    )
    p.add_argument(
        "--amp",
        choices=["none", "bf16", "fp16"],
        default="none",
        help="autocast dtype (default none); only where the device computes in it and it pays (a GPU; bf16 on a CPU "
        "with AVX-512-BF16 or AMX; fp16 not on a CPU), else one line says so and it runs in float32, faster there",
    )
    p.add_argument(
        "--int8",
        action="store_true",
        help="evaluate the model as segformer predict --dtype int8 runs it (CPU): the encoder's linear layers "
        "dynamically quantised, to measure what int8 costs in mIoU before deploying it",
    )
    add_backend_arguments(p)  # --backend pytorch|onnxruntime, --compile
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    p.add_argument("--max-images", type=positive_int, help="evaluate only the first N images (a quick check)")
    p.add_argument(
        "--check-data",
        choices=["full", "headers", "off"],
        default="full",
        help="open every image/mask pair first, as segformer train does: unpaired files, unreadable ones, sizes "
        "that differ and labels outside the classes are listed with their names, and nothing is evaluated "
        "(full; headers: pairing and sizes only; off)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=2,
        help="data-loading processes, which also corrupt the images (default 2)",
    )
    robust = p.add_argument_group("robustness study and report")
    robust.add_argument(
        "--corruptions",
        metavar="all|NAME[,NAME...]",
        help="also evaluate on corrupted copies of the images (made on the fly, never written): all 16 corruptions "
        "of the paper's study, a category (noise, blur, weather, digital) or names, comma-separated",
    )
    robust.add_argument(
        "--severities",
        metavar="S[,S...]",
        help="corruption severities 1-5 for every corruption (default: the paper's, noise 1,2,3 and the rest "
        "1,2,3,4,5)",
    )
    robust.add_argument(
        "--output",
        type=path_arg,
        metavar="DIR",
        help="folder of the study: robustness_partial.json (every finished cell; a rerun resumes from it), "
        "robustness.json and the heat map robustness.png (default: the --report folder, else ./robustness)",
    )
    robust.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of the corruptions' randomness (default 0; same seed, same images)",
    )
    robust.add_argument(
        "--report",
        type=path_arg,
        metavar="DIR",
        help="write an evaluation report to DIR: report.html (opens offline) with the normalised confusion "
        "matrix, per-class IoU, the worst images (image | ground truth | prediction), metrics.json and, with "
        "--corruptions, the robustness heat map; needs matplotlib",
    )
    robust.add_argument(
        "--worst",
        type=non_negative_int,
        default=8,
        metavar="K",
        help="--report: how many of the lowest-mIoU images to show (default 8)",
    )
    p.set_defaults(func=run)


def _note_other_names(model_names: dict, dataset) -> None:
    """One warning line where the checkpoint names its classes otherwise than the data set (the same count, in
    another order or other words): the table shows the data's names, which may not be the classes the model
    learnt under those ids (audit). Checkpoints without names (LABEL_k) say nothing, and neither do spellings of
    one benchmark's names (segformer.visualize.renamed_classes)."""
    import logging

    from segformer.visualize import renamed_classes

    differ = renamed_classes(model_names, dataset.id2label)
    if differ and not all(m in (f"LABEL_{i}", "") for i, m, _ in differ):
        shown = ", ".join(f"{i}: {m!r} vs {d!r}" for i, m, d in differ[:3]) + (" ..." if len(differ) > 3 else "")
        logging.getLogger("segformer").warning(
            f"the checkpoint names {len(differ)} class(es) otherwise than the data ({shown}); the table uses the "
            "data's names: check that both number the classes alike"
        )


def _stored_ignore_value(args: argparse.Namespace, dataset: object) -> int | None:
    """The stored mask value a local checkpoint's ``labels.json`` reads as unlabelled that the data's own rules
    do not (the run's ``--ignore-index``), when ``--ignore-index`` is not given and the data has the same classes;
    else None. Two or more such values (an edited file) are a warning: one option cannot carry them."""
    from segformer.data.datasets import IGNORE_INDEX
    from segformer.run_files import stored_label_spec

    stored = stored_label_spec(args.model) if args.ignore_index is None else None
    spec = getattr(dataset, "spec", None)
    if stored is None or spec is None or stored.id2label != spec.id2label:
        return None
    extra = sorted(set(stored.ignore_values) - set(spec.ignore_values) - {IGNORE_INDEX})
    if len(extra) > 1:
        logging.getLogger("segformer").warning(
            f"{args.model}: its label rules read mask values {', '.join(map(str, extra))} as unlabelled, the data's "
            'none of them: give them as "ignore_index" in the data\'s labels.json (or one passed with --labels) to '
            "evaluate as the model was trained"
        )
        return None
    return extra[0] if extra else None


def _stated_reduce_labels(args: argparse.Namespace, kind: str) -> tuple[bool | None, str]:
    """The data's own word on label reduction: ``reduce_labels`` in the labels.json build_dataset reads (--labels,
    else the one beside the data; a Hugging Face dataset's id2label.json too), False where it has a palette (whose
    colours are the class ids), None where it says nothing (or cannot be read: build_dataset says why); and what
    that file says, as the messages give it."""
    if kind not in ("folder", "hf"):
        return None, ""
    if args.labels is not None:
        path = Path(args.labels)
    else:  # (a Hugging Face dataset's folder may keep it as id2label.json: build_dataset reads either)
        path = next((p for p in (Path(args.data) / n for n in ("labels.json", "id2label.json")) if p.is_file()), None)
        if path is None or (path.name == "id2label.json" and kind != "hf"):
            return None, ""
    where = f"--labels {path}" if args.labels is not None else f"the data's {path.name}"
    try:
        spec = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, ValueError):
        return None, where
    stated = spec.get("reduce_labels") if isinstance(spec, dict) else None
    if stated is None and isinstance(spec, dict) and "palette" in spec:
        return False, f"{where} has a palette, whose colours give the class ids"
    return (stated if isinstance(stated, bool) else None), f'{where} says "reduce_labels": {str(stated).lower()}'


_NAMES = {"ade20k": "ADE20K", "cityscapes": "Cityscapes"}  # (data-set kinds as the protocol line names them)


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from segformer.data.build import build_dataset, check_splits, detect_kind, label_options, protocol_kind
    from segformer.distributed import cleanup, init_distributed
    from segformer.evaluate import eval_options, evaluate, load_model_for_eval
    from segformer.fileio import atomic_write_text, check_output_file
    from segformer.inference import effective_amp
    from segformer.metrics import format_table, metrics_to_json
    from segformer.run_files import load_inference_options, stored_reduce_labels

    # the study's and the report's arguments are checked before anything is loaded
    corruptions = severities = None
    if args.corruptions is not None:
        from segformer.corruptions import parse_corruptions, parse_severities, require_scipy

        corruptions = parse_corruptions(args.corruptions)
        require_scipy(corruptions)
        severities = None if args.severities is None else parse_severities(args.severities)
    elif args.severities is not None or args.output is not None:
        flag = "--severities" if args.severities is not None else "--output"
        raise ValueError(f"{flag} belongs to the robustness study: add --corruptions all|NAME[,NAME...]")
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.report is not None:
        from segformer.report import require_plotting

        require_plotting()
        if args.report.exists() and not args.report.is_dir():
            raise ValueError(f"--report {args.report}: a file is there; the report needs a folder")

    from segformer.backends import is_onnx_file

    onnx = is_onnx_file(args.model)
    if onnx:  # (a file segformer export wrote: onnxruntime on the CPU, as it is)
        flags = (
            ("--backend pytorch", args.backend == "pytorch"),
            ("--compile", args.compile),
            ("--int8", args.int8),
            (f"--amp {args.amp}", args.amp != "none"),
        )
        given = [flag for flag, on in flags if on]
        if given:
            raise ValueError(
                f"{args.model}: an ONNX file runs on onnxruntime as it is: {', '.join(given)} does not apply to it"
            )
        args.backend = "onnxruntime"
        args.device = args.device or "cpu"
    args.backend = args.backend or "pytorch"
    info = init_distributed(args.device)
    try:
        kind = detect_kind(args.data) if args.dataset == "auto" else args.dataset
        # the checkpoint's own protocol (inference_config.json, written by segformer train), else the data set's
        # (ADE20K's for a Hugging Face copy of it: scene_parse_150); then the flags (checked here: a bad
        # combination is told before the data and the model are read)
        stored_protocol = load_inference_options(args.model)
        protocol = kind if stored_protocol is not None else protocol_kind(args.data, kind, **label_options(args))
        options = inference_options_from_args(args, base=stored_protocol or eval_options(protocol))
        given = bool(inference_overrides(args))
        # where the protocol came from, for --json: the checkpoint's, the data set's (by kind), with the flags over it
        origin = {"from": "checkpoint" if stored_protocol is not None else "data", "flags": given}
        if stored_protocol is None:
            origin["kind"] = protocol
        if protocol != kind and stored_protocol is None and not given and info.is_main:  # (a default that is news)
            print(
                f"segformer eval: {args.data} is {_NAMES.get(protocol, protocol)}: evaluating with its protocol "
                f"({options.describe()}); --mode whole evaluates the images at their own size",
                file=sys.stderr,
            )
        # where a checkpoint keeps its label rules: its files, or an ONNX file's metadata
        source = "its metadata" if onnx else "its preprocessor_config.json"
        stated, stated_in = _stated_reduce_labels(args, kind)
        trained_reduced = args.reduce_labels is None and kind in ("folder", "hf") and stored_reduce_labels(args.model)
        if trained_reduced and stated is None:
            args.reduce_labels = True  # (the masks' 0 was ignored and k became k - 1 in training: so here)
            if info.is_main:  # (under torchrun every rank took the decision alike, and said it: notes)
                print(
                    f"segformer eval: {args.model} was trained on reduced labels ({source}): evaluating so "
                    "(--no-reduce-labels evaluates the stored values)",
                    file=sys.stderr,
                )
        elif trained_reduced and not stated and info.is_main:  # (the data knows how its masks are stored:
            print(  # reducing again dropped class 0 and shifted the rest)
                f"segformer eval: {args.model} was trained on reduced labels ({source}); {stated_in}: "
                "evaluating the stored values",
                file=sys.stderr,
            )
        dataset, listing = build_dataset(args.data, args.split, kind=kind, **label_options(args))
        ignored = _stored_ignore_value(args, dataset)
        if ignored is not None:  # (the run's --ignore-index: without it those pixels would count as errors)
            args.ignore_index = ignored
            dataset, listing = build_dataset(args.data, args.split, kind=kind, **label_options(args))
            if info.is_main:
                print(
                    f"segformer eval: {args.model} was trained with mask value {ignored} read as unlabelled "
                    f"({'its metadata' if onnx else 'its labels.json'}): evaluating so "
                    "(--ignore-index N sets another)",
                    file=sys.stderr,
                )
        check_splits([(dataset, listing)], args.check_data, args.data, learning=False)
        model = load_model_for_eval(args.model, info.device)
        if info.is_main:
            _note_other_names(model.config.id2label, dataset)
        backend = backend_arguments(args)
        if args.int8:
            if info.device.type != "cpu":
                raise ValueError(f"--int8 (dynamic quantisation) runs on the CPU; got --device {info.device}")
            if args.amp != "none" or backend != {"backend": "pytorch", "compile": False}:
                raise ValueError("--int8 runs the PyTorch model itself: leave out --amp, --backend and --compile")
            from segformer.backends import quantize_int8

            model = quantize_int8(model)
        if backend != {"backend": "pytorch", "compile": False}:
            if args.amp != "none":
                raise ValueError("--amp needs --backend pytorch without --compile")
            from segformer.backends import runtime_model

            model = runtime_model(model, **backend)
        common = dict(amp=args.amp, max_images=args.max_images, num_workers=args.workers, progress=True)
        details = result = None
        if args.report is not None:
            from segformer.report import evaluate_details

            details = evaluate_details(model, dataset, options, worst=args.worst, **common)
            metrics = details.metrics
        elif corruptions is None:
            metrics = evaluate(model, dataset, options, **common)
        if corruptions is not None:
            from segformer.robustness import run_study

            output = args.output or args.report or Path("robustness")
            result = run_study(
                model,
                dataset,
                options,
                corruptions=corruptions,
                severities=severities,
                output=output,
                seed=args.seed,
                clean_metrics=None if details is None else details.metrics,
                **common,
            )
            metrics = result.clean if details is None else details.metrics
        if info.is_main:
            int8 = ", int8 (dynamic)" if args.int8 else ""
            print(f"{dataset.name}: {metrics['num_images']} images, {options.describe()}{int8}")
            print(format_table(metrics))
            if result is not None:
                print()
                print(result.format_table())
                drawn = result.heatmap is not None
                heatmap = " and robustness.png" if drawn else ' (no heat map: pip install "segformer[plot]")'
                print(f"wrote {output / 'robustness.json'}{heatmap}", file=sys.stderr)
            if args.json:
                saved = {**metrics_to_json(metrics), "inference": options.to_dict(), "protocol": origin}
                # what was evaluated, and how its masks were read (the automatic label decisions above: audit)
                spec = dataset.spec.describe()
                saved |= {"model": str(args.model), "data": str(args.data), "split": args.split, "dataset": kind}
                saved["labels"] = {k: spec[k] for k in ("num_labels", "reduce_labels", "ignore_values", "value_map")}
                ran, reason = effective_amp(args.amp, info.device)  # what the numbers were computed in (audit)
                saved["amp"] = ran
                if reason is not None:
                    saved["amp_fallback_reason"] = reason
                if args.int8:
                    saved["dtype"] = "int8"
                if result is not None:
                    saved["robustness"] = result.to_dict()
                atomic_write_text(args.json, json.dumps(saved, indent=2) + "\n")
                print(f"wrote {args.json}", file=sys.stderr)
            if details is not None:
                from segformer.report import write_report

                path = write_report(
                    args.report, details, dataset, model_name=str(args.model), options=options, robustness=result
                )
                print(f"wrote {path}", file=sys.stderr)
    finally:
        cleanup()
    return 0

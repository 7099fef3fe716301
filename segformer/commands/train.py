"""``segformer train``: fine-tune with the paper's recipe (also ``torchrun ... -m segformer.train``)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from . import add_inference_arguments, add_label_arguments, flatten, path_arg

if TYPE_CHECKING:
    from segformer.train import TrainConfig

DESCRIPTION = (
    "Fine-tune SegFormer (AdamW, warm-up + poly schedule) on a folder-layout, ADE20K, Cityscapes or Hugging Face "
    "data set, on one process or under torchrun. ADE20K and Cityscapes get the paper's recipe exactly; own data "
    "gets one derived from the data and the run: images at their own scale; from fresh weights the plain loop's "
    "choices (one lr for head and encoder, no warm-up, uniform crops, no random ratio or photometric "
    "distortion); from a pretrained checkpoint the paper's, with a warm-up of 10% of --steps. The recipe "
    "in use is printed at the start and stored in OUTPUT/train_config.json; every part of it can be set. Writes "
    "OUTPUT/last, OUTPUT/best (complete checkpoints: weights, processor config, evaluation protocol, label rules "
    "(labels.json), model card), "
    "OUTPUT/metrics.jsonl."
)

EPILOG = """examples:
  segformer train --data ADEChallengeData2016 --model nvidia/mit-b0 --output runs/ade-b0
  segformer train --data cityscapes --model nvidia/mit-b2 --crop 1024 1024 --batch-size 8 --steps 160000
  segformer train --data my_data --model nvidia/segformer-b0-finetuned-ade-512-512 --steps 8000 --lr 6e-5
  torchrun --standalone --nproc_per_node=8 -m segformer.train --data ADEChallengeData2016 --model nvidia/mit-b0
  segformer train ... --output runs/ade-b0 --resume auto      # continue an interrupted run exactly
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the recipe (segformer.train.TrainConfig); unset options keep the paper's defaults."""
    _data_and_model_arguments(p)
    _labels_arguments(p)
    _schedule_and_optimiser_arguments(p)
    _augmentation_arguments(p)
    _model_options_arguments(p)
    _loop_arguments(p)
    _evaluation_during_training_arguments(p)


def _folder(text: str) -> str:
    """argparse type of --output: a path, kept as text (TrainConfig's, and train_config.json's, form)."""
    return str(path_arg(text))


def _data_and_model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and model")
    g.add_argument(
        "--data",
        required=True,
        help="data: a folder layout (images/, annotations/ or masks/, labels.json), "
        "ADEChallengeData2016, Cityscapes, or a Hugging Face dataset (save_to_disk folder, parquet "
        "folder, hub id)",
    )
    g.add_argument(
        "--dataset", choices=["auto", "folder", "ade20k", "cityscapes", "hf"], help="layout (default: detected)"
    )
    g.add_argument(
        "--model",
        help="variant b0..b5 (fresh weights), a config.json, or a checkpoint directory / hub "
        "id: an ImageNet encoder (nvidia/mit-b0) or a fine-tuned model (its head is re-initialised "
        "for a different label set: another number of classes, or other class names). Default: b0",
    )
    g.add_argument("--output", type=_folder, help="run directory (default: runs/segformer)")
    g.add_argument(
        "--resume",
        help="'auto' (continue the run in --output) or a run's last/ directory (continued in that run's folder "
        "unless --output names a new one): the run continues with its own settings (train_config.json), "
        "intervals included; of the options, only where and how it runs may be given anew (--data path, "
        "--stop-at, --workers, --device, --check-data, --max-eval-images, --log-every, --no-progress, "
        "--eval-every, --save-every)",
    )
    g.add_argument(
        "--check-data",
        choices=["full", "headers", "off"],
        help="before training, open every file and check pairs, sizes and label values (full, "
        "default), only read headers, or skip",
    )


def _labels_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("labels")
    add_label_arguments(g)  # --ignore-index N, --reduce-labels
    g.add_argument(
        "--class-weights",
        choices=["none", "auto", "labels"],
        help="loss weight per class: none (default), auto (median-frequency balancing computed once "
        'from the training masks, for imbalanced data) or labels ("class_weights" in labels.json)',
    )


def _schedule_and_optimiser_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("schedule and optimiser (defaults: the paper's ADE20K recipe)")
    g.add_argument("--steps", type=int, help="optimiser steps (default 160000)")
    g.add_argument("--batch-size", type=int, help="global batch: all processes and accumulation steps (default 16)")
    g.add_argument("--accum-steps", type=int, help="gradient accumulation steps per optimiser step (default 1)")
    g.add_argument(
        "--lr",
        type=float,
        help="base learning rate (default: 6e-5, the paper's, for ADE20K, Cityscapes and a pretrained checkpoint; "
        "6e-4 for own data from fresh weights)",
    )
    g.add_argument(
        "--head-lr-mult",
        type=float,
        help="decode-head lr multiplier (default: 10; 1 for own data from fresh weights)",
    )
    g.add_argument(
        "--weight-decay", type=float, help="AdamW weight decay; none on the encoder's norm layers (default 0.01)"
    )
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="AdamW betas (default 0.9 0.999)")
    g.add_argument("--adam-eps", type=float, help="AdamW epsilon, added to the gradient RMS (default 1e-8)")
    g.add_argument(
        "--warmup-steps",
        type=int,
        help="linear warm-up steps (default: 1500 for ADE20K / Cityscapes; own data: 0 from fresh weights, 10%% of "
        "--steps (at most 1500) from a pretrained checkpoint)",
    )
    g.add_argument("--warmup-ratio", type=float, help="warm-up start factor (default 1e-6)")
    g.add_argument("--poly-power", type=float, help="poly decay power (default 1.0)")
    g.add_argument("--min-lr", type=float, help="final learning rate (default 0)")


def _augmentation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("augmentation (defaults: the paper's train pipeline)")
    g.add_argument("--crop", type=int, nargs=2, metavar=("H", "W"), help="random crop size (default 512 512)")
    g.add_argument(
        "--scale",
        type=int,
        nargs=2,
        metavar=("LONG", "SHORT"),
        help="resize target before the random ratio (default 2048 512 for ADE20K (also scene_parse_150), 2048 1024 "
        "for Cityscapes, 0 0 for own data: the image's own size)",
    )
    g.add_argument(
        "--ratio-range",
        type=float,
        nargs=2,
        metavar=("LO", "HI"),
        help="random resize ratio (default: 0.5 2.0; 1 1 for own data from fresh weights)",
    )
    g.add_argument(
        "--cat-max-ratio",
        type=float,
        help="crop retry threshold for one class (default: 0.75; 1 (no retry) for own data from fresh weights)",
    )
    g.add_argument("--flip-prob", type=float, help="horizontal flip probability (default 0.5)")
    g.add_argument(
        "--photometric",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the paper's photometric distortion (default: on; off for own data from fresh weights)",
    )


def _model_options_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model options")
    g.add_argument("--drop-path-rate", type=float, help="stochastic depth (default: the checkpoint's, 0.1)")
    g.add_argument("--dropout", type=float, help="hidden, attention and classifier dropout (default: the checkpoint's)")
    g.add_argument("--sync-bn", action="store_true", default=None, help="synchronise BatchNorm over processes")
    g.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        default=None,
        help="recompute each block's activations in the backward pass: less memory for large crops, "
        "same gradients, slower",
    )


def _loop_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("loop")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], help="mixed precision (fp16 on CUDA only; default none)")
    g.add_argument("--eval-every", type=int, help="evaluate every N steps, 0: only at the end (default 16000)")
    g.add_argument(
        "--save-every",
        type=int,
        help="write last/ every N steps (default 2000), and at the step where Ctrl-C or SIGTERM stops the run",
    )
    g.add_argument("--log-every", type=int, help="log the loss every N steps (default 50)")
    g.add_argument(
        "--max-eval-images",
        type=int,
        help="evaluate on the first N validation images only (0: every image, e.g. to undo a run's N on --resume)",
    )
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--workers", type=int, help="data-loading processes per rank (default 2)")
    g.add_argument("--device", help="cpu, cuda, mps (default: cuda:LOCAL_RANK when available)")
    g.add_argument(
        "--stop-at", type=int, help="stop after this step with a checkpoint (--resume auto continues the run)"
    )
    g.add_argument("--no-progress", dest="progress", action="store_false", default=None, help="no progress bar")


def _evaluation_during_training_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation during training (default: the data set's protocol)")
    add_inference_arguments(
        g, prefix="eval-", sizes_from="data set"
    )  # --eval-mode, --eval-crop(-size), ...: TrainConfig.eval_*


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune on a data set with the paper's recipe",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from the parsed ``segformer train`` arguments: the options given, over its defaults."""
    import dataclasses

    from segformer.train import TrainConfig

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if values.get("eval_scales") is not None:  # --eval-scales groups: "0.75 1.0" and/or "0.75,1.0"
        values["eval_scales"] = flatten(values["eval_scales"])
    if values.get("resume"):  # a resumed run continues with its own settings where none are given
        values = {**_stored_settings(values), **values}
    return TrainConfig(**values)


# What a resumed run does not take from the run it continues: where it writes (the run's own folder), and how
# this one invocation runs (its stop, its progress bar, its device). Everything else, the evaluation and
# checkpoint intervals included, continues as the run had it unless given again.
NOT_INHERITED = frozenset({"output", "resume", "stop_at", "progress", "device"})


def _stored_settings(values: dict) -> dict:
    """The settings of the run ``--resume`` continues (its train_config.json; none without such a run), as
    TrainConfig fields, but :data:`NOT_INHERITED`. ``--resume RUN/last`` without ``--output`` continues in RUN."""
    import dataclasses
    from pathlib import Path

    from segformer.config import SegformerConfig
    from segformer.train import TrainConfig, find_resume_dir, stored_run_config

    resume = values["resume"]
    settings: dict = {}
    if resume != "auto" and "output" not in values:
        settings["output"] = str(Path(resume).parent)
    output = Path(values.get("output", settings.get("output", TrainConfig.output)))
    resume_dir = find_resume_dir(output, resume)
    stored = stored_run_config(resume_dir) if resume_dir is not None else None
    names = {f.name for f in dataclasses.fields(TrainConfig)} - NOT_INHERITED
    settings.update({k: v for k, v in (stored or {}).items() if k in names})
    if isinstance(settings.get("model"), dict):  # (a config given as an object, kept as one)
        settings["model"] = SegformerConfig.from_dict(settings["model"])
    return settings


def _lost_a_process(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective's error for a peer process that went away (killed, crashed): gloo's
    connection errors, or a backend error of torch.distributed, under torchrun."""
    from segformer.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return False
    import torch.distributed as dist

    lost = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    return isinstance(exc, getattr(dist, "DistBackendError", ())) or any(words in str(exc) for words in lost)


def _first_words(exc: BaseException) -> str:
    """The reason of a collective's error without its source path and advice: "Read error ...: Connection reset
    by peer" out of "[.../pair.cc:537] Read error [127.0.0.1]:38078: Connection reset by peer. This is ..."."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    return text.split(". ")[0]


def _saved_step(last: Path) -> str:
    """ " (step N)" for a last/ checkpoint whose training state says its step, else ""."""
    import torch

    try:
        state = torch.load(last / "training_state.pt", map_location="cpu", mmap=True, weights_only=True)
        return f" (step {int(state['step'])})"
    except Exception:  # (an unreadable state only loses the step from the line; --resume says what is wrong)
        return ""


def run(args: argparse.Namespace) -> int:
    from segformer.cli import Terminated
    from segformer.distributed import launched_rank_not_zero, reported_by_rank_zero, wait_for_rank_zero
    from segformer.train import TrainConfig, train

    config = None
    try:
        config = config_from_args(args)
        result = train(config)
    except (KeyboardInterrupt, Terminated):
        # the run's folder as resolved (the default, or RUN of --resume RUN/last: args.output is None there)
        last = Path(config.output if config is not None else args.output or TrainConfig.output) / "last"
        if not launched_rank_not_zero() and last.is_dir():  # (the steps since its save are not in it)
            print(f"segformer train: {last} holds the run's last checkpoint{_saved_step(last)}; --resume auto "
                  "continues from it", file=sys.stderr)  # fmt: skip
        raise
    except (ValueError, OSError, TypeError, RuntimeError) as exc:
        if config is not None and _lost_a_process(exc):  # (audit: gloo's raw "Read error ... GLHF!" line alone)
            # torchrun's agent, seeing the lost process, sends this one SIGTERM any moment now: the run is ending
            # with this error anyway, and the signal would cut the line short
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            last = Path(config.output) / "last"
            if last.is_dir():
                where = f"; {last} holds the run's last checkpoint{_saved_step(last)}; --resume auto continues the run"
            else:  # (it promised a resume that then started a new run with every default: audit)
                where = "; no checkpoint was written yet: run the command again once the cause is mended"
            raise RuntimeError(f"another process of the run stopped ({_first_words(exc)}){where}") from None
        if not reported_by_rank_zero(exc):
            raise  # one process, rank 0, or an error of this rank alone: its line (segformer.cli.run_command)
        # Under torchrun an error every rank raises alike (a NaN loss, a refused option) is printed by rank 0
        # alone: this rank ends silently, after rank 0, with its exit status 2. Under --debug (SEGFORMER_DEBUG=1)
        # every rank shows its traceback, as rank 0 does.
        from segformer.cli import UNEXPECTED_ERRORS, debug_requested

        if isinstance(exc, UNEXPECTED_ERRORS) and (getattr(args, "debug", False) or debug_requested()):
            raise
        wait_for_rank_zero()
        return 2
    if not launched_rank_not_zero():  # one summary line, from rank 0 (also without evaluation: audit)
        miou = result["metrics"]["mIoU"] if result["metrics"] is not None else None
        summary = {"step": result["step"], "mIoU": miou, "best": result["best"]}
        print(json.dumps({**summary, "last": result["last"]}))
        if result["step"] < result["steps"]:
            print(
                f"segformer train: stopped at step {result['step']} of {result['steps']} (--stop-at); --output "
                f"{Path(result['last']).parent} --resume auto continues",
                file=sys.stderr,
            )
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m segformer.train`` and ``torchrun -m segformer.train``: this command on its own, with the
    errors of ``segformer train`` (SEGFORMER_DEBUG=1 shows the traceback of unexpected ones)."""
    from segformer.cli import UsageParser, parse, run_command

    parser = UsageParser(
        prog="python -m segformer.train",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(parser)
    return run_command(run, parse(parser, argv), name="segformer.train")

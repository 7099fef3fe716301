"""Working with Transformers' ``Trainer`` (without importing Transformers: the callback is duck-typed).

Our models train under ``transformers.Trainer`` as they are: its collation, optimiser, gradient accumulation
(the loss of each micro-batch divided by the accumulation steps, so a step's gradient is that of the mean loss),
evaluation and ``predict`` all work. One thing differs from Transformers' own classes: Trainer saves a model that
is not a ``transformers.PreTrainedModel`` as its weights alone (``model.safetensors``, no ``config.json``), so a
checkpoint folder does not load by itself. :class:`SaveConfigCallback` writes the configuration (and the image
processor's, when given) into every checkpoint it saves, and at the end of training into ``output_dir``, where
``trainer.save_model()`` puts the final weights by default::

    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[SaveConfigCallback(processor)])
    trainer.train()
    model = SegformerForSemanticSegmentation.from_pretrained("out/checkpoint-500")
    trainer.save_model()  # out/: the weights beside the config.json written at the end of training

A weights-only folder also loads with the configuration given: ``from_pretrained(folder, config=config)``.
For the final model, ``model.save_pretrained(folder)`` writes both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CHECKPOINT_PREFIX = "checkpoint"  # Trainer's checkpoint folders: <output_dir>/checkpoint-<global step>


class SaveConfigCallback:
    """A ``transformers.Trainer`` callback that makes each checkpoint folder loadable on its own: after Trainer
    saves ``<output_dir>/checkpoint-<step>``, it writes the model's ``config.json`` there (and
    ``preprocessor_config.json`` when an image processor is given), each atomically. Only the process that
    saves (the main process under torchrun) writes. At the end of training (``on_train_end``) it writes them into
    ``output_dir`` too, where ``trainer.save_model()`` saves the final weights unless given another folder.
    Trainer calls every event on every callback; the other events do nothing."""

    def __init__(self, image_processor: Any = None) -> None:
        self.image_processor = image_processor

    def on_save(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not getattr(args, "should_save", True):
            return
        folder = Path(args.output_dir) / f"{CHECKPOINT_PREFIX}-{state.global_step}"
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: Trainer's checkpoint folder is missing after on_save")
        self._write(folder, model)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if getattr(args, "should_save", True):
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            self._write(Path(args.output_dir), model)

    def _write(self, folder: Path, model: Any) -> None:
        config = getattr(_unwrapped(model), "config", None)
        if config is None or not callable(getattr(config, "to_json_file", None)):
            raise TypeError(f"SaveConfigCallback: the model ({type(model).__name__}) has no config to save")
        config.to_json_file(folder / "config.json")
        if self.image_processor is not None:
            self.image_processor.save_pretrained(folder)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("on_"):  # every other Trainer event (on_train_begin, on_step_end, ...): nothing to do
            return _nothing
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _unwrapped(model: Any) -> Any:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while model is not None and not hasattr(model, "config"):
        inner = getattr(model, "module", None)  # (explicit None tests: an empty nn.Sequential is falsy)
        model = inner if inner is not None else getattr(model, "_orig_mod", None)
    return model

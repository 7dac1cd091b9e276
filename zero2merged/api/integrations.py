"""The merged model as the last step of training: a Hugging Face Trainer callback, and the same for a
custom DeepSpeed loop. Both run on every rank of the job: rank 0 converts, the other ranks write their
share of the shards and wait, and every rank gets the report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from zero2merged.api.pipeline import convert
from zero2merged.core import names
from zero2merged.core.errors import CheckpointError
from zero2merged.running.report import ConvertReport


class MergeOnTrainEnd(TrainerCallback):
    """Export the merged model when ``Trainer.train()`` ends.

    The Trainer is made to save a checkpoint at the last step (whatever ``save_strategy`` says), and that
    checkpoint is converted into ``output``.

    Args:
        output: The merged model's folder (new or empty).
        **options: More :func:`zero2merged.convert` options (``base_model``, ``dtype``, ``work_dir``...).

    Example::

        trainer = Trainer(model=peft_model, args=args, ..., callbacks=[MergeOnTrainEnd("out/merged")])
        trainer.train()
    """

    def __init__(self, output: Path | str, **options: Any):
        self.output = Path(output)
        self.options = options
        self.report: ConvertReport | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_save = True  # the Trainer saves checkpoint-<last step> right after this
        return control

    def on_train_end(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if not checkpoint.is_dir():
            raise CheckpointError(
                f"no checkpoint of the last step at {checkpoint}: was saving disabled "
                "(save_strategy='no' with a custom loop)? zero2merged needs it"
            )
        self.report = convert(checkpoint, self.output, **self.options)


def export_engine(
    engine, save_dir: Path | str, output: Path | str, *, tag: str | None = None, **options: Any
) -> ConvertReport:
    """Save a DeepSpeed engine's checkpoint and convert it: the last call of a custom training loop.

    Call it on every rank (saving a ZeRO checkpoint is collective). ``engine.module`` must be the PEFT
    model; its LoRA config is saved beside the checkpoint (``adapter_config.json``) when none is there.

    Args:
        engine: The ``deepspeed.initialize`` engine.
        save_dir: Where the checkpoint is saved (``engine.save_checkpoint``'s folder).
        output: The merged model's folder (new or empty).
        tag: The checkpoint's tag; default ``global_step<N>``.
        **options: More :func:`zero2merged.convert` options.

    Returns:
        The conversion's report, on every rank.
    """
    import torch.distributed as dist

    save_dir = Path(save_dir)
    engine.save_checkpoint(str(save_dir), tag=tag)
    rank = dist.get_rank() if dist.is_initialized() else 0
    config_path = save_dir / names.ADAPTER_CONFIG
    if rank == 0 and not config_path.is_file():
        module = engine.module
        adapter = getattr(module, "active_adapter", "default")
        module.peft_config[adapter].save_pretrained(str(save_dir))
    return convert(save_dir, output, tag=tag, **options)

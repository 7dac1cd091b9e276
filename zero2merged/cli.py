"""The ``zero2merged`` command: a thin click layer over the library.

Exit codes: 0 success, 1 verification failed, 2 bad input or usage, 3 an internal error. A user error prints
one line (``error: …``) and no traceback unless ``--debug`` is given; so does any other exception, as
``internal error: …`` (a bug, or a checkpoint zero2merged does not understand). The options are named as the
fields of :class:`~zero2merged.core.options.Source` and :class:`~zero2merged.core.options.ConvertOptions`, and
handed to the library as they are. Nothing heavy is imported until a command runs (``--help`` is quick).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys

import click

from zero2merged.core.errors import VerificationError, Zero2MergedError, first_line
from zero2merged.core.options import MERGE_INTO, OUTPUT_DTYPES

INTERNAL_ERROR_EXIT = 3  # 1: a verification failed, 2: bad input or usage
INTERNAL_ERROR_HINT = (
    "this is a bug in zero2merged, or a checkpoint it does not understand; rerun with --debug for the traceback "
    "and report it"
)

# -q, -v and --debug: one definition, taken before the command (``zero2merged -q convert …``) and after it
# (``zero2merged convert … -q``), as people type them. Each only notes that it was given, in the root
# context; the command applies them before it runs.
OUTPUT_FLAGS = {
    "debug": (("--debug",), "Show full tracebacks and library logs."),
    "quiet": (("-q", "--quiet"), "Print only the result and errors: no stage log, no progress bars."),
    "verbose": (("-v", "--verbose"), "Log more detail about each stage."),
}


def _note_flag(ctx: click.Context, param: click.Parameter, given: bool) -> None:
    if given:
        ctx.find_root().meta[f"zero2merged.{param.name}"] = True


def _output_flags() -> list[click.Option]:
    return [
        click.Option(list(decls), is_flag=True, expose_value=False, callback=_note_flag, help=help)
        for decls, help in OUTPUT_FLAGS.values()
    ]


def _flag(ctx: click.Context, name: str) -> bool:
    """Whether the output flag ``name`` was given, before or after the command."""
    return ctx.find_root().meta.get(f"zero2merged.{name}", False)


def _refuse_usage(ctx: click.Context, error: click.UsageError) -> None:
    """A usage error as the library's errors are shown: one line (and exit code 2)."""
    where = error.ctx.command_path if error.ctx else ctx.command_path
    click.echo(f"error: {error.format_message()} (see '{where} --help')", err=True)
    ctx.exit(error.exit_code)


class _Command(click.Command):
    """A command that takes the output flags too, and applies them before it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(_output_flags())

    def invoke(self, ctx: click.Context):
        _configure_output(_flag(ctx, "debug"), -1 if _flag(ctx, "quiet") else int(_flag(ctx, "verbose")))
        return super().invoke(ctx)


class _Group(click.Group):
    """Turns the library's errors into one line and an exit code, any other exception into one line and exit
    code 3, and a scheduler's SIGTERM or a Ctrl-C into a clean stop (the running stage's half-written files
    removed, the finished stages kept)."""

    command_class = _Command

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params.extend(_output_flags())

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _refuse_usage(ctx, e)

    def invoke(self, ctx: click.Context):
        from zero2merged.running.runtime import skip_last_collection, stopping_on_signals

        try:
            with stopping_on_signals():
                result = super().invoke(ctx)
            skip_last_collection()  # the process ends next
            return result
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as e:
            _refuse_usage(ctx, e)
        except Zero2MergedError as e:
            if _flag(ctx, "debug"):
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(1 if isinstance(e, VerificationError) else 2)
        except KeyboardInterrupt as e:
            signum = getattr(e, "signum", signal.SIGINT)  # a plain KeyboardInterrupt: Ctrl-C
            then = (
                "the finished stages are kept; run the same command again to resume"
                if ctx.invoked_subcommand == "convert"
                else "nothing was written; run the same command again"
            )
            click.echo(f"interrupted ({signal.Signals(signum).name}): {then}", err=True)
            ctx.exit(128 + signum)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # click's own ways out (Exit is a RuntimeError)
        except Exception as e:  # noqa: BLE001 - the backstop: one line, never the traceback, unless --debug
            if _flag(ctx, "debug"):
                raise
            click.echo(f"internal error: {type(e).__name__}: {first_line(e)} ({INTERNAL_ERROR_HINT})", err=True)
            ctx.exit(INTERNAL_ERROR_EXIT)


def _configure_output(debug: bool, verbosity: int) -> None:
    # Only files are read, so no accelerator is needed; naming one keeps DeepSpeed from printing its
    # accelerator guess on stdout (which would break --json). A user's own choice is kept.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # Stage progress is logged (stderr): -q keeps errors and warnings only, -v adds the details, --debug all the
    # libraries' logs too; without it only their errors (an error is to be one line, not after their warnings).
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=logging.DEBUG if debug else logging.ERROR, format="%(message)s", stream=sys.stderr)
    logging.getLogger("zero2merged").setLevel(logging.DEBUG if debug else level)
    if not debug:
        import warnings

        from zero2merged.running.runtime import quiet_optional_kernels

        warnings.filterwarnings("ignore", category=FutureWarning)  # the libraries' deprecation notices
        quiet_optional_kernels()
        os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")  # the same in --workers processes
        # transformers' own logs and progress bars: set for when it is imported (not now: seconds of start-up)...
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        transformers = sys.modules.get("transformers")
        if transformers is not None:  # ...or now, if it already is (the command called from Python)
            transformers.logging.set_verbosity_error()
            transformers.logging.disable_progress_bar()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="zero2merged")
def main() -> None:
    """Turn the DeepSpeed ZeRO checkpoint of a LoRA fine-tune into one merged, verified model.

    -q, -v and --debug may come before the command or after it.
    """


checkpoint_argument = click.argument("checkpoint", type=click.Path(exists=True, file_okay=False))
json_option = click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")

# The fields of zero2merged.core.options.Source, as options (the checkpoint is each command's argument).
SOURCE_OPTIONS = [
    click.option("--tag", help="Checkpoint tag to use [default: the one 'latest' names]."),
    click.option(
        "--adapter-config",
        type=click.Path(exists=True),
        help="adapter_config.json (or its folder) if not beside the checkpoint.",
    ),
    click.option("--base-model", help="Base model path or hub id [default: the adapter config's]."),
    click.option(
        "--lora-alpha",
        type=float,
        help="No adapter config anywhere: infer it from the checkpoint's keys, with this lora_alpha.",
    ),
    click.option("--use-rslora", is_flag=True, help="With --lora-alpha: the run used rsLoRA scaling."),
    click.option(
        "--peft-model",
        metavar="PATH",
        help="The saved module holds several PEFT models: the attribute path of the one to convert "
        "(e.g. 'actor.model'; '.' for the module itself).",
    ),
    click.option("--adapter-name", metavar="NAME", help="The model trained several adapters: the one to merge."),
    click.option(
        "--unsafe-pickle",
        is_flag=True,
        help="Load rank files holding pickled objects DeepSpeed does not write (a pickle can run "
        "code: only for checkpoints you trust).",
    ),
]


def source_options(command):
    """Add the options that say where the run's LoRA config and base come from (keyword arguments named
    as :class:`~zero2merged.core.options.Source`'s fields)."""
    for option in reversed(SOURCE_OPTIONS):
        command = option(command)
    return command


@main.command()
@checkpoint_argument
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the merged model (new or empty).")
@source_options
@click.option(
    "--dtype",
    type=click.Choice(["auto", *OUTPUT_DTYPES], case_sensitive=False),
    default="auto",
    show_default=True,
    help="Output dtype; auto = the base's.",
)
@click.option("--work-dir", type=click.Path(), help="Stage artifacts and manifest [default: OUTPUT.zero2merged-work].")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors shard.")
@click.option("--force", is_flag=True, help="Redo every stage, even those whose results are still valid.")
@click.option("--ignore-base-mismatch", is_flag=True, help="Go on when saved frozen weights differ from the base's.")
@click.option(
    "--in-memory",
    is_flag=True,
    help="Load the whole model and check the merged model's outputs end to end (several times the "
    "model's size in RAM); the default streams a layer at a time. Both write identical files.",
)
@click.option(
    "--workers",
    type=int,  # its range is checked with the library's message
    default=1,
    show_default=True,
    help="Processes writing the output's shards (under torchrun, every rank writes a share instead).",
)
@click.option(
    "--device",
    default="cpu",
    show_default=True,
    help="Where each layer is merged and checked when streaming: cpu, or cuda[:N] on a GPU machine.",
)
@click.option(
    "--merge-into",
    type=click.Choice(MERGE_INTO),
    default="dequantized",
    show_default=True,
    help="A QLoRA run: merge into its 4-bit weights dequantized (the model that was trained), or into the "
    "original base (a model a little different; the report says by how much).",
)
@json_option
def convert(checkpoint, output, as_json, **options) -> None:
    """Convert CHECKPOINT (the folder holding 'latest') into a merged model.

    \b
    Example:
        zero2merged convert run/checkpoint-500 --output merged --base-model meta-llama/Llama-3.2-1B
    """
    from zero2merged.api.distributed import join_launched_group
    from zero2merged.api.pipeline import convert as run_convert

    join_launched_group()
    report = run_convert(checkpoint, output, **options)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.summary())


@main.command()
@checkpoint_argument
@source_options
@click.option(
    "--check",
    is_flag=True,
    help="Also check the CRC-32 of every record of the tag's rank files (the optimizer's moments too): "
    "reads them whole.",
)
@click.option("--json", "as_json", is_flag=True, help="Print what was found as JSON.")
def inspect(checkpoint, check, as_json, **source) -> None:
    """Show what CHECKPOINT holds and what a conversion would use.

    Exit code 2 when it cannot be converted (or, with --check, a record is damaged).

    \b
    Examples:
        zero2merged inspect run/checkpoint-500
        zero2merged inspect run/checkpoint-500 --check
    """
    from zero2merged.files.zipcheck import check_files
    from zero2merged.running.report import format_checked, format_info
    from zero2merged.stages.inspect import inspect_checkpoint

    info = inspect_checkpoint(checkpoint, **source)
    files = [info.tag_dir / name for name in [*info.layout.model_files, *info.layout.optim_files]]
    checked = check_files(files) if check else None
    if as_json:
        data = info.to_dict() | ({"checked": checked.to_dict()} if checked else {})
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        click.echo(format_info(info) + (f"\n{format_checked(checked, len(files))}" if checked else ""))


@main.command()
@click.argument("merged", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--checkpoint",
    type=click.Path(exists=True, file_okay=False),
    help="The DeepSpeed checkpoint folder the merged model was made from.",
)
@click.option(
    "--adapter",
    type=click.Path(exists=True, file_okay=False),
    help="Or: a PEFT adapter folder (adapter_config.json + weights), with --base-model.",
)
@source_options
@click.option(
    "--prompts",
    type=click.Path(exists=True, dir_okay=False),
    help="A text file, one prompt per line, tokenized with the base's tokenizer [default: random ids].",
)
@click.option(
    "--in-memory",
    is_flag=True,
    help="Load both models whole (about twice the model in fp32) instead of a block at a time.",
)
@json_option
def verify(merged, checkpoint, adapter, prompts, in_memory, as_json, **source) -> None:
    """Check that MERGED behaves like the unmerged model (from --checkpoint, or --adapter + --base-model).

    Against a checkpoint, both models run side by side a block at a time, each block's weights read from
    disk when it runs: the memory of one block, whatever the model's size.

    Exit code 0 when the parity is within tolerance, 1 when not.

    \b
    Examples:
        zero2merged verify merged --checkpoint run/checkpoint-500
        zero2merged verify merged --adapter adapter --base-model /models/base --prompts prompts.txt
    """
    from zero2merged.api.verify import verify as run_verify

    report = run_verify(merged, checkpoint, adapter=adapter, prompts=prompts, in_memory=in_memory, **source)
    p = report.parity
    verdict = "PASS" if report.passed else "FAIL"
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(
            f"{verdict}: {report.merged} ({report.merged_dtype}) vs {report.reference} from {report.source}"
            f"{f' [{report.tag}]' if report.tag else ''} on {report.inputs}: max abs diff "
            f"{p['max_abs_diff']:.3g}, max rel diff {p['max_rel_diff']:.3g}, top-1 agreement "
            f"{p['top1_agreement']:.4f} (tolerance: max rel diff {report.tolerance['max_rel_diff']:g}, "
            f"top-1 {report.tolerance['min_top1']:g})"
        )
    if not report.passed:
        sys.exit(1)


@main.command("export-adapter")
@checkpoint_argument
@click.option("-o", "--output", required=True, type=click.Path(), help="Folder for the adapter (new or empty).")
@source_options
@json_option
def export_adapter(checkpoint, output, as_json, **source) -> None:
    """Write CHECKPOINT's adapter as a PEFT adapter folder, from the fp32 masters.

    The folder (adapter_config.json + adapter_model.safetensors) loads with PeftModel.from_pretrained;
    it is checked to reproduce the trained model's outputs before it is put in place.

    \b
    Example:
        zero2merged export-adapter run/checkpoint-500 --output adapter
    """
    from zero2merged.api.export import export_adapter as run_export

    report = run_export(checkpoint, output, **source)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(
            f"{report.checkpoint} [{report.tag}] -> {report.output}: {report.tensors} trained tensors in "
            f"{', '.join(report.files)}; reloaded with PEFT, max abs diff {report.parity['max_abs_diff']:.3g}"
        )


@main.command()
@json_option
def env(as_json) -> None:
    """Show the versions of Python and the libraries zero2merged runs with, each against the versions it
    supports, and whether CUDA is visible: the lines to paste into a bug report. A library below its range
    stops the other commands in one line; one newer than tested runs (untested, not known to be broken).

    \b
    Example:
        pip install --no-deps zero2merged && zero2merged env
    """
    from zero2merged.running.environment import environment_lines, environment_record

    if as_json:
        click.echo(json.dumps(environment_record(), indent=2))
        return
    lines, refused = environment_lines()
    click.echo("\n".join(lines))
    if refused:
        click.echo(f"not supported: {refused}: convert, verify and export-adapter will refuse to run", err=True)

"""The few exceptions zero2merged raises. Each message is one line: what is wrong, where, what to do.

The CLI maps :class:`VerificationError` to exit code 1 and every other :class:`Zero2MergedError` to 2; any
other exception (a bug, or a checkpoint not understood) it shows in one line too, with exit code 3.
"""


class Zero2MergedError(Exception):
    """A conversion cannot go on; nothing half-written is left where the output belongs."""


class CheckpointError(Zero2MergedError):
    """The checkpoint is missing, unreadable, or not a DeepSpeed ZeRO checkpoint of a LoRA run."""


class AdapterConfigError(Zero2MergedError):
    """The LoRA config is missing or does not describe the adapter saved in the checkpoint."""


class BaseModelError(Zero2MergedError):
    """The base model cannot be loaded or does not fit the checkpoint."""


class OptionError(Zero2MergedError):
    """An option's value is not one zero2merged accepts, or options that do not go together."""


class OutputError(Zero2MergedError):
    """The output or work directory cannot be used."""


class LibraryError(Zero2MergedError):
    """An installed library is outside the versions zero2merged supports, or lacks a feature the run uses."""


class VerificationError(Zero2MergedError):
    """A parity or round-trip check failed: the result would not behave like the trained model."""


class StreamingUnsupported(Zero2MergedError):
    """The model cannot be converted a layer at a time; ``--in-memory`` can convert it."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by a signal (a scheduler's SIGTERM, Ctrl-C's SIGINT), raised where the main thread
    was so that each stage removes its half-written files on the way out. The command line raises it (the
    library never takes a process's signals); being a :class:`KeyboardInterrupt`, it passes every
    ``except Exception`` as Ctrl-C does. Not a :class:`Zero2MergedError`: nothing was wrong with the input.

    Attributes:
        signum: The signal's number; the command exits with ``128 + signum`` (143 for SIGTERM), as the shell
            reports a process the signal ended.
    """

    def __init__(self, signum: int):
        import signal

        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def first_line(error: BaseException) -> str:
    """An exception's message as one bounded line, for an error that quotes a library's."""
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__

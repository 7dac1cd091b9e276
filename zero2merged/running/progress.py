"""Progress bars for the stages that move the model's bytes (tqdm, on stderr).

Shown when stderr is a terminal and INFO logging is on (the CLI's default; ``-q`` turns both off), so
logs, ``--json`` output and CI stay clean.
"""

from __future__ import annotations

import logging

log = logging.getLogger("zero2merged")


class Progress:
    """Bytes done of ``total``, with a count of tensors in the postfix."""

    def __init__(self, what: str, total_bytes: int, tensors: int):
        from tqdm.auto import tqdm

        self.tensors, self.done = tensors, 0
        quiet = not log.isEnabledFor(logging.INFO)
        self.bar = tqdm(
            total=total_bytes,
            desc=what,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            disable=True if quiet else None,
            leave=False,
            dynamic_ncols=True,
        )

    def update(self, nbytes: int, tensor_done: bool = False) -> None:
        self.done += tensor_done
        self.bar.update(nbytes)
        if tensor_done:
            self.bar.set_postfix_str(f"{self.done}/{self.tensors} tensors", refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

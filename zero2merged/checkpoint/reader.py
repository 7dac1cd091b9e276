"""The fp32 masters and frozen weights in DeepSpeed's rank files, read safely, lazily, a bounded piece at a time.

DeepSpeed's own reader (``deepspeed.utils.zero_to_fp32``) is the independent reference our tests compare
against, but it is not what we run, because it unpickles with ``weights_only=False`` (a checkpoint file can
run any code), loads the model-state files whole and concatenates ZeRO-3 frozen params eagerly (about twice
the model in RAM), ignores the frozen params ZeRO-1 keeps in ``module``, and prints to stdout. The layout
rules are DeepSpeed's, restated (:mod:`~zero2merged.checkpoint.layout`); its key names are in
:mod:`~zero2merged.core.names` (a test holds them equal to ``deepspeed.checkpoint.constants``), so
reading a checkpoint never imports deepspeed.

Files are memory-mapped; the pages under a piece are unmapped once the piece is used, so reading a
checkpoint does not leave it all resident (and counted in our RSS); and where a piece's bytes are used
as they are, its file range lets them be copied file to file.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Collection, Iterator
from pathlib import Path

import torch

from zero2merged.checkpoint.rankfiles import MASTERS, model_states, optim_states, stage0_masters
from zero2merged.core import names
from zero2merged.core.dtypes import SHORT_NAMES
from zero2merged.core.errors import CheckpointError
from zero2merged.core.options import Tuning
from zero2merged.core.results import ZeroLayout
from zero2merged.files.pickles import release
from zero2merged.files.safetensors_writer import tensor_bytes
from zero2merged.files.zipcheck import RecordCheck


def _mappings(paths: set[str]) -> list[tuple[int, int, str, int]]:
    """``(start, end, file, file offset)`` of this process's memory mappings of ``paths``."""
    found = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") in paths:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    found.append((start, end, fields[5].rstrip("\n"), int(fields[2], 16)))
    except OSError:  # not Linux: no file ranges, pieces are copied through memory instead
        pass
    return found


class _FlatView:
    """Several 1-D tensors read as one sequence (a group split across ranks, or a rank's groups)."""

    def __init__(self, parts: list[torch.Tensor]):
        self.parts = parts
        self.starts = [0]
        for part in parts:
            self.starts.append(self.starts[-1] + part.numel())

    @property
    def numel(self) -> int:
        return self.starts[-1]

    def pieces(self, start: int, length: int) -> Iterator[tuple[int, torch.Tensor]]:
        """``(element offset within the range, view)`` covering ``[start, start + length)``."""
        for part, begin, end in zip(self.parts, self.starts, self.starts[1:], strict=False):
            lo, hi = max(start, begin), min(start + length, end)
            if lo < hi:
                yield lo - start, part.narrow(0, lo - begin, hi - lo)


def _split(offset: int, flat: torch.Tensor, limit: int) -> Iterator[tuple[int, torch.Tensor]]:
    """A 1-D view cut into pieces of at most ``limit`` elements, with their element offsets."""
    for first in range(0, flat.numel(), limit):
        yield offset + first, flat.narrow(0, first, min(limit, flat.numel() - first))


class ZeroReader:
    """A tag's tensors, read from the memory-mapped rank files a bounded piece at a time.

    Args:
        tag_dir: The tag folder (``global_stepN``).
        layout: Its :func:`read_layout`.
        piece_elements: The most elements one piece holds.
    """

    def __init__(self, tag_dir: Path, layout: ZeroLayout, *, piece_elements: int = Tuning.piece_elements):
        self.tag_dir = tag_dir
        self.layout = layout
        self.piece_elements = piece_elements

    @functools.cached_property
    def _model_states(self) -> list[dict]:
        return [model_states(self.tag_dir / name) for name in self.layout.model_files]

    @functools.cached_property
    def _optim(self) -> tuple[list[list], list | None]:
        """Per rank, per group: the flat fp32 master tensor (Adam moments are never read; stage 0: a
        :class:`_FlatView` of the group); and the ZeRO-1/2 per-param alignment paddings."""
        if self.layout.zero_stage == 0:  # in the model-state file (module's own tensors for an fp32 run)
            states = self._model_states[0]
            masters = stage0_masters(states)
            if masters is None:
                module, saved = states.get(names.MODULE) or {}, self.layout.saved_name
                flats = [_FlatView([module[saved(n)].reshape(-1) for n in group]) for group in self.layout.trainable]
                return [flats], None
            return [[_FlatView(parts) for parts in masters]], None
        key = MASTERS[self.layout.zero_stage]
        groups, paddings = [], None
        for rank, name in enumerate(self.layout.optim_files):
            optim = optim_states(self.tag_dir / name)[names.OPTIMIZER_STATE_DICT]
            groups.append([t.reshape(-1) for t in optim[key]])
            if rank == 0:
                paddings = optim.get(names.PARAM_ALIGNMENT_PADDINGS)
        return groups, paddings

    @functools.cached_property
    def _mapped(self) -> list[tuple[int, int, str, int]]:
        self._model_states, self._optim  # noqa: B018 - every rank file mapped first
        files = [*self.layout.model_files, *self.layout.optim_files]
        return _mappings({str((self.tag_dir / name).resolve()) for name in files})

    def file_range(self, piece: torch.Tensor) -> tuple[str, int] | None:
        """The rank file and byte offset a piece's bytes lie at, so they can be copied file to file
        (in the kernel, without passing through this process); None where that is unknown."""
        address = piece.data_ptr()
        for start, end, path, offset in self._mapped:
            if start <= address and address + piece.numel() * piece.element_size() <= end:
                return path, address - start + offset
        return None

    def frozen_ranges(self) -> dict[str, list[tuple[str, int, int]]]:
        """Where each saved frozen param's bytes lie in the rank files: ``[(file, offset, bytes)]`` in order
        (a ZeRO-3 param has one range per rank), for the params whose file ranges are all known."""
        found: dict[str, list[tuple[str, int, int]]] = {}
        unknown = set()
        for name, _, fragment in self._frozen_fragments():
            where = self.file_range(fragment)
            if where is None:
                unknown.add(name)
            else:
                found.setdefault(name, []).append((*where, fragment.numel() * fragment.element_size()))
        return {name: ranges for name, ranges in found.items() if name not in unknown}

    def specs(self) -> dict[str, tuple[torch.dtype, list[int]]]:
        """name -> (dtype, shape) of every tensor, without reading any: masters are fp32."""
        specs = {name: (torch.float32, shape) for name, shape in self.layout.trainable_shapes.items()}
        if self.layout.frozen_source:
            saved = self._model_states[0][self.layout.frozen_source]
            specs.update({name: (saved[self._saved(name)].dtype, shape) for name, shape in self.layout.frozen.items()})
        module = self._model_states[0].get(names.MODULE) or {}
        specs.update({name: (module[self._saved(name)].dtype, shape) for name, shape in self.layout.buffers.items()})
        return specs

    @functools.cached_property
    def records(self) -> RecordCheck:
        """The CRC-32 checks of the rank files' records, fed with every piece :meth:`pieces` yields."""
        return RecordCheck([self.tag_dir / name for name in [*self.layout.model_files, *self.layout.optim_files]])

    def _saved(self, name: str) -> str:
        return self.layout.saved_name(name)

    def pieces(self, skip: Collection[str] = ()) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, element offset, 1-D piece)`` of every tensor but those in ``skip``, in order, each piece
        at most ``piece_elements`` long. The file pages under a piece are released once the consumer resumes.
        Sizes are checked before anything is yielded; the CRC-32 of every record read, once all are.

        Raises:
            CheckpointError: sizes that do not add up, or a record whose bytes fail their CRC-32.
        """
        left_out = set(self.layout.outside)  # trainable params outside the PEFT model: read past, not yielded
        for name, offset, piece in self._all_pieces():
            if name in skip or name in left_out:
                continue
            self._feed(piece)
            if name in self._copies:
                self._check_copy(name, offset, piece)
            yield name, offset, piece
            release(piece)
        self.records.finish()

    def _feed(self, piece: torch.Tensor) -> None:
        where = self.file_range(piece)
        if where is not None:
            self.records.feed(*where, tensor_bytes(piece))

    @functools.cached_property
    def _copies(self) -> dict[str, torch.Tensor]:
        """ZeRO-1/2: the trained params' 16-bit copies in the model-state file (flat), which the engine made
        from the masters (so each master rounds to its copy exactly, on every fixture and GPU checkpoint)."""
        if self.layout.zero_stage not in (1, 2):
            return {}
        module = self._model_states[0].get(names.MODULE) or {}
        shapes = self.layout.trainable_shapes
        return {
            name: module[saved].reshape(-1)
            for name in shapes
            for saved in [self._saved(name)]
            if saved in module and module[saved].numel() == math.prod(shapes[name])
        }

    def _check_copy(self, name: str, offset: int, piece: torch.Tensor) -> None:
        """A piece of masters against its 16-bit copy: masters of another save (a rank's optimizer file
        swapped with another rank's, tag's or run's, all of them well-formed) do not round to it."""
        copy = self._copies[name].narrow(0, offset, piece.numel())
        self._feed(copy)
        if torch.equal(piece.to(copy.dtype), copy) or not torch.isfinite(piece).all():  # NaN: said by stage 2
            return
        self.records.finish()  # a damaged byte is the likelier cause: said so, where it is
        raise CheckpointError(
            f"{self.tag_dir}: the fp32 masters of {name} in the optimizer files do not round to its "
            f"{SHORT_NAMES.get(copy.dtype, copy.dtype)} copy in {self.layout.model_files[0]}: the files are not "
            "of one save (mixed with another rank's, tag's or run's); copy the tag folder again as the run saved it"
        )

    def _all_pieces(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        masters, paddings = self._optim
        if self.layout.zero_stage == 3:
            yield from self._zero3_trainable(masters)
        elif self.layout.zero_stage == 0:
            yield from self._stage0_trainable(masters[0])
        else:
            yield from self._zero12_trainable(masters, paddings)
        yield from self._frozen()
        module = self._model_states[0].get(names.MODULE) or {}
        for name in self.layout.buffers:
            yield name, 0, module[self._saved(name)].reshape(-1)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Whole tensors, assembled from :meth:`pieces` into fresh memory (for in-memory consumers)."""
        specs = self.specs()
        current, flat = None, None
        for name, offset, piece in self.pieces():
            if name != current:
                if current is not None:
                    yield current, flat.view(specs[current][1])
                current = name
                flat = torch.empty(math.prod(specs[name][1]), dtype=specs[name][0])
            flat.narrow(0, offset, piece.numel()).copy_(piece)
        if current is not None:
            yield current, flat.view(specs[current][1])

    def _mismatch(self, needed, held) -> CheckpointError:
        return CheckpointError(
            f"{self.tag_dir}: the param table needs {needed} elements but the optimizer files hold {held}; "
            "the model-state and optimizer files do not belong to the same save"
        )

    def _zero12_trainable(self, masters, paddings) -> Iterator[tuple[str, int, torch.Tensor]]:
        # DeepSpeed pads each group to a multiple of 2 * world size (see zero_to_fp32's zero2_align).
        align = 2 * self.layout.world_size
        plan = []
        for g, shapes in enumerate(self.layout.trainable):
            flat = _FlatView([rank[g] for rank in masters])
            offset, entries = 0, []
            for i, (name, shape) in enumerate(shapes.items()):
                entries.append((name, shape, offset))
                offset += math.prod(shape) + (paddings[g][i] if paddings else 0)
            if flat.numel < offset or math.ceil(offset / align) != math.ceil(flat.numel / align):
                raise self._mismatch(f"{offset} (group {g})", flat.numel)
            plan.append((flat, entries))
        for flat, entries in plan:
            for name, shape, offset in entries:
                for at, view in flat.pieces(offset, math.prod(shape)):
                    for piece_at, piece in _split(at, view, self.piece_elements):
                        yield name, piece_at, piece

    def _stage0_trainable(self, flats: list[_FlatView]) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Stage 0: each group's params one after another in its flat masters, unpadded."""
        for flat, group in zip(flats, self.layout.trainable, strict=True):
            if sum(math.prod(shape) for shape in group.values()) != flat.numel:
                raise self._mismatch(sum(math.prod(shape) for shape in group.values()), flat.numel)
            offset = 0
            for name, shape in group.items():
                for at, view in flat.pieces(offset, math.prod(shape)):
                    yield from ((name, a, p) for a, p in _split(at, view, self.piece_elements))
                offset += math.prod(shape)

    def _zero3_trainable(self, masters) -> Iterator[tuple[str, int, torch.Tensor]]:
        world = self.layout.world_size
        per_rank = [_FlatView(rank) for rank in masters]
        every = {name: shape for group in self.layout.trainable for name, shape in group.items()}  # left out too
        needed = sum(math.ceil(math.prod(s) / world) for s in every.values())
        held = [view.numel for view in per_rank]
        if any(h != needed for h in held):
            raise self._mismatch(f"{needed} per rank", held)
        offset = 0
        for name, shape in every.items():
            numel = math.prod(shape)
            part = math.ceil(numel / world)
            for rank, view in enumerate(per_rank):
                valid = min(part, numel - rank * part)  # the last rank's piece is padded
                if valid > 0:
                    for at, piece in view.pieces(offset, valid):
                        yield from ((name, rank * part + a, p) for a, p in _split(at, piece, self.piece_elements))
            offset += part

    def _frozen(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        for name, offset, fragment in self._frozen_fragments():
            yield from ((name, a, p) for a, p in _split(offset, fragment, self.piece_elements))

    def _frozen_fragments(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """``(name, element offset, 1-D view)`` of each saved frozen param's parts as the files hold them
        (one per rank under ZeRO-3, padding cut off; the whole param under ZeRO-1/2), sizes checked."""
        layout = self.layout
        if layout.frozen_source is None:
            return
        saved = [states[layout.frozen_source] for states in self._model_states]
        for name, shape in layout.frozen.items():
            numel = math.prod(shape)
            if layout.zero_stage == 3:
                part = math.ceil(numel / layout.world_size)
                fragments = [s[self._saved(name)].reshape(-1) for s in saved]
                if any(f.numel() != part for f in fragments):
                    raise CheckpointError(f"{self.tag_dir}: frozen param {name}'s fragments do not add up to {shape}")
                for rank, fragment in enumerate(fragments):
                    valid = min(part, numel - rank * part)
                    if valid > 0:
                        yield name, rank * part, fragment.narrow(0, 0, valid)
            else:
                flat = saved[0][self._saved(name)].reshape(-1)
                if flat.numel() != numel:
                    raise CheckpointError(
                        f"{self.tag_dir}: frozen param {name} has {flat.numel()} elements, "
                        f"its shape {shape} needs {numel}"
                    )
                yield name, 0, flat

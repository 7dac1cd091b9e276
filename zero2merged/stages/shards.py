"""The merged model's files, laid out as ``save_pretrained`` lays them out, and written a shard at a time.

:func:`plan_shards` decides on the meta device what the files hold: the merged model's tensors, how each is
made (merged by a LoRA layer, or copied from where stage 4 found it), and how ``save_pretrained`` turns them
into the files' tensors (names, dtypes, shapes, through the model's conversion mapping:
:mod:`zero2merged.model.layouts`) and splits those into shards. :func:`write_shards` writes any share of the shards
(every process computes the same plan), merging each LoRA layer with :class:`~zero2merged.checks.layers.LayerMerger`
on the way; :func:`write_index` and :func:`write_configs` add what ``save_pretrained`` writes beside them. A
test holds the files identical to ``save_pretrained``'s.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from zero2merged.checks.layers import LayerMerger, wrapped_params
from zero2merged.core import names
from zero2merged.core.errors import VerificationError
from zero2merged.core.names import ORIGINAL
from zero2merged.core.options import Tuning
from zero2merged.core.results import Parity, RebuildResult
from zero2merged.files.safetensors_reader import Reader
from zero2merged.files.safetensors_writer import Writer
from zero2merged.files.zipcheck import RecordCheck
from zero2merged.model import transformers4
from zero2merged.model.base import base_dir, saved_dtypes
from zero2merged.model.layouts import Group, Layout, conversion_mapping, untie_if_diverged, untied
from zero2merged.model.weights import Readers, read_base
from zero2merged.running.manifest import Flushing
from zero2merged.running.progress import Progress
from zero2merged.running.runtime import core_left_for_flushing


@dataclass
class Planned:
    """How one tensor of the merged model (as its modules hold it) is made.

    Attributes:
        meta: Its dtype (the output's) and shape, as a meta tensor.
        layer: The LoRA layer (wrapper path) whose merge gives it, with ``param``, the wrapped param it is;
            None for a tensor copied as it is.
        param: See ``layer``.
        keys: The wrapper keys it is known by (several when tied): a copy reads the first stage 4 has a
            source for.
    """

    meta: torch.Tensor
    layer: str | None = None
    param: str | None = None
    keys: list[str] = field(default_factory=list)


@dataclass
class ShardPlan:
    """What the merged model's files will hold, decided on the meta device (the same in every process).

    Attributes:
        final: The merged model's module tree (``unload`` of the wrapper: nothing computed).
        tensors: The merged model's tensors (module names, tied ones once) -> how each is made.
        files: The files' tensors (names, output dtype and shape, as meta tensors), in ``save_pretrained``'s
            order.
        groups: What makes the files' tensors from the model's (one each, unless the layout converts them).
        split: The shards, as ``save_pretrained`` splits ``files`` (huggingface_hub's ``StateDictSplit``).
        layers: LoRA layer path -> the layer (in the wrapper), for the layers whose merge writes weights.
        layout: The model's conversion mapping.
        readers: Where stage 4's sources are read: the consolidated store, and the base model's folder (read
            in the model's layout).
    """

    final: Any
    tensors: dict[str, Planned]
    files: dict[str, torch.Tensor]
    groups: list[Group]
    split: Any
    layers: dict[str, Any]
    layout: Layout
    readers: Readers

    def __post_init__(self) -> None:
        self.making = {name: group for group in self.groups for name in group.targets}  # file tensor -> group
        self.made_into = {name: group for group in self.groups for name in group.sources}  # model tensor -> group
        self.merged_into = {(p.layer, p.param): name for name, p in self.tensors.items() if p.layer is not None}

    def shard_bytes(self, shard: str) -> int:
        return sum(_nbytes(self.files[name]) for name in self.split.filename_to_tensors[shard])


def plan_shards(model: Any, rebuilt: RebuildResult, dtype: torch.dtype, max_shard_size: int) -> ShardPlan:
    """Unload the (meta) wrapper and lay out the merged model's files as ``save_pretrained`` would, after
    ``from_pretrained`` of the base's files.

    Args:
        model: The PEFT wrapper, on the meta device.
        rebuilt: Stage 3's result (the base's names for the wrapper's tensors).
        dtype: The output dtype of floating-point weights.
        max_shard_size: The largest shard, in bytes.
    """
    base = read_base(model, rebuilt)  # reading the base's files marks the transforms they use, as loading does
    readers = Readers()
    readers[base.folder] = base
    readers[f"{base.folder}{ORIGINAL}"] = base.original()  # a QLoRA run merged into its base (--merge-into base)
    model.eval()
    # The wrapper's tensors survive ``unload`` as the same objects under the merged model's names: identity
    # leads from each merged tensor back to its wrapper keys, and to the LoRA layer that merges it.
    keys_of: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
    merged_by: dict[int, tuple[str, str]] = {}
    layers = {}
    for path, layer, params in wrapped_params(model):
        for name, param in params.items():
            merged_by[id(param)] = (path, name)
            layers[path] = layer
    final = model.unload()
    untie_if_diverged(final)
    state = final.state_dict(keep_vars=True)
    dtype_of = saved_dtypes(final, dtype)
    tensors = {}
    for name, tensor in untied(state, final).items():
        meta = tensor.to("meta", dtype=dtype_of(name) if tensor.is_floating_point() else tensor.dtype)
        layer, param = merged_by.get(id(state[name]), (None, None))
        tensors[name] = Planned(meta, layer, param, keys_of.get(id(state[name]), []))
    saved = base.layout.saving({name: planned.meta for name, planned in tensors.items()})
    split = saved.split(names.WEIGHTS_PATTERN, max_shard_size)
    return ShardPlan(final, tensors, saved.files, saved.groups, split, layers, base.layout, readers)


def deal(sizes: dict[str, int], count: int) -> list[list[str]]:
    """Shards (name -> bytes, in file order) dealt to ``count`` processes: largest first to the least loaded;
    each share in file order."""
    shares: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for shard in sorted(sizes, key=sizes.__getitem__, reverse=True):
        least = load.index(min(load))
        shares[least].append(shard)
        load[least] += sizes[shard]
    order = list(sizes)
    return [sorted(share, key=order.index) for share in shares]


def write_shards(
    plan: ShardPlan,
    shards: list[str],
    adapter: str,
    sources: dict[str, list[str]],
    staged: Path,
    *,
    flushing: Callable[[Path], Flushing],
    device: str = "cpu",
    block_bytes: int = Tuning.block_bytes,
    records: RecordCheck | None = None,
) -> Parity:
    """Write the given shards of ``plan`` into ``staged``: each LoRA layer merged by PEFT and checked on probe
    activations on its way, every other weight copied from its source a chunk at a time.

    Every byte read from the rank files (the saved frozen weights the consolidated store refers to) goes
    through a CRC-32 check of its zip record (``records``), completed before this returns: this is where the
    conversion reads them, once.

    Args:
        plan: The files' plan.
        shards: The shards to write (a share of ``plan``'s).
        adapter: The adapter's name.
        sources: Stage 4's plan: wrapper key -> ``[file or base model folder, name in it]``.
        staged: The folder to write into.
        flushing: Flushes each shard to disk in the background as it is written (and, in the process that
            records the manifest, hashes it): :meth:`~zero2merged.running.manifest.FileHashes.flush_as_written`.
        device: Where each layer is merged and checked.
        block_bytes: See :class:`~zero2merged.core.options.Tuning`.
        records: The check to feed (:func:`record_check`); a fresh one if not given.

    Returns:
        The worst per-layer parity of the layers merged here.

    Raises:
        VerificationError: a layer merged to NaN/inf, or its merged output left tolerance.
        CheckpointError: a rank file's record read here fails its CRC-32 check.
    """
    records = record_check(plan.readers, sources) if records is None else records
    merger = LayerMerger(adapter, sources, device, plan.readers, block_bytes)
    writer = _ShardWriter(plan, shards, merger, staged, flushing)
    with core_left_for_flushing(), Progress("merge", sum(map(plan.shard_bytes, shards)), len(writer.mine)) as progress:
        for shard in shards:
            writer.write(shard, progress)
    records.finish()
    for done in writer.flushed:
        done.result()  # on disk; or the error (a full disk, say) raised here, in the stage
    return writer.merger.worst


def record_check(readers: Readers, sources: dict[str, list[str]]) -> RecordCheck:
    """A CRC-32 check of the rank files' records that the consolidated store's references lead to, fed by its
    reader from now on."""
    stores = [getattr(readers[file], "store", readers[file]) for file in sorted({file for file, _ in sources.values()})]
    stores = [reader for reader in stores if isinstance(reader, Reader) and reader.references]
    records = RecordCheck(sorted({file for s in stores for key in s.references for file, _, _ in s.ranges(key)}))
    for reader in stores:
        reader.observe, reader.read_once = records.feed, True
    return records


class _ShardWriter:
    """Writes a share of the shards. Each tensor is written the moment it is made, into whichever of this
    share's shards holds it (a shard is opened early if need be, and closed, complete, in its turn), so no
    merged weight waits in memory for its shard: only the tensors a conversion needs together do.

    A LoRA layer's merged rows go to the group that makes file tensors from them: straight into the file when
    the layout keeps the tensor as it is, a block of experts at a time through the conversion where experts
    are fused, or gathered whole for any other conversion.
    """

    def __init__(
        self,
        plan: ShardPlan,
        shards: list[str],
        merger: LayerMerger,
        staged: Path,
        flushing: Callable[[Path], Flushing],
    ):
        self.plan, self.merger, self.staged, self.flushing = plan, merger, staged, flushing
        self.shard_of = {name: shard for shard in shards for name in plan.split.filename_to_tensors[shard]}
        self.mine = set(self.shard_of)
        self.open: dict[str, tuple[Writer, Flushing]] = {}
        self.flushed: list[Future] = []  # each closed shard's flush (and hash)
        self.made: set[int] = set()  # groups made (or being made)
        self.gathered: dict[int, dict[str, tuple[torch.Tensor, int]]] = {}  # a conversion's inputs, rows filled

    def write(self, shard: str, progress: Progress) -> None:
        """Make every tensor of ``shard`` (and whatever is made with them), in the order of the file, so that
        its beginning is done early and flushed while the rest is made; then close it."""
        for name in self._writer(shard).order:
            self._make(self.plan.making[name])
            progress.update(_nbytes(self.plan.files[name]), tensor_done=True)
        writer, flushing = self.open.pop(shard)
        writer.close()
        self.flushed.append(flushing.done())  # the rest of it, on the other core

    def _writer(self, shard: str) -> Writer:
        if shard not in self.open:
            tensors = self.plan.split.filename_to_tensors[shard]
            specs = {name: (self.plan.files[name].dtype, list(self.plan.files[name].shape)) for name in tensors}
            path = self.staged / shard
            writer = Writer(path, specs, {"format": "pt"}, sync=False)
            writer.on_prefix = (flushing := self.flushing(path)).upto
            self.open[shard] = writer, flushing
        return self.open[shard][0]

    def _make(self, group: Group) -> None:
        """Make a group's file tensors: merge the LoRA layers its inputs come from (what they merge goes where
        it belongs), copy the other inputs."""
        if id(group) in self.made:
            return
        self.made.add(id(group))
        for name in group.sources:
            planned = self.plan.tensors[name]
            if planned.layer is None:
                self._copy_in(name, group)
            elif planned.layer not in self.merger.merged:
                for param, first, rows in self.merger.merge(planned.layer, self.plan.layers[planned.layer]):
                    self._deliver(self.plan.merged_into[planned.layer, param], first, rows)

    def _deliver(self, name: str, first: int, rows: torch.Tensor) -> None:
        """Rows of a merged model tensor (from row ``first`` on) into the file tensors made from them."""
        group, meta = self.plan.made_into[name], self.plan.tensors[name].meta
        rows = _cast(rows, meta.dtype, name)
        if group.transform is None:
            self._put(group.key, rows, first * _row_bytes(meta))
        elif group.experts:
            for target, tensor in group.convert({name: rows}, self.plan.layout.model, first_expert=first).items():
                self._put(target, tensor)
        else:  # gathered whole; converted once every input has all its rows
            gathered = self.gathered.setdefault(id(group), {})
            whole, filled = gathered.get(name) or (torch.empty(meta.shape, dtype=meta.dtype), 0)
            whole[first : first + rows.shape[0]] = rows
            gathered[name] = whole, filled + rows.shape[0]
            if all(gathered.get(s, (None, -1))[1] == self.plan.tensors[s].meta.shape[0] for s in group.sources):
                inputs = {s: tensor for s, (tensor, _) in self.gathered.pop(id(group)).items()}
                for target, tensor in group.convert(inputs, self.plan.layout.model).items():
                    self._put(target, tensor)

    def _copy_in(self, name: str, group: Group) -> None:
        """A model tensor no LoRA layer merges, from its source: file to file where it is written as it is
        stored, else a chunk of rows at a time (an expert at a time where the layout fuses them; whole for
        any other conversion)."""
        planned = self.plan.tensors[name]
        file, key = next(self.merger.sources[k] for k in planned.keys if k in self.merger.sources)
        reader = self.merger.readers[file]
        if group.transform is None:
            # File to file in the kernel, unless the bytes must be seen: cast, or CRC-checked on the way
            as_stored = reader.dtype(key) == planned.meta.dtype and getattr(reader, "observe", None) is None
            ranges = reader.ranges(key) if as_stored else None
            if ranges is None:
                for first, rows in reader.chunks(key):
                    self._deliver(name, first, rows)
                return
            start, writer = 0, self._writer(self.shard_of[group.key])
            for path, offset, nbytes in ranges:
                writer.copy(group.key, path, offset, nbytes, start)
                start += nbytes
        elif group.experts:
            for first in range(planned.meta.shape[0]):
                self._deliver(name, first, reader.get(key, slice(first, first + 1)))
        else:
            self._deliver(name, 0, reader.get(key))

    def _put(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write (rows of) a file tensor, if it is in this share."""
        if name in self.mine:
            self._writer(self.shard_of[name]).write(name, tensor, start)


def write_index(plan: ShardPlan, staged: Path) -> None:
    """The shards' index, as ``save_pretrained`` writes it (when there are several shards)."""
    if plan.split.is_sharded:
        index = {
            "metadata": {"total_parameters": plan.final.num_parameters(), **plan.split.metadata},
            "weight_map": plan.split.tensor_to_filename,
        }
        (staged / names.WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_configs(model: Any, staged: Path, dtype: torch.dtype, base_model: str) -> None:
    """``config.json`` and ``generation_config.json`` as ``save_pretrained`` writes them for the merged model
    loaded from the base (which brings the base's generation config along) and cast to ``dtype``."""
    from transformers import GenerationConfig

    if conversion_mapping():
        model.config.dtype = str(dtype).split(".")[1]
    else:
        transformers4.set_dtype(model.config, str(dtype).split(".")[1])
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staged)
    if model.can_generate():
        folder = base_dir(base_model)
        has_own = (folder / "generation_config.json").is_file()
        generation = GenerationConfig.from_pretrained(folder) if has_own else model.generation_config
        generation.save_pretrained(staged)


def _cast(tensor: torch.Tensor, dtype: torch.dtype, name: str) -> torch.Tensor:
    """``tensor`` in ``dtype``; fp16's narrow range must not turn a weight into inf."""
    cast = tensor.to(dtype)
    if dtype == torch.float16 and not torch.isfinite(cast).all():
        raise VerificationError(
            f"{name} holds values beyond float16's range (65504); save it with --dtype bf16 or fp32"
        )
    return cast


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (of one element, for a 1-D tensor): where row ``i`` starts, times ``i``."""
    return math.prod(tensor.shape[1:]) * tensor.dtype.itemsize


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()

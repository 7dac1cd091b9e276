"""The merged model's files, laid out as ``save_pretrained`` lays them out, and written a shard at a time.

:func:`plan_shards` decides on the meta device what every file holds: names, dtypes, shapes, the split
into shards, and for each tensor how it is made (merged by a LoRA layer, or copied from where stage 4
found it). :func:`write_shards` writes any share of the shards (every process computes the same plan),
merging each LoRA layer with :class:`~zero2merged.layers.LayerMerger` on the way; :func:`write_index` and
:func:`write_configs` add what ``save_pretrained`` writes beside them. A test holds the files identical to
``save_pretrained``'s.
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

from zero2merged import names
from zero2merged.basemodel import base_dir, saved_dtypes
from zero2merged.errors import StreamingUnsupported, VerificationError
from zero2merged.layers import LayerMerger
from zero2merged.options import Tuning
from zero2merged.progress import Progress
from zero2merged.results import Parity
from zero2merged.runtime import core_left_for_flushing
from zero2merged.safetensors_io import Readers, Writer


@dataclass
class Planned:
    """How one tensor of the merged model's files is made.

    Attributes:
        meta: Its dtype and shape in the output (a meta tensor).
        layer: The LoRA layer (wrapper path) whose merge gives it, with ``param``, the base layer's param it
            is; None for a tensor copied as it is.
        param: See ``layer``.
        keys: The wrapper keys it is known by (several when tied): a copy reads the first stage 4 has a
            source for.
    """

    meta: torch.Tensor
    layer: str | None = None
    param: str | None = None
    keys: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.meta.numel() * self.meta.element_size()


@dataclass
class ShardPlan:
    """What the merged model's files will hold, decided on the meta device (the same in every process).

    Attributes:
        final: The merged model's module tree (``unload`` of the wrapper: nothing computed).
        tensors: Output name -> how it is made, for every weight written (tied ones once), in
            ``save_pretrained``'s order.
        split: The shards, as ``save_pretrained`` splits them (huggingface_hub's ``StateDictSplit``).
        layers: LoRA layer path -> the layer (in the wrapper), for the layers whose merge writes weights.
    """

    final: Any
    tensors: dict[str, Planned]
    split: Any
    layers: dict[str, Any]

    def shard_bytes(self, shard: str) -> int:
        return sum(self.tensors[name].nbytes for name in self.split.filename_to_tensors[shard])

    def written_as(self, layer: str, param: str) -> str | None:
        """The output name of a LoRA layer's merged base param (None: not written, e.g. tied to another)."""
        return self._written_as.get((layer, param))

    def __post_init__(self) -> None:
        self._written_as = {(p.layer, p.param): name for name, p in self.tensors.items() if p.layer is not None}


def plan_shards(model: Any, dtype: torch.dtype, max_shard_size: int) -> ShardPlan:
    """Unload the (meta) wrapper and lay out the merged model's files as ``save_pretrained`` would."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.eval()
    # The wrapper's tensors survive ``unload`` as the same objects under the merged model's names: identity
    # leads from each output name back to its wrapper keys, and to the LoRA layer that merges it.
    keys_of: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        keys_of.setdefault(id(tensor), []).append(key)
    merged_by: dict[int, tuple[str, str]] = {}
    layers = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            for name, param in module.get_base_layer().named_parameters(recurse=False):
                merged_by[id(param)] = (path, name)
                layers[path] = module
    final = model.unload()
    _untie_if_diverged(final)
    state = final.state_dict(keep_vars=True)
    saved = _as_saved(final, remove_tied_weights_from_state_dict(dict(state), final))
    dtype_of = saved_dtypes(final, dtype)
    tensors = {}
    for name, tensor in saved.items():
        meta = tensor.to("meta", dtype=dtype_of(name) if tensor.is_floating_point() else tensor.dtype)
        layer, param = merged_by.get(id(state[name]), (None, None))
        tensors[name] = Planned(meta, layer, param, keys_of.get(id(state[name]), []))
    split = split_torch_state_dict_into_shards(
        {name: p.meta for name, p in tensors.items()},
        filename_pattern=names.WEIGHTS_PATTERN,
        max_shard_size=max_shard_size,
    )
    return ShardPlan(final, tensors, split, layers)


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
    flush: Callable[[Path], Future],
    device: str = "cpu",
    block_bytes: int = Tuning.block_bytes,
) -> Parity:
    """Write the given shards of ``plan`` into ``staged``: each LoRA layer merged by PEFT and checked on probe
    activations on its way, every other weight copied from its source a chunk at a time.

    Args:
        plan: The files' plan.
        shards: The shards to write (a share of ``plan``'s).
        adapter: The adapter's name.
        sources: Stage 4's plan: wrapper key -> ``[file, name in it]``.
        staged: The folder to write into.
        flush: Flushes a written shard to disk in the background (and, in the process that records the
            manifest, hashes it): :meth:`~zero2merged.manifest.FileHashes.flush_later`.
        device: Where each layer is merged and checked.
        block_bytes: See :class:`~zero2merged.options.Tuning`.

    Returns:
        The worst per-layer parity of the layers merged here.

    Raises:
        VerificationError: a layer merged to NaN/inf, or its merged output left tolerance.
    """
    writer = _ShardWriter(plan, shards, LayerMerger(adapter, sources, device, block_bytes), sources)
    flushed = []
    with core_left_for_flushing(), Progress("merge", sum(map(plan.shard_bytes, shards)), len(writer.mine)) as progress:
        for shard in shards:
            writer.write(staged / shard, progress)
            flushed.append(flush(staged / shard))  # meanwhile, on the other core
    for done in flushed:
        done.result()  # on disk; or the error (a full disk, say) raised here, in the stage
    return writer.merger.worst


class _ShardWriter:
    """Writes shards of a plan one after another; a LoRA layer's merged rows go straight into the open
    shard, or are held until the (later) shard holding them is written."""

    def __init__(self, plan: ShardPlan, shards: list[str], merger: LayerMerger, sources: dict[str, list[str]]):
        self.plan, self.merger, self.sources = plan, merger, sources
        self.mine = {name for shard in shards for name in plan.split.filename_to_tensors[shard]}
        self.held: dict[str, torch.Tensor] = {}

    def write(self, path: Path, progress: Progress) -> None:
        tensor_names = self.plan.split.filename_to_tensors[path.name]
        specs = {
            name: (self.plan.tensors[name].meta.dtype, list(self.plan.tensors[name].meta.shape))
            for name in tensor_names
        }
        with Writer(path, specs, {"format": "pt"}, sync=False) as out:
            for name in tensor_names:
                planned = self.plan.tensors[name]
                progress.update(planned.nbytes, tensor_done=True)
                if planned.layer is None:
                    source = next(self.sources[key] for key in planned.keys if key in self.sources)
                    _copy(out, name, source, planned.meta.dtype, self.merger.readers)
                    continue
                if planned.layer not in self.merger.merged:
                    self._merge(planned.layer, out)
                if name in self.held:
                    out.write(name, self.held.pop(name))

    def _merge(self, layer: str, out: Writer) -> None:
        """Merge a LoRA layer; its rows are written where their tensor's file is open, else held."""
        for param, first_row, rows in self.merger.merge(layer, self.plan.layers[layer]):
            target = self.plan.written_as(layer, param)
            if target in out.specs:  # its file is open: written as it comes
                meta = self.plan.tensors[target].meta
                out.write(target, _cast(rows, meta.dtype, target), first_row * _row_bytes(meta))
            elif target in self.mine:
                _hold(self.held, self.plan.tensors[target].meta, target, first_row, rows)


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

    model.config.dtype = str(dtype).split(".")[1]
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(staged)
    if model.can_generate():
        folder = base_dir(base_model)
        has_own = (folder / "generation_config.json").is_file()
        generation = GenerationConfig.from_pretrained(folder) if has_own else model.generation_config
        generation.save_pretrained(staged)


def _as_saved(model: Any, state: dict) -> dict:
    """The state dict in the order ``save_pretrained`` shards it, for models saved under their module names.

    transformers saves a loaded model through ``revert_weight_conversion``, which orders the keys by
    ``dot_natural_key`` (and renames them for architectures with a conversion mapping: those are refused,
    since renaming and fusing weights needs them all in memory).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, dot_natural_key

    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if conversions:
        raise StreamingUnsupported(
            f"transformers saves {type(model).__name__} in a layout other than its modules "
            "(a weight conversion mapping); convert it with --in-memory"
        )
    return dict(sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])))


def _untie_if_diverged(model: Any) -> None:
    """Training a tied embedding apart (``modules_to_save``) unties it: say so in the config, as PEFT's
    ``merge_and_unload`` does. (PEFT compares storage addresses, which the meta device does not have.)"""
    config = model.config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and inputs is not None and outputs is not None:
        if outputs.weight is not inputs.weight:
            config.tie_word_embeddings = False


def _copy(writer: Writer, name: str, source: list[str], dtype: torch.dtype, readers: Readers) -> None:
    """Copy a weight from its source: file to file when its dtype stays, else a chunk of rows at a time, cast."""
    reader = readers[source[0]]
    if reader.dtype(source[1]) == dtype:
        start = 0
        for file, offset, nbytes in reader.ranges(source[1]):
            writer.copy(name, file, offset, nbytes, start)
            start += nbytes
        return
    for first, rows in reader.chunks(source[1]):
        piece = _cast(rows, dtype, name)
        writer.write(name, piece, first * _row_bytes(piece))


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


def _hold(held: dict[str, torch.Tensor], meta: torch.Tensor, name: str, first_row: int, rows: torch.Tensor) -> None:
    """Keep merged rows of ``name`` (cast) in a whole tensor until the shard holding it is written."""
    if name not in held:
        held[name] = torch.empty(meta.shape, dtype=meta.dtype)
    held[name][first_row : first_row + rows.shape[0]] = _cast(rows, meta.dtype, name)

"""Stage 5, merge: PEFT's own merge, then parity of the merged model with the unmerged one.

The merge maths (W0 + s·B·A, rsLoRA's scaling, DoRA's row norms, fan_in_fan_out) stays PEFT's: nothing
here re-implements it. In memory, ``merge_and_unload`` merges the whole model and both models run on the
same probe inputs. Streaming, each LoRA layer is merged on its own by PEFT's layer ``merge`` (a linear layer
a block of rows at a time) and checked on probe activations, and the merged weights go straight into the
output's files.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zero2merged import names
from zero2merged.basemodel import base_dir, saved_dtypes
from zero2merged.errors import StreamingUnsupported, VerificationError
from zero2merged.manifest import replacing, sync_and_hash_later
from zero2merged.modelfiles import check_complete, fresh_dir, replace_dir
from zero2merged.parity import (
    MERGE_TOLERANCE,
    PROBE_BATCH,
    PROBE_SEED,
    Parity,
    compare,
    outputs,
    probe_inputs,
)
from zero2merged.progress import Progress
from zero2merged.safetensors_io import Readers, Writer

# A plain LoRA linear layer is merged this many bytes of its fp32 rows at a time. PEFT's merge makes two
# temporaries the size of what it merges: at 1 MB they come from memory the process keeps (glibc serves
# blocks under its mmap threshold from its heap and keeps up to twice that threshold free there), and they
# stay in the caches. A whole layer's come as fresh pages from the kernel, every time: the merge stage took
# twice as long (and at 8 MB, the size glibc starts to give back, hardly less). A layer's memory is then
# this size however wide the model.
BLOCK_BYTES = 1 << 20


def merge(model, work_dir: Path):
    """Stage 5: merge the adapter into the base and check the merged model against the unmerged one.

    Writes ``merged/`` (the merged model in fp32, ``save_pretrained`` layout) and ``probes.safetensors``
    (probe inputs, unmerged and merged outputs) into ``work_dir``.

    Args:
        model: The loaded PEFT wrapper from stage 4 (merged in place).

    Returns:
        ``(merged_model, metrics)``; metrics hold the parity figures.

    Raises:
        VerificationError: the merge produced NaN/inf or outputs beyond tolerance.
    """
    inputs = probe_inputs(model.get_base_model().config)
    unmerged = outputs(model, inputs)
    try:
        merged = model.merge_and_unload(safe_merge=True)
    except ValueError as e:  # PEFT's safe_merge found NaNs
        raise VerificationError(f"merging the adapter failed: {e}") from e
    merged_outputs = outputs(merged, inputs)
    parity = compare(merged_outputs, unmerged)
    parity.check(MERGE_TOLERANCE, "merged vs unmerged model")

    staged = fresh_dir(work_dir / f".{names.MERGED}.tmp")
    merged.save_pretrained(staged)
    check_complete(staged, merged)
    final = work_dir / names.MERGED
    shutil.rmtree(final, ignore_errors=True)
    replace_dir(staged, final)
    with replacing(work_dir / names.PROBES) as tmp:
        save_file({**inputs, "unmerged": unmerged, "merged": merged_outputs}, tmp)
    return merged, {"parity": parity.to_dict()}


@dataclass
class ShardPlan:
    """What the merged model's files will hold, decided on the meta device (the same in every process).

    Attributes:
        final: The merged model's module tree (``unload`` of the wrapper: nothing computed).
        state: Its state dict, tensors by identity (``keep_vars``).
        out: Name -> meta tensor in the output dtype, for every weight written (tied ones once), in
            ``save_pretrained``'s order.
        split: The shards, as ``save_pretrained`` splits them.
        merged_by: Id of a LoRA layer's base param -> (layer path, layer, param name).
        origin: Id of a tensor -> its wrapper keys (several when tied).
        written_as: (LoRA layer path, base param name) -> the name its merged weight is written under.
    """

    final: Any
    state: dict
    out: dict
    split: Any
    merged_by: dict
    origin: dict
    written_as: dict

    def shard_bytes(self, shard: str) -> int:
        return sum(self.out[name].numel() * self.out[name].element_size()
                   for name in self.split.filename_to_tensors[shard])


def plan_shards(model, dtype: torch.dtype, max_shard_size: str | int) -> ShardPlan:
    """Unload the (meta) wrapper and lay out the merged model's files as ``save_pretrained`` would."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from peft.tuners.tuners_utils import BaseTunerLayer
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    model.eval()
    origin: dict[int, list[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        origin.setdefault(id(tensor), []).append(key)
    merged_by = {}
    for path, module in model.named_modules():
        if isinstance(module, BaseTunerLayer) and hasattr(module, "base_layer"):
            for name, param in module.get_base_layer().named_parameters(recurse=False):
                merged_by[id(param)] = (path, module, name)
    final = model.unload()
    _untie_if_diverged(final)
    state = final.state_dict(keep_vars=True)
    saved = _as_saved(final, remove_tied_weights_from_state_dict(dict(state), final))
    dtype_of = saved_dtypes(final, dtype)
    out = {name: t.to("meta", dtype=dtype_of(name) if t.is_floating_point() else t.dtype) for name, t in saved.items()}
    split = split_torch_state_dict_into_shards(out, filename_pattern=names.WEIGHTS_PATTERN, max_shard_size=max_shard_size)
    written_as = {}
    for name in out:
        if id(state[name]) in merged_by:
            path, _, param = merged_by[id(state[name])]
            written_as[path, param] = name
    return ShardPlan(final, state, out, split, merged_by, origin, written_as)


def write_shards(plan: ShardPlan, shards: list[str], adapter: str, sources: dict[str, list[str]],
                 staged: Path, device: str = "cpu", *, hashing: bool = True) -> dict:
    """Write the given shards of ``plan`` into ``staged``: each LoRA layer merged by PEFT and checked on
    probe activations on its way, every other weight copied from its source a chunk at a time. With
    ``hashing`` (in the process that records the manifest, not in a helper) the shards are hashed on the way.

    Returns:
        ``{"parity": ...}``: the worst per-layer parity of the layers merged here.

    Raises:
        VerificationError: a layer merged to NaN/inf, or its merged output left tolerance.
    """
    merger = _LayerMerger(adapter, sources, device)
    mine = {name for shard in shards for name in plan.split.filename_to_tensors[shard]}
    held: dict[str, torch.Tensor] = {}  # merged weights that go into a later shard than the one open
    flushed = []  # each shard's background flush to disk (and hash)
    with _core_left_for_flushing(), Progress("merge", sum(map(plan.shard_bytes, shards)), len(mine)) as progress:
        for shard in shards:
            tensor_names = plan.split.filename_to_tensors[shard]
            specs = {name: (plan.out[name].dtype, list(plan.out[name].shape)) for name in tensor_names}
            with Writer(staged / shard, specs, {"format": "pt"}, sync=False) as writer:
                for name in tensor_names:
                    progress.update(plan.out[name].numel() * plan.out[name].element_size(), tensor_done=True)
                    obj = plan.state[name]
                    if id(obj) not in plan.merged_by:
                        source = next(sources[key] for key in plan.origin[id(obj)] if key in sources)
                        _copy(writer, name, source, plan.out[name].dtype, merger.readers)
                        continue
                    path, layer, _ = plan.merged_by[id(obj)]
                    if path not in merger.merged:
                        for param, first_row, rows in merger.merge(path, layer):
                            target = plan.written_as.get((path, param))
                            if target in writer.specs:  # its file is open: written as it comes
                                writer.write(target, _cast(rows, plan.out[target].dtype, target),
                                             first_row * _row_bytes(plan.out[target]))
                            elif target in mine:
                                _hold(held, plan.out[target], target, first_row, rows)
                    if name in held:
                        writer.write(name, held.pop(name))
            flushed.append(sync_and_hash_later(staged / shard, hashing=hashing))  # meanwhile, on the other core
    for done in flushed:
        done.result()  # on disk; or the error (a full disk, say) raised here, in the stage
    return {"parity": merger.worst.to_dict()}


def merge_streaming(model, adapter: str, sources: dict[str, list[str]], staged: Path, *, dtype: torch.dtype,
                    max_shard_size: str | int, base_model: str, device: str = "cpu", helpers=None) -> dict:
    """Stage 5 (streaming): merge one LoRA layer at a time and write the merged weights as they come.

    ``model`` is the PEFT wrapper on the meta device. Each LoRA layer is given its weights (fp32; a linear
    layer a block of rows at a time), run on seeded probe activations, merged by PEFT's own ``merge``, run
    again (the two outputs must agree), and its merged weight written; then it goes back to the meta device. Names, shards, index, configs and
    bytes are those ``save_pretrained`` writes for the merged model (a test holds the two paths to
    identical files).

    Args:
        model: The PEFT wrapper from stage 3, on the meta device.
        adapter: The adapter's name.
        sources: Stage 4's plan: wrapper key -> ``[file, name in it]``.
        staged: Folder the files are written to.
        dtype: Output dtype of the floating-point weights.
        max_shard_size: Largest shard, as ``save_pretrained`` takes it.
        base_model: The base's folder or hub id (for its generation config).
        device: Where each layer is merged and checked (``cuda`` on a GPU machine); weights are read and
            written on the CPU either way.
        helpers: Other processes to write shards too (:mod:`zero2merged.workers`); ``None``: this one only.

    Returns:
        Metrics: the worst per-layer parity, the layers merged, the files written and by how many processes.

    Raises:
        VerificationError: a layer merged to NaN/inf, or its merged output left tolerance.
    """
    plan = plan_shards(model, dtype, max_shard_size)
    groups = _balanced(plan, 1 + (helpers.size if helpers else 0))
    pending = helpers.start(groups[1:]) if helpers else list  # list(): no results from elsewhere
    try:
        mine = write_shards(plan, groups[0], adapter, sources, staged, device)
    except BaseException:
        with contextlib.suppress(Exception):
            pending()  # let the helpers finish before stopping: none is left waiting
        raise
    results = [mine, *pending()]
    worst = Parity(0.0, 0.0, 1.0, 0)
    for result in results:
        worst = _worse(worst, Parity(**result["parity"]))
    if plan.split.is_sharded:
        index = {"metadata": {"total_parameters": plan.final.num_parameters(), **plan.split.metadata},
                 "weight_map": plan.split.tensor_to_filename}
        (staged / names.WEIGHTS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    _write_configs(plan.final, staged, dtype, base_model)
    layers = len({path for path, _, _ in plan.merged_by.values()})
    return {"parity": {"layers": layers, **worst.to_dict()}, "files": len(plan.split.filename_to_tensors),
            "processes": len([g for g in groups if g])}


@contextlib.contextmanager
def _core_left_for_flushing() -> Iterator[None]:
    """torch on one thread fewer meanwhile, so that the background flush and hash has a core of its own.
    (On 2 cores, sharing them made the merge a third slower: torch's threads wait on one another.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _balanced(plan: ShardPlan, count: int) -> list[list[str]]:
    """The shards dealt to ``count`` processes, largest first to the least loaded (each list in file order)."""
    shards = list(plan.split.filename_to_tensors)
    groups: list[list[str]] = [[] for _ in range(count)]
    load = [0] * count
    for shard in sorted(shards, key=plan.shard_bytes, reverse=True):
        least = load.index(min(load))
        groups[least].append(shard)
        load[least] += plan.shard_bytes(shard)
    return [sorted(group, key=shards.index) for group in groups]


def _write_configs(model, staged: Path, dtype: torch.dtype, base_model: str) -> None:
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


def _as_saved(model, state: dict) -> dict:
    """The state dict in the order ``save_pretrained`` shards it, for models saved under their module names.

    transformers saves a loaded model through ``revert_weight_conversion``, which orders the keys by
    ``dot_natural_key`` (and renames them for architectures with a conversion mapping: those are refused,
    since renaming and fusing weights needs them all in memory).
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, dot_natural_key

    conversions = [c for c in get_model_conversion_mapping(model, add_legacy=False) if not isinstance(c, PrefixChange)]
    if conversions:
        raise StreamingUnsupported(f"transformers saves {type(model).__name__} in a layout other than its modules "
                                   "(a weight conversion mapping); convert it with --in-memory")
    return dict(sorted(state.items(), key=lambda kv: dot_natural_key(kv[0])))


def _untie_if_diverged(model) -> None:
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
        raise VerificationError(f"{name} holds values beyond float16's range (65504); save it with --dtype bf16 or fp32")
    return cast


def _row_bytes(tensor: torch.Tensor) -> int:
    """Bytes of one row (of one element, for a 1-D tensor): where row ``i`` starts, times ``i``."""
    return math.prod(tensor.shape[1:]) * tensor.dtype.itemsize


def _hold(held: dict[str, torch.Tensor], meta: torch.Tensor, name: str, first_row: int, rows: torch.Tensor) -> None:
    """Keep merged rows of ``name`` (cast) in a whole tensor until the shard holding it is written."""
    if name not in held:
        held[name] = torch.empty(meta.shape, dtype=meta.dtype)
    held[name][first_row: first_row + rows.shape[0]] = _cast(rows, meta.dtype, name)


class _LayerMerger:
    """Gives each LoRA layer its weights, merges it with PEFT's own ``merge`` and checks it on probe
    activations, then puts it back on the meta device.

    A plain LoRA linear layer is merged a block of output rows at a time (:data:`BLOCK_BYTES` of fp32): the
    block's rows of the base weight, ``lora_B`` and the bias, with all of ``lora_A``, are themselves a LoRA
    layer, whose merged rows are those of the whole. Any other layer is merged whole: a DoRA (or other
    variant) layer, whose PEFT code keeps state from call to call; an embedding or a Conv1D, whose rows lie
    the other way.
    """

    def __init__(self, adapter: str, sources: dict[str, list[str]], device: str):
        self.adapter, self.sources, self.device = adapter, sources, device
        self.readers = Readers()
        self.merged: set[str] = set()
        self.worst = Parity(0.0, 0.0, 1.0, 0)
        self._buffers = torch.empty(2, BLOCK_BYTES, dtype=torch.uint8)  # a block as stored, and in fp32

    def merge(self, path: str, layer) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Merge the layer at ``path``; yields ``(base param name, first row, merged rows)`` on the CPU,
        each valid only until the next is asked for.

        Raises:
            VerificationError: (once all is yielded) the merged layer's outputs left tolerance.
        """
        self.merged.add(path)
        probe = self._probe(layer)
        before, after = [], []
        for first_row in self._weights_given(path, layer):
            layer.merged_adapters.clear()  # PEFT's record of the previous block's merge: this one is unmerged
            with torch.no_grad():
                before.append(layer(probe))
                layer.merge(adapter_names=[self.adapter])  # no safe_merge's copy: NaN/inf fails the parity check
                if self.adapter not in layer.merged_adapters:
                    raise VerificationError(f"{path}: PEFT did not merge the adapter into this layer")
                after.append(layer(probe))
            for name, param in layer.get_base_layer().named_parameters(recurse=False):
                yield name, first_row, param.detach().to("cpu")
        parity = compare(torch.cat(after, dim=-1), torch.cat(before, dim=-1))
        parity.check(MERGE_TOLERANCE, f"{path}: merged vs unmerged layer")
        self.worst = _worse(self.worst, parity)

    def _weights_given(self, path: str, layer) -> Iterator[int]:
        """Give the layer its weights (in fp32, on the device) whole or a block of rows at a time, the base
        weight's block in a buffer reused block after block; yields the first row given each time. Ends
        with the layer back on the meta device, as declared."""
        sources = {name: self.sources[f"{path}.{name}"] for name in layer.state_dict(keep_vars=True)}
        if not _by_rows(layer, self.adapter):
            layer.load_state_dict({name: self._fetch(*source) for name, source in sources.items()}, assign=True)
            yield 0
            layer.to("meta")
            return
        declared = {name: torch.empty_like(param) for name, param in layer.named_parameters()}
        out_features, in_features = declared["base_layer.weight"].shape
        step = max(1, BLOCK_BYTES // (in_features * 4))
        _assign(layer, {name: self._fetch(*source) for name, source in sources.items() if name.startswith("lora_A.")})
        for first in range(0, out_features, step):
            rows = slice(first, min(first + step, out_features))
            _assign(layer, {name: self._fetch(*source, rows, buffered=name == "base_layer.weight")
                            for name, source in sources.items() if not name.startswith("lora_A.")})
            yield first
        _assign(layer, declared)

    def _fetch(self, file: str, key: str, rows: slice | None = None, *, buffered: bool = False) -> torch.Tensor:
        """A stored tensor (or its ``rows``) on the device, in fp32 if floating point; ``buffered``: in
        the reused buffers where it fits (valid until the next buffered fetch)."""
        stored = self.readers[file].get(key, rows, into=self._buffers[0] if buffered else None)
        if not stored.is_floating_point():
            return stored.to(self.device)
        if buffered and self.device == "cpu" and stored.numel() * 4 <= BLOCK_BYTES:
            return self._buffers[1].view(torch.float32)[: stored.numel()].view(stored.shape).copy_(stored)
        return stored.to(self.device, torch.float32)  # PEFT merges in fp32 here too

    def _probe(self, layer) -> torch.Tensor:
        from torch import nn

        base, generator = layer.get_base_layer(), torch.Generator().manual_seed(PROBE_SEED)
        if isinstance(base, nn.Embedding):
            probe = torch.randint(0, base.num_embeddings, (PROBE_BATCH, 8), generator=generator)
        else:
            probe = torch.randn(PROBE_BATCH, layer.in_features, generator=generator)
        return probe.to(self.device)


def _by_rows(layer, adapter: str) -> bool:
    """Whether ``layer`` is a plain LoRA linear layer (not DoRA or another variant, not Conv1D-shaped),
    whose state is all base layer, ``lora_A`` and ``lora_B``: the layers :class:`_LayerMerger` splits."""
    from peft.tuners.lora import Linear
    from torch import nn

    return (type(layer) is Linear and type(layer.get_base_layer()) is nn.Linear and not layer.fan_in_fan_out
            and adapter not in layer.lora_variant
            and all(name.startswith(("base_layer.", "lora_A.", "lora_B.")) for name in layer.state_dict()))


def _assign(layer, tensors: dict[str, torch.Tensor]) -> None:
    """Make ``tensors`` the layer's parameters, whatever their shapes (``load_state_dict`` insists on the
    declared ones)."""
    from torch import nn

    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(owner), leaf, nn.Parameter(tensor, requires_grad=False))


def _worse(a: Parity, b: Parity) -> Parity:
    return Parity(max(a.max_abs_diff, b.max_abs_diff), max(a.max_rel_diff, b.max_rel_diff),
                  min(a.top1_agreement, b.top1_agreement), a.positions + b.positions)

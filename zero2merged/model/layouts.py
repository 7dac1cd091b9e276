"""Saved layouts: a model's weights as its files name and shape them, and as its modules do.

transformers (since 5) builds some models in a module layout other than their files' layout, through a
*weight conversion mapping*: MoE experts are one fused 3-D parameter in memory but one tensor per expert on
disk (Mixtral's ``block_sparse_moe.experts.N.w1.weight``), a vision-language model's ``model.language_model``
is saved as ``language_model.model``, GPT-NeoX's ``lm_head`` as ``embed_out``. ``from_pretrained`` applies
the mapping and ``save_pretrained`` reverts it. The streaming conversion reads the base's files and writes
the output's without ever loading the model, so it applies the mapping itself, both ways, with transformers'
own renamings, converters and ops (:mod:`transformers.core_model_loading`). What this module adds is doing
that a group of tensors at a time, and a block of experts at a time where experts are fused, so that memory
never holds more: transformers' loader converts a whole group at once.

transformers 4 has no such mapping: its files name the modules' tensors one for one, but for a few renamings
(:mod:`zero2merged.model.transformers4` follows them, and :class:`Layout` hands its work there).
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from dataclasses import dataclass, field
from typing import Any

import torch

from zero2merged.core.errors import BaseModelError
from zero2merged.model import transformers4


@functools.cache
def conversion_mapping() -> bool:
    """Whether this transformers converts weights between its files' layout and its modules' (5 and up)."""
    return importlib.util.find_spec("transformers.core_model_loading") is not None


def transforms(model: Any) -> list:
    """The model's weight conversion mapping, as ``from_pretrained`` uses it (legacy renamings aside); none
    under transformers 4."""
    if not conversion_mapping():
        return []
    from transformers.conversion_mapping import get_model_conversion_mapping

    return get_model_conversion_mapping(model, add_legacy=False)


def describe(model: Any) -> list[str]:
    """What the mapping does, one line per transform (``inspect`` shows it); empty when files and modules
    share one layout."""
    if not conversion_mapping():
        return transformers4.describe(model)
    from transformers.core_model_loading import PrefixChange, WeightConverter

    lines = []
    for transform in transforms(model):
        if isinstance(transform, PrefixChange):
            continue  # only adds or drops a prefix some files have
        sources = ", ".join(transform._original_source_patterns)
        targets = ", ".join(transform._original_target_patterns)
        verb = "converted" if isinstance(transform, WeightConverter) else "renamed"
        lines.append(f"{verb}: {sources} (files) -> {targets} (modules)")
    return lines


@dataclass
class Group:
    """Tensors made together by one transform of the mapping: ``sources`` (names in, in the order the
    transform takes them) give ``targets`` (names out, in order, with dtype and shape as meta tensors).

    Attributes:
        key: The name transformers keys the group by (and hands the transform).
        sources: Names in.
        patterns: For each source, the transform's pattern it matched (None for a plain rename).
        transform: The transformers ``WeightConverter`` (None: one tensor, renamed to ``key``).
        rename: Saving: the renamings transformers applies to what the transform makes.
        targets: Names out -> meta tensors.
        experts: When the experts are fused on one side (dimension 0) and the transform keeps them apart, their
            number: the group can then be converted a block of experts at a time. 0 otherwise.
    """

    key: str
    sources: list[str]
    patterns: list[str | None]
    transform: Any = None
    rename: Any = None
    targets: dict[str, torch.Tensor] = field(default_factory=dict)
    experts: int = 0

    def convert(self, tensors: dict[str, torch.Tensor], model: Any, first_expert: int = 0) -> dict[str, torch.Tensor]:
        """The targets made from ``tensors`` (those of the sources present: all, or a block of experts'), by
        the transform's own ops; saving a block of experts, ``first_expert`` is the block's first."""
        if self.transform is None:
            [tensor] = tensors.values()
            return {self.key: tensor}
        transform = copy.deepcopy(self.transform)  # it collects the tensors it is handed
        for name, pattern in zip(self.sources, self.patterns, strict=True):
            if name in tensors:
                transform.add_tensor(self.key, name, pattern, tensors[name])
        made = transform.convert(self.key, model=model, config=model.config)
        made = {shift_expert(name, self.transform, first_expert): tensor for name, tensor in made.items()}
        return {self.rename(name): tensor for name, tensor in made.items()} if self.rename else made

    def expert_sources(self, experts: slice) -> list[str]:
        """Loading a block of experts: the sources of experts ``experts.start`` to ``experts.stop`` (each
        pattern's sources are in expert order)."""
        wanted = []
        for pattern in dict.fromkeys(self.patterns):
            wanted += [s for s, p in zip(self.sources, self.patterns, strict=True) if p == pattern][experts]
        return wanted


def _keeps_experts_apart(transform: Any, *, loading: bool) -> bool:
    """Whether ``transform`` stacks (loading) or splits (saving) experts along dimension 0 and otherwise acts
    only on other dimensions: then a block of experts converts on its own (Mixtral's and Qwen-MoE's
    converters: stack the experts, then concatenate gate and up projections along dimension 1)."""
    from transformers.core_model_loading import Chunk, Concatenate, MergeModulelist, SplitModulelist

    operations = getattr(transform, "operations", None) or []
    if not operations:
        return False
    expert_op, other_ops = (operations[0], operations[1:]) if loading else (operations[-1], operations[:-1])
    stacks = MergeModulelist if loading else SplitModulelist
    return (
        isinstance(expert_op, stacks)
        and expert_op.dim == 0
        and all(isinstance(op, (Chunk, Concatenate)) and op.dim >= 1 for op in other_ops)
    )


class Layout:
    """The mapping of one model (a module tree, on the meta device), for reading the base's files into module
    names and writing module tensors out under file names.

    Reading marks the transforms the base's files use, as ``from_pretrained`` does: :meth:`saving` then
    reverts those only, as ``save_pretrained`` does after loading those files (a base stored in module layout
    is saved back in module layout).

    Args:
        model: The base model (PEFT may have wrapped some of its modules since; merged, it is the output).
        names: The base model's own tensor names (from before PEFT wrapped it).
    """

    def __init__(self, model: Any, names: list[str]):
        self.model = model
        self.names = {name: name for name in names}
        self.transforms = transforms(model)

    def loading(self, files: dict[str, torch.Tensor]) -> dict[str, Group]:
        """How the base's files (name -> meta tensor) make the model's tensors: module name -> its group."""
        if not conversion_mapping():  # transformers 4: one tensor each, renamed
            named = transformers4.loaded_names(self.model, list(files))
            return {
                target: Group(target, [name], [None], targets={target: files[name]}) for target, name in named.items()
            }
        from transformers.core_model_loading import WeightConverter, dot_natural_key, rename_source_key

        renamings = [t for t in self.transforms if not isinstance(t, WeightConverter)]
        converters = [t for t in self.transforms if isinstance(t, WeightConverter)]
        groups: dict[str, Group] = {}
        for name in sorted(files, key=dot_natural_key):  # as from_pretrained orders them: experts in order
            target, pattern = rename_source_key(name, renamings, converters, self.model.base_model_prefix, self.names)
            if pattern is None:
                groups[target] = Group(target, [name], [None], targets={target: files[name]})
                continue
            group = groups.setdefault(target, Group(target, [], [], transform=_converter_for(converters, pattern)))
            group.sources.append(name)
            group.patterns.append(pattern)
        for group in groups.values():
            if group.transform is not None:
                group.targets = _meta_convert(group, {s: files[s] for s in group.sources}, self.model)
                group.experts = _loading_experts(group, files, self.model)
        return {target: group for group in groups.values() for target in group.targets}

    def used(self) -> list:
        """The transforms that matched a file name in :meth:`loading` (what ``from_pretrained`` records)."""
        return [t for t in self.transforms if t.was_used()]

    def saving(self, tensors: dict[str, torch.Tensor]) -> Saved:
        """How ``save_pretrained`` writes the model's tensors (module name -> meta tensor, tied ones left out),
        after loading the files :meth:`loading` read.

        The groups are formed as transformers' ``revert_weight_conversion`` forms them, and what they make is
        checked against what that function itself gives for the same meta tensors. Which of the files'
        tensors would share storage (views of one converted tensor), and how large it is, decides how
        ``save_pretrained`` shards them: it is found by converting fake tensors (no data) as it would.

        Raises:
            BaseModelError: a layout this cannot follow (it names the tensor).
        """
        if not conversion_mapping():  # transformers 4: one tensor each, renamed, its own storage
            saved_as = transformers4.saved_names(self.model, list(tensors))
            files = {saved_as[name]: tensor for name, tensor in tensors.items()}
            groups = [Group(saved_as[n], [n], [None], targets={saved_as[n]: t}) for n, t in tensors.items()]
            storage = {name: (name, tensor.numel() * tensor.element_size()) for name, tensor in files.items()}
            return Saved(files, groups, storage)
        from torch._subclasses.fake_tensor import FakeTensorMode
        from transformers.core_model_loading import (
            WeightConverter,
            apply_converters,
            apply_renamings,
            dot_natural_key,
            revert_weight_conversion,
        )

        self.model._weight_conversions = self.used()  # as from_pretrained leaves it: what save_pretrained reverts
        reversed_ = [t.reverse_transform() for t in self.model._weight_conversions[::-1]]
        renamings = [t for t in reversed_ if not isinstance(t, WeightConverter)]
        converters = [t for t in reversed_ if isinstance(t, WeightConverter)]
        by_pattern = {pattern: t for t in converters for pattern in t.source_patterns}

        def rename(name: str) -> str:
            return apply_renamings(name, renamings)

        groups: dict[str, Group] = {}
        for name in sorted(tensors, key=dot_natural_key):
            key, pattern = apply_converters(name, converters)
            if pattern is None:
                groups[rename(name)] = Group(rename(name), [name], [None], targets={rename(name): tensors[name]})
                continue
            group = groups.setdefault(key, Group(key, [], [], transform=by_pattern[pattern], rename=rename))
            group.sources.append(name)
            group.patterns.append(pattern)
        storage: dict[str, tuple[Any, int]] = {}
        with FakeTensorMode():
            for index, group in enumerate(groups.values()):
                if group.transform is None:
                    [(name, meta)] = group.targets.items()
                    storage[name] = (name, meta.numel() * meta.element_size())
                    continue
                fakes = {s: torch.empty(tensors[s].shape, dtype=tensors[s].dtype) for s in group.sources}
                made = group.convert(fakes, self.model)
                group.targets = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in made.items()}
                # a storage is known by its address while it lives: within its group (another's may reuse it)
                storage.update(
                    {n: ((index, t.untyped_storage()._cdata), t.untyped_storage().nbytes()) for n, t in made.items()}
                )
        for group in groups.values():
            if group.transform is not None:
                group.experts = _saving_experts(group, tensors, self.model)
        files = {name: tensor for group in groups.values() for name, tensor in group.targets.items()}
        expected = revert_weight_conversion(self.model, dict(tensors))
        if list(expected) != list(files) or any(expected[n].shape != files[n].shape for n in files):
            odd = next((n for n in expected if n not in files or expected[n].shape != files[n].shape), None)
            raise BaseModelError(
                f"cannot follow how transformers saves {type(self.model).__name__} (first at "
                f"{odd or next(n for n in files if n not in expected)}); convert it with --in-memory"
            )
        return Saved(files, list(groups.values()), storage)


@dataclass
class Saved:
    """What :meth:`Layout.saving` found.

    Attributes:
        files: The files' tensors (name -> meta tensor), in ``save_pretrained``'s order.
        groups: The groups that make them from the model's tensors.
        storage: File tensor -> (its storage's identity, the storage's bytes), as ``save_pretrained`` sees them.
    """

    files: dict[str, torch.Tensor]
    groups: list[Group]
    storage: dict[str, tuple[Any, int]]

    def split(self, filename_pattern: str, max_shard_size: int) -> Any:
        """The shards, as ``save_pretrained`` splits the files' tensors (tensors sharing a storage together,
        the storage counted once), by huggingface_hub's own splitter."""
        from huggingface_hub.serialization._base import split_state_dict_into_shards_factory

        storage = {id(tensor): self.storage[name] for name, tensor in self.files.items()}
        return split_state_dict_into_shards_factory(
            self.files,
            filename_pattern=filename_pattern,
            max_shard_size=max_shard_size,
            get_storage_id=lambda tensor: storage[id(tensor)][0],
            get_storage_size=lambda tensor: storage[id(tensor)][1],
        )


def _converter_for(converters: list, pattern: str) -> Any:
    return next(c for c in converters if pattern in c.source_patterns)


def _meta_convert(group: Group, tensors: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """The group's targets for meta tensors (names and shapes, nothing computed)."""
    return {name: tensor.to("meta") for name, tensor in group.convert(tensors, model).items()}


def _loading_experts(group: Group, files: dict[str, torch.Tensor], model: Any) -> int:
    """Experts of a group that stacks them (one source per expert and pattern), if the first and last
    expert on their own convert into a row of the fused target; else 0."""
    if not _keeps_experts_apart(group.transform, loading=True) or len(group.targets) != 1:
        return 0
    [fused] = group.targets.values()
    count = fused.shape[0]
    if len(group.sources) != count * len(set(group.patterns)):
        return 0
    for first in (0, count - 1):
        block = _meta_convert(group, {s: files[s] for s in group.expert_sources(slice(first, first + 1))}, model)
        if block.get(group.key) is None or block[group.key].shape != (1, *fused.shape[1:]):
            return 0
    return count


def _saving_experts(group: Group, tensors: dict[str, torch.Tensor], model: Any) -> int:
    """Experts of a group that splits one fused tensor into a tensor per expert, if converting the first and
    the last expert on their own gives exactly those experts' targets; else 0."""
    if len(group.sources) != 1 or not _keeps_experts_apart(group.transform, loading=False):
        return 0
    fused = tensors[group.sources[0]]
    count = fused.shape[0]
    for first in (0, count - 1):
        block = group.convert({group.sources[0]: fused[first : first + 1]}, model, first_expert=first)
        if not block or any(
            name not in group.targets or group.targets[name].shape != t.shape for name, t in block.items()
        ):
            return 0
    return count


def shift_expert(name: str, transform: Any, offset: int) -> str:
    """A target's name from a block of experts starting at ``offset``, as the whole group names it: the
    expert index the transform writes in place of ``*`` moved by ``offset``."""
    if offset == 0:
        return name
    for pattern in transform.target_patterns:
        head, star, tail = pattern.partition("*")
        if not star or head not in name:
            continue
        at = name.index(head) + len(head)
        digits = len(name[at:]) - len(name[at:].lstrip("0123456789"))
        if digits and name[at + digits :].startswith(tail):
            return f"{name[:at]}{int(name[at : at + digits]) + offset}{name[at + digits :]}"
    return name


def untied(state: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
    """``model``'s tensors (``state_dict(keep_vars=True)``) without the tied names ``save_pretrained`` leaves
    out, by transformers' own rule."""
    if not conversion_mapping():
        return transformers4.untied(state, model)
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    return remove_tied_weights_from_state_dict(dict(state), model)


def untie_if_diverged(model: Any) -> None:
    """Training a tied embedding apart (``modules_to_save``) unties it: say so in the config, as newer PEFTs'
    ``merge_and_unload`` does (0.17 does not: the saved model would be re-tied on load, its trained head lost).
    Decided by identity, not storage address: the streaming path's model is on the meta device."""
    config = model.config if conversion_mapping() else transformers4.tying_config(model.config)
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and inputs is not None and outputs is not None:
        if outputs.weight is not inputs.weight:
            config.tie_word_embeddings = False

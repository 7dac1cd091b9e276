"""Stage 6, save: the merged model as ``save_pretrained`` writes it, verified before it is put in place.

The model is written beside the output (``.<name>.zero2merged-partial``) in the chosen dtype, sharded with an
index, tied weights written once, with the tokenizer and generation config. Only after a reload with the
plain Auto class gives back every tensor exactly and reproduces the merged outputs is it renamed into place:
the output folder never holds a model that looks complete but is not.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from zero2merged import names
from zero2merged.errors import VerificationError
from zero2merged.modelfiles import check_complete, files_in, fresh_dir, replace_dir
from zero2merged.parity import SAVE_TOLERANCES, compare, outputs
from zero2merged.basemodel import load_base

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def partial_path(output: Path) -> Path:
    """Where the output is written before it is verified (same filesystem, so the rename is atomic)."""
    return output.with_name(f".{output.name}{names.PARTIAL_SUFFIX}")


def save(
    work_dir: Path,
    output: Path,
    *,
    auto_class: str,
    dtype: str,
    max_shard_size: str | int,
    tokenizer_sources: list[Path | str],
) -> dict:
    """Stage 6: write the merged model to ``output`` in ``dtype``; verify; move into place.

    Args:
        work_dir: Holds stage 5's ``merged/`` and ``probes.safetensors``.
        output: Final folder (absent or empty).
        auto_class: transformers Auto class name that loads the model.
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        max_shard_size: Largest shard, e.g. ``"5GB"``.
        tokenizer_sources: Folders to take the tokenizer from, first match wins.

    Returns:
        Metrics: files, bytes, and parity of the saved model with the fp32 merge.

    Raises:
        VerificationError: the reloaded model differs from what was written or from the merge.
    """
    model = load_base(auto_class, str(work_dir / names.MERGED), DTYPES[dtype])
    staged = fresh_dir(partial_path(output))
    model.save_pretrained(staged, max_shard_size=max_shard_size)
    tokenizer_from = carry_tokenizer(tokenizer_sources, staged)

    probes = load_file(work_dir / names.PROBES)
    reference = probes.pop("merged")
    probes.pop("unmerged")
    parity = _verify(staged, model, auto_class, DTYPES[dtype], probes, reference)
    parity.check(SAVE_TOLERANCES[dtype], f"the saved {dtype} model vs the fp32 merge")

    replace_dir(staged, output)
    files = files_in(output)
    return {
        "dtype": dtype,
        "files": len(files),
        "bytes": sum(f.stat().st_size for f in files),
        "tokenizer_from": tokenizer_from,
        "parity": parity.to_dict(),
    }


def carry_tokenizer(sources: list[Path | str], staged: Path) -> str | None:
    """Save the tokenizer of the first source that has one into ``staged``; returns that source."""
    from transformers import AutoTokenizer

    for source in sources:
        if any((Path(source) / name).is_file() for name in TOKENIZER_FILES):
            AutoTokenizer.from_pretrained(source).save_pretrained(staged)
            return str(source)
    return None


def _verify(staged: Path, model, auto_class: str, dtype: torch.dtype, probes: dict, reference: torch.Tensor):
    """Reload with the plain Auto class: no key missing or unexpected, every tensor identical, ties kept."""
    import transformers

    check_complete(staged, model)
    reloaded, info = getattr(transformers, auto_class).from_pretrained(staged, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(v) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise VerificationError(f"reloading {staged} with {auto_class} reported {problems or info['error_msgs']}")
    expected, got = model.state_dict(), reloaded.state_dict()
    for name, tensor in expected.items():
        if name not in got or got[name].dtype != tensor.dtype or not torch.equal(got[name], tensor):
            raise VerificationError(f"{name} did not reload from {staged} as it was written")
    _check_ties(expected, got, staged)
    return compare(outputs(reloaded.float(), probes), reference)


def _check_ties(expected: dict, got: dict, staged: Path) -> None:
    """Weights that share storage in the merged model share it after the reload too, and no others."""
    def groups(state):
        by_ptr: dict[int, set[str]] = {}
        for name, tensor in state.items():
            by_ptr.setdefault(tensor.data_ptr(), set()).add(name)
        return sorted(sorted(g) for g in by_ptr.values() if len(g) > 1)

    if groups(expected) != groups(got):
        raise VerificationError(f"tied weights changed on reload from {staged}: {groups(expected)} became {groups(got)}")

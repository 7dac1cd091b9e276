"""Stage 5, merge: PEFT's own ``merge_and_unload``, then parity of the merged model with the unmerged one.

The merge maths (W0 + s·B·A, rsLoRA's scaling, DoRA's row norms, fan_in_fan_out) stays PEFT's: nothing
here re-implements it. Both models run in fp32 on the same probe inputs; the merged one must match.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from zero2merged import names
from zero2merged.errors import VerificationError
from zero2merged.manifest import replacing
from zero2merged.modelfiles import check_complete, fresh_dir, replace_dir
from zero2merged.parity import MERGE_TOLERANCE, compare, outputs, probe_inputs


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

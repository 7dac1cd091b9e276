"""What a served model needs besides its weights: the tokenizer, the processor's files, the chat template and
the generation config, carried into the output from the run (or, where the run saved none, the base), and
the special tokens made to agree.

A merged model that never stops generating is among the most common complaints after merging: training
added or changed special tokens or a chat template (a chat format's end-of-turn token made the tokenizer's
end of sequence, say), while ``config.json`` and ``generation_config.json``, taken from the base, still name
the old ones. The tokenizer the run used is the one that knows what the model was trained to emit, so the
ids of its end-of-sequence, padding and beginning-of-sequence tokens are written into both configs where
they disagree, and each change is reported (the model card lists them). An end-of-sequence id the base's
generation config already had is kept beside the tokenizer's: generation then stops at either.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from zero2merged.core.results import Served

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
# A multimodal model's processor files, beside the tokenizer: copied as they are (an image processor needs PIL
# or torchvision to be loaded and saved again).
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
    *CHAT_TEMPLATE_FILES,
)
GENERATION_CONFIG = "generation_config.json"
SPECIAL = ("eos", "pad", "bos")


def carry_tokenizer(sources: list[Path | str], staged: Path) -> str | None:
    """Save the tokenizer of the first source that has one into ``staged``, and each processor file from the
    first source that has it (copied as it is; the tokenizer's own chat template is not written over);
    returns the tokenizer's source."""
    carried = None
    for source in sources:
        if _has_tokenizer(Path(source)):
            load_tokenizer(source).save_pretrained(staged)
            carried = str(source)
            break
    for name in PROCESSOR_FILES:
        found = next((Path(source) / name for source in sources if (Path(source) / name).is_file()), None)
        if found is not None and not (staged / name).exists():
            shutil.copyfile(found, staged / name)
    return carried


def generation_config_sources(checkpoint: Path | str) -> list[Path]:
    """Where a run's own generation config may be: its checkpoint folder, then the folder above (a Trainer's
    run folder, where ``save_model`` puts it)."""
    return [Path(checkpoint) / GENERATION_CONFIG, Path(checkpoint).parent / GENERATION_CONFIG]


def serving_files(checkpoint: Path | str) -> list[Path]:
    """The run's own serving files that exist: its tokenizer's and its generation config."""
    candidates = [Path(checkpoint) / name for name in TOKENIZER_FILES] + generation_config_sources(checkpoint)
    return [path for path in candidates if path.is_file()]


def serve(staged: Path, checkpoint: Path | str, base: Path | str) -> Served:
    """Carry the tokenizer, processor files, chat template and generation config into ``staged`` (whose
    weights and configs are written), and make the special token ids agree with the tokenizer.

    Args:
        staged: The output, being written.
        checkpoint: The run's checkpoint folder: its tokenizer, processor files and generation config (or its
            run folder's) win over the base's.
        base: The base model's folder.
    """
    sources = [checkpoint, base]
    served = Served(tokenizer_from=carry_tokenizer(sources, staged))
    served.chat_template_from = _chat_template_source(staged, served.tokenizer_from, sources)
    own = next((path for path in generation_config_sources(checkpoint) if path.is_file()), None)
    if own is not None:
        _replace(staged / GENERATION_CONFIG, own.read_bytes())
        served.generation_config_from = str(own.parent)
    elif (staged / GENERATION_CONFIG).is_file():  # save_pretrained wrote the base's
        served.generation_config_from = str(base)
    if served.tokenizer_from is not None:
        served.changed = _align(staged)
    return served


def _chat_template_source(staged: Path, tokenizer_from: str | None, sources: list[Path | str]) -> str | None:
    """The folder the output's chat template came from: the tokenizer's, when its own files hold one (in a
    template file or inside ``tokenizer_config.json``), else the first source with a template file."""
    if not _has_template(staged):
        return None
    if tokenizer_from is not None and _has_template(Path(tokenizer_from)):
        return tokenizer_from
    return next((str(s) for s in sources if any((Path(s) / n).is_file() for n in CHAT_TEMPLATE_FILES)), None)


def _has_template(folder: Path) -> bool:
    """Whether a folder's files hold a chat template (a template file, or inside the tokenizer's config)."""
    if any((folder / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _align(staged: Path) -> list[str]:
    """Write the tokenizer's special token ids into ``config.json`` and ``generation_config.json`` where they
    disagree; returns what was changed, a line each."""
    config, generation = _configs(staged)
    tokenizer = load_tokenizer(staged)
    changes = _disagreements(tokenizer, config, generation)
    for holder, key, after, _ in changes:
        setattr(holder, key, after)
    if any(holder is not generation for holder, *_ in changes):
        _rewrite(staged, config, "config.json")
    if any(holder is generation for holder, *_ in changes):
        _rewrite(staged, generation, GENERATION_CONFIG)
    return [line for *_, line in changes]


def _configs(folder: Path):
    """A model folder's config and generation config (None where it has no file)."""
    from transformers import AutoConfig, GenerationConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    generation = GenerationConfig.from_pretrained(folder) if (folder / GENERATION_CONFIG).is_file() else None
    return config, generation


def _disagreements(tokenizer, config, generation) -> list[tuple[object, str, int | list[int], str]]:
    """Each special token id set in ``config`` (its text model's) or ``generation`` that does not name the
    tokenizer's token: ``(holder, key, the id(s) to write, what changes)``. An id left unset disagrees with
    nothing (and its file stays as ``save_pretrained`` wrote it)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    found = []
    for kind in SPECIAL:
        token, wanted = getattr(tokenizer, f"{kind}_token"), getattr(tokenizer, f"{kind}_token_id")
        if wanted is None:
            continue
        key = f"{kind}_token_id"
        for holder, file in ((text, "config.json"), (generation, GENERATION_CONFIG)):
            before = getattr(holder, key, None)
            if before is None:
                continue
            after = _agreeing(kind, before, wanted, keep=holder is generation)
            if after != before:
                found.append(
                    (holder, key, after, f"{file} {key}: {before} -> {after} (the tokenizer's {kind}_token {token})")
                )
    return found


def notes(checkpoint: Path | str, base: str) -> list[str]:
    """What the run did not say about serving, or said differently from the base, for ``inspect``: no
    tokenizer or generation config saved, special tokens added or changed in training, and which of the base's
    special token ids the output will have rewritten."""
    run, base_dir = Path(checkpoint), Path(base)
    if not base_dir.is_dir():
        return []  # a hub id: nothing is fetched to inspect
    try:
        config, generation = _configs(base_dir)
    except (OSError, ValueError):
        return []  # a base that cannot be read: inspect notes that already, and convert stops on it
    found = []
    if not _has_tokenizer(run):
        found.append(
            "the run saved no tokenizer: the base model's is used"
            if _has_tokenizer(base_dir)
            else "neither the run nor the base model has a tokenizer: the output will have none"
        )
    if not any(path.is_file() for path in generation_config_sources(run)) and _generates(config):
        found.append(
            "the run saved no generation config: the base model's is used"
            if generation is not None
            else "neither the run nor the base model has a generation_config.json: generate() uses its defaults"
        )
    tokenizers = [load_tokenizer(f) for f in (run, base_dir) if _has_tokenizer(f)]
    if len(tokenizers) == 2:
        trained, original = tokenizers
        added = [t for t in trained.get_added_vocab() if t not in original.get_added_vocab()]
        if added:
            found.append(
                f"{len(added)} tokens added during training: {', '.join(added[:5])}"
                + (", ..." if len(added) > 5 else "")
            )
        for kind in SPECIAL:
            before, after = getattr(original, f"{kind}_token"), getattr(trained, f"{kind}_token")
            if after is not None and before != after:
                found.append(f"the run's tokenizer changed {kind}_token: {before} -> {after}")
    if tokenizers:
        changes = _disagreements(tokenizers[0], config, generation)
        files = sorted({line.split(" ", 1)[0] for *_, line in changes})
        if changes:
            found.append(
                f"the base's {' and '.join(files)} name other special tokens than the tokenizer "
                f"({len(changes)} ids): the output's are rewritten to agree"
            )
    return found


def load_tokenizer(folder: Path | str):
    """The tokenizer saved in ``folder``, by ``AutoTokenizer``. One saved by transformers 5 names its class
    ``TokenizersBackend``, which transformers 4 does not have: its ``tokenizer.json`` is read by the fast
    tokenizer class both share instead (and written back out as transformers 4 writes it)."""
    import transformers

    settings = Path(folder) / "tokenizer_config.json"
    named = json.loads(settings.read_text()).get("tokenizer_class") if settings.is_file() else None
    if (
        named == "TokenizersBackend"
        and not hasattr(transformers, named)
        and (Path(folder) / "tokenizer.json").is_file()
    ):
        return transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def _generates(config) -> bool:
    """Whether the model is one ``generate()`` serves, by its architectures' names."""
    return any(
        a.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in config.architectures or []
    )


def _agreeing(kind: str, before: int | list[int], wanted: int, *, keep: bool) -> int | list[int]:
    """The id (or ids) to write: ``before`` if it names the tokenizer's token; else the tokenizer's, after the
    end-of-sequence ids a list held or a generation config had (``keep``), so that generation stops at either."""
    if before == wanted or (isinstance(before, list) and wanted in before):
        return before
    if kind == "eos" and (keep or isinstance(before, list)):
        return [*(before if isinstance(before, list) else [before]), wanted]
    return wanted


def _rewrite(staged: Path, config, name: str) -> None:
    """Save a config anew: its file may be a hard link of the merge stage's, which must not change."""
    (staged / name).unlink(missing_ok=True)
    config.save_pretrained(staged)


def _replace(path: Path, data: bytes) -> None:
    """Write ``path`` as a new file (not through a hard link it may be)."""
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        os.fsync(f.fileno())

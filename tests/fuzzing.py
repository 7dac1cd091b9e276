"""A fuzzer for ``zero2merged convert``: real checkpoints, their bases and adapter configs, damaged many ways.

Each case is made from a seed alone: the seed picks a mutation family (round-robin, so any run of
``len(FAMILIES)`` consecutive seeds tries each family once), a fixture the family applies to, and the
family's parameters (the first round takes each family's headline case, later rounds vary it with a
generator seeded by the seed). The parameters are read off the cached fixture's bytes and written down as
explicit operations (truncate, write these bytes here, copy that file there), so a case is the same every
time and can be shown, rebuilt and rerun on its own (``python -m tests.fuzzing show|repro SEED``).

Every case damages a copy (the fixture cache is only ever read) and runs ``convert`` in its own process with
a time limit, measuring its peak RSS (``wait4``). It must end one of two ways:

* ``refused``: exit 2, exactly one line on stderr, ``error: ...``, no traceback, no output folder, nothing
  half-written beside it, and a work directory only if a stage finished in it;
* ``converted-ok``: exit 0 and the output byte-identical (the model card's paths aside) to the undamaged
  conversion's, which ``verify`` passed against the undamaged checkpoint: the same files give the same
  verdict, so identity is the stronger check and ``verify`` is run again only on an output that differs.

Identity is asked for whatever the damage touched: bytes the conversion never reads (Adam moments, the
16-bit copies of trained params) must leave the output as it was, and bytes it reads must be caught or leave
it as it was too. The one exception is damage that leaves a well-formed input meaning something else, that
no reader can tell from an intended one (an adapter config's ``lora_alpha`` turned from 16 into 17, a base
weight changed where the checkpoint holds no copy of it to compare with): such a case is marked
``valid_input`` and may also end ``converted-other-input``, where ``verify`` against the damaged input
itself must pass (the conversion was faithful to what it was given).

Anything else is a failure, by class: ``hang`` (killed at the time limit), ``memory`` (peak RSS beyond the
bound derived from the undamaged run's peak: :func:`memory_bound`), ``crash`` (killed by a signal),
``traceback`` (or the command line's one-line ``internal error:``, exit 3, that stands in for one), ``bad-exit``
(another exit code, or exit 2 without exactly one ``error:`` line),
``output-left-behind`` and ``silent-difference`` (exit 0 with an output that differs).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import math
import os
import pickle
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# The fixtures fuzzed: ZeRO-2 and ZeRO-3 raw-engine saves (frozen params saved), and a Trainer ZeRO-3 save
# (frozen params not saved: taken from the base) with two checkpoints, whose files can be swapped.
FIXTURES = ("engine-z2-bf16", "engine-z3-bf16", "trainer-z3-bf16")
SAVES_FROZEN = {"engine-z2-bf16": True, "engine-z3-bf16": True, "trainer-z3-bf16": False}
# A run of the same shapes and ZeRO stage, for files swapped between runs.
FOREIGN = {
    "engine-z2-bf16": "trainer-z2-bf16",
    "engine-z3-bf16": "trainer-z3-bf16",
    "trainer-z3-bf16": "engine-z3-bf16",
}

SUBSET_SEEDS = range(26)  # make test: every family's headline case (seeds 0-25 take each family once)
FULL_SEEDS = range(312)  # make fuzz: twelve rounds of every family

OUTCOMES_OK = ("refused", "converted-ok", "converted-other-input")
FAILURES = ("traceback", "hang", "memory", "crash", "silent-difference", "bad-exit", "output-left-behind")

MODEL_CARD = "README.md"  # names the paths it was made from: compared with them replaced


# --- cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One damaged input: what a seed makes.

    Attributes:
        seed: The seed it was made from.
        fixture: The fixture damaged.
        target: The kind of file damaged (``optim``, ``model``, ``base-safetensors``, ``adapter-json``,
            ``base-config-json``, ``latest``, ``files``).
        mutation: The family's name.
        summary: What was done, in words (file, place, bytes).
        ops: The operations that do it, on a copy of the fixture (see :func:`apply`).
        valid_input: The damage leaves a well-formed input that means something else (see the module's doc).
    """

    seed: int
    fixture: str
    target: str
    mutation: str
    summary: str
    ops: tuple = ()
    valid_input: bool = False

    def describe(self) -> str:
        other = " [valid input, other meaning]" if self.valid_input else ""
        return f"seed {self.seed}: {self.fixture} {self.target} {self.mutation}: {self.summary}{other}"


def _checkpoint_rel(fixture: str) -> str:
    """The folder holding ``latest``, relative to the fixture's root (and to a workspace's)."""
    return "run/checkpoint-6" if fixture.startswith("trainer") else "run"


def _tag_rel(fixture: str) -> str:
    return f"{_checkpoint_rel(fixture)}/global_step6"


class Sources:
    """The cached fixtures, read only: what cases are planned from and workspaces copied from."""

    def __init__(self):
        self._built = {}

    def fixture(self, name: str):
        if name not in self._built:
            from fixtures import build_fixture

            self._built[name] = build_fixture(name)
        return self._built[name]

    def root(self, name: str) -> Path:
        return self.fixture(name).root

    def read(self, name: str, rel: str) -> bytes:
        return (self.root(name) / rel).read_bytes()

    def rank_files(self, name: str, kind: str, tag_rel: str | None = None) -> list[str]:
        """Relative paths of a tag's rank files of one kind, by rank."""
        tag_rel = tag_rel or _tag_rel(name)
        pattern = "*optim_states.pt" if kind == "optim" else "*model_states.pt"
        files = sorted((self.root(name) / tag_rel).glob(pattern), key=lambda p: _rank(p.name))
        return [f"{tag_rel}/{p.name}" for p in files]


def _rank(name: str) -> int:
    found = re.search(r"zero_pp_rank_(\d+)_", name)
    return int(found.group(1)) if found else 0


@dataclass
class Ctx:
    """What a family's planner is handed."""

    seed: int
    round: int
    rng: random.Random
    fixture: str
    sources: Sources

    def pick(self, options: list):
        """The headline option in the first round, then any, as the seed says."""
        return options[0] if self.round == 0 else self.rng.choice(options)

    def read(self, rel: str) -> bytes:
        return self.sources.read(self.fixture, rel)


@dataclass(frozen=True)
class Family:
    name: str
    target: str
    fixtures: tuple[str, ...]
    plan: Callable[[Ctx], tuple[str, tuple, bool]]  # -> summary, ops, valid_input


def plan(seed: int, sources: Sources) -> Case:
    """The case a seed makes (deterministic: the same seed, the same fixtures -> the same case)."""
    family = FAMILIES[seed % len(FAMILIES)]
    round_ = seed // len(FAMILIES)
    fixture = family.fixtures[(round_ + seed) % len(family.fixtures)]
    ctx = Ctx(seed, round_, random.Random(f"zero2merged-fuzz-{seed}"), fixture, sources)
    summary, ops, valid_input = family.plan(ctx)
    return Case(seed, fixture, family.target, family.name, summary, tuple(ops), valid_input)


# --- operations on a workspace -------------------------------------------------------------------------


def prepare_workspace(sources: Sources, fixture: str, dest: Path) -> Path:
    """A copy of the fixture's run folder and base under ``dest`` (``dest/run``, ``dest/base``)."""
    root = sources.root(fixture)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(root / "run", dest / "run")
    shutil.copytree(root / "base", dest / "base")
    return dest


def apply(case: Case, workspace: Path, sources: Sources) -> None:
    """Carry out a case's operations on a workspace (a copy: never the fixture cache)."""
    for op in case.ops:
        kind, args = op[0], op[1:]
        if kind == "write":  # (rel, offset, bytes)
            rel, offset, data = args
            with open(workspace / rel, "r+b") as f:
                f.seek(offset)
                f.write(data)
        elif kind == "truncate":  # (rel, size)
            os.truncate(workspace / args[0], args[1])
        elif kind == "replace":  # (rel, bytes)
            (workspace / args[0]).write_bytes(args[1])
        elif kind == "remove":  # (rel,)
            (workspace / args[0]).unlink()
        elif kind == "swap":  # (rel a, rel b)
            a, b = workspace / args[0], workspace / args[1]
            data = a.read_bytes()
            a.write_bytes(b.read_bytes())
            b.write_bytes(data)
        elif kind == "copy":  # (rel source, rel destination): within the workspace
            shutil.copyfile(workspace / args[0], workspace / args[1])
        elif kind == "copy-from":  # (fixture, rel source, rel destination): from another fixture
            shutil.copyfile(sources.root(args[0]) / args[1], workspace / args[2])
        else:
            raise ValueError(f"unknown operation {kind}")


# --- zip archives (DeepSpeed's .pt rank files, as torch.save writes them) ------------------------------


@dataclass
class ZipRecord:
    name: str
    header: int  # local header offset
    data: int  # data offset
    size: int
    end: int  # where the next record (or the central directory) starts: after the data descriptor
    entry: int  # its central directory entry's offset
    entry_end: int


@dataclass
class ZipMap:
    records: list[ZipRecord]
    directory: int
    zip64_end: int | None
    locator: int | None
    end: int
    size: int

    def record(self, suffix: str) -> ZipRecord:
        return next(r for r in self.records if r.name.endswith(suffix))


def parse_zip(raw: bytes) -> ZipMap:
    """Where each part of a stored (uncompressed) zip archive lies."""
    infos = zipfile.ZipFile(io.BytesIO(raw)).infolist()
    end = raw.rindex(b"PK\x05\x06")
    locator = raw.rfind(b"PK\x06\x07", 0, end)
    zip64_end = struct.unpack_from("<Q", raw, locator + 8)[0] if locator >= 0 else None
    directory = (
        struct.unpack_from("<Q", raw, zip64_end + 48)[0]
        if zip64_end is not None
        else struct.unpack_from("<I", raw, end + 16)[0]
    )
    headers = sorted(i.header_offset for i in infos) + [directory]
    entries, pos = [], directory
    while raw[pos : pos + 4] == b"PK\x01\x02":
        name_len, extra_len, comment_len = struct.unpack_from("<HHH", raw, pos + 28)
        entries.append((pos, pos + 46 + name_len + extra_len + comment_len))
        pos = entries[-1][1]
    records = []
    for info, (entry, entry_end) in zip(infos, entries, strict=True):
        name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
        data = info.header_offset + 30 + name_len + extra_len
        following = headers[headers.index(info.header_offset) + 1]
        records.append(ZipRecord(info.filename, info.header_offset, data, info.file_size, following, entry, entry_end))
    return ZipMap(records, directory, zip64_end, locator if locator >= 0 else None, end, len(raw))


def _end_records(raw: bytes, zmap: ZipMap, count: int, cd_start: int, cd_size: int, out: bytearray) -> None:
    """Append the zip64 end record, its locator and the end record, patched for a new directory."""
    if zmap.zip64_end is not None:
        z64 = bytearray(raw[zmap.zip64_end : zmap.locator])
        struct.pack_into("<QQQQ", z64, 24, count, count, cd_size, cd_start)
        loc = bytearray(raw[zmap.locator : zmap.end])
        struct.pack_into("<Q", loc, 8, len(out))
        out += z64 + loc
    eocd = bytearray(raw[zmap.end :])
    struct.pack_into("<HHII", eocd, 8, count, count, cd_size, min(cd_start, 0xFFFFFFFF))
    out += eocd


def drop_entry(raw: bytes, index: int) -> bytes:
    """The archive with one record's central directory entry removed (its bytes stay, unlisted)."""
    zmap = parse_zip(raw)
    out = bytearray(raw[: zmap.directory])
    for i, record in enumerate(zmap.records):
        if i != index:
            out += raw[record.entry : record.entry_end]
    _end_records(raw, zmap, len(zmap.records) - 1, zmap.directory, len(out) - zmap.directory, out)
    return bytes(out)


def relayout(raw: bytes, drop: int | None = None) -> bytes:
    """The archive rebuilt as torch.save lays it out (each record's data 64-byte aligned by padding in its
    local header's extra field), without record ``drop``. ``relayout(raw)`` gives ``raw`` back."""
    zmap = parse_zip(raw)
    out, offsets = bytearray(), {}
    for i, record in enumerate(zmap.records):
        if i == drop:
            continue
        name_len = struct.unpack_from("<H", raw, record.header + 26)[0]
        name = raw[record.header + 30 : record.header + 30 + name_len]
        pad = -(len(out) + 30 + name_len) % 64
        pad += 64 if 0 < pad < 4 else 0
        extra = b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4) if pad else b""
        header = bytearray(raw[record.header : record.header + 30])
        struct.pack_into("<H", header, 28, len(extra))
        offsets[i] = len(out)
        out += header + name + extra + raw[record.data : record.end]
    cd_start = len(out)
    for i, record in enumerate(zmap.records):
        if i != drop:
            entry = bytearray(raw[record.entry : record.entry_end])
            struct.pack_into("<I", entry, 42, offsets[i])
            out += entry
    _end_records(raw, zmap, len(offsets), cd_start, len(out) - cd_start, out)
    return bytes(out)


# Stand-ins for what a rank file's pickle names: enough to see which tensor each storage record holds,
# without torch and without running anything the pickle names.
class _Obj:
    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


@dataclass
class _StorageType:
    name: str


@dataclass
class _Storage:
    key: str
    dtype: str


@dataclass
class _TensorRef:
    key: str
    dtype: str
    shape: tuple


class _MapUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, *rest: _TensorRef(storage.key, storage.dtype, tuple(size))
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return lambda data, *rest: data
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return lambda func, new_type, args, state: func(*args)
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return type(name, (_Obj,), {})

    def persistent_load(self, pid):
        return _Storage(str(pid[2]), pid[1].name if isinstance(pid[1], _StorageType) else str(pid[1]))


def storage_roles(raw: bytes) -> dict[str, list[str]]:
    """Storage record key -> where in the saved object its tensors are (``optimizer_state_dict.…``)."""
    archive = zipfile.ZipFile(io.BytesIO(raw))
    pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
    roles: dict[str, list[str]] = {}

    def walk(obj, path):
        if isinstance(obj, _TensorRef):
            roles.setdefault(obj.key, []).append(f"{path} {obj.dtype.removesuffix('Storage')}{list(obj.shape)}")
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                walk(value, f"{path}[{i}]")
        elif isinstance(obj, _Obj):
            walk(getattr(obj, "state", None), path)
            walk(getattr(obj, "args", ()), path)

    walk(_MapUnpickler(io.BytesIO(archive.read(pkl))).load(), "")
    return roles


def _is_master(role: str) -> bool:
    return "single_partition_of_fp32_groups" in role or "fp32_flat_groups" in role


def _tensor_records(raw: bytes, keep: Callable[[list[str]], bool]) -> list[tuple[ZipRecord, list[str]]]:
    """The non-empty tensor records of an archive whose roles ``keep`` accepts, with their roles."""
    zmap, roles = parse_zip(raw), storage_roles(raw)
    found = []
    for record in zmap.records:
        key = record.name.rsplit("/data/", 1)[-1] if "/data/" in record.name else None
        if key is not None and record.size and keep(roles.get(key, [])):
            found.append((record, roles.get(key, [])))
    return found


def _flip(ctx: Ctx, rel: str, raw: bytes, offset: int, what: str) -> tuple[str, tuple]:
    """Xor one byte at ``offset`` with a mask the seed picks (0xFF in the first round)."""
    # A bit flipped (what bad memory or a bad disk does) or a byte garbled, as the seed says.
    mask = 0xFF if ctx.round == 0 else ctx.rng.choice([1 << ctx.rng.randrange(8), ctx.rng.randrange(1, 256)])
    new = bytes([raw[offset] ^ mask])
    what = what or f"in {raw[max(0, offset - 12) : offset + 12]!r}"
    return f"{rel}: byte {offset} ({what}) {raw[offset]:#04x} -> {new[0]:#04x}", (("write", rel, offset, new),)


def _short(rel: str) -> str:
    return rel.rsplit("/", 1)[-1]


def _rec(name: str) -> str:
    """A record's name without the archive's folder: ``data/3``, ``data.pkl``."""
    return name.split("/", 1)[-1]


# --- families: rank files ------------------------------------------------------------------------------

ZERO_FIXTURES = FIXTURES


def _rank_file(ctx: Ctx, kinds=("optim", "model")) -> str:
    """A rank file: rank 1's optimizer file in the first round (the issue's example), then any."""
    files = [f for kind in kinds for f in reversed(ctx.sources.rank_files(ctx.fixture, kind))]
    return ctx.pick(files)


def plan_flip_master(ctx: Ctx):
    rel = ctx.pick(list(reversed(ctx.sources.rank_files(ctx.fixture, "optim"))))
    raw = ctx.read(rel)
    record, roles = ctx.pick(_tensor_records(raw, lambda roles: any(_is_master(r) for r in roles)))
    offset = record.data + (record.size // 2 if ctx.round == 0 else ctx.rng.randrange(record.size))
    summary, ops = _flip(ctx, rel, raw, offset, f"inside {_rec(record.name)}: {roles[0]}, read")
    return summary, ops, False


def plan_flip_moment(ctx: Ctx):
    rel = ctx.pick(list(reversed(ctx.sources.rank_files(ctx.fixture, "optim"))))
    raw = ctx.read(rel)
    record, roles = ctx.pick(_tensor_records(raw, lambda roles: any("exp_avg" in r for r in roles)))
    offset = record.data + (record.size // 2 if ctx.round == 0 else ctx.rng.randrange(record.size))
    summary, ops = _flip(ctx, rel, raw, offset, f"inside {_rec(record.name)}: {roles[0]}, never read")
    return summary, ops, False


def plan_flip_model_tensor(ctx: Ctx):
    rel = ctx.pick(ctx.sources.rank_files(ctx.fixture, "model"))
    raw = ctx.read(rel)
    record, roles = ctx.pick(_tensor_records(raw, lambda roles: bool(roles)))
    offset = record.data + (record.size // 2 if ctx.round == 0 else ctx.rng.randrange(record.size))
    read = "read" if any("frozen_param_fragments" in r for r in roles) else "not read"
    summary, ops = _flip(ctx, rel, raw, offset, f"inside {_rec(record.name)}: {roles[0]}, {read}")
    return summary, ops, False


def plan_flip_pickle(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    record = parse_zip(raw).record("/data.pkl")
    offset = record.data + (record.size // 2 if ctx.round == 0 else ctx.rng.randrange(record.size))
    summary, ops = _flip(ctx, rel, raw, offset, f"inside data.pkl at {offset - record.data} of {record.size}")
    return summary, ops, False


LOCAL_FIELDS = [
    (0, "signature"),
    (4, "version"),
    (6, "flags"),
    (8, "method"),
    (14, "crc"),
    (18, "size"),
    (26, "name len"),
]


def plan_flip_zip_header(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    records = parse_zip(raw).records
    record = ctx.pick([r for r in records if "/data/" in r.name] + records)
    if ctx.round == 0 or ctx.rng.random() < 0.5:
        at, what = ctx.pick(LOCAL_FIELDS)
        what = f"{_rec(record.name)}'s local header {what}"
    else:
        at = ctx.rng.randrange(record.data - record.header)
        what = f"{_rec(record.name)}'s local header, byte {at} (name or extra field)" if at >= 30 else "header"
    summary, ops = _flip(ctx, rel, raw, record.header + at, what)
    return summary, ops, False


def plan_flip_directory(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    zmap = parse_zip(raw)
    places = [(zmap.record("/data.pkl").entry + 42, "data.pkl's central directory entry: local header offset")]
    for record in zmap.records:
        places += [(record.entry + o, f"{_rec(record.name)}'s directory entry byte {o}") for o in (0, 10, 16, 24, 28)]
    if zmap.zip64_end is not None:
        places += [(zmap.zip64_end + o, f"zip64 end record byte {o}") for o in (0, 24, 40, 48)]
        places += [(zmap.locator + o, f"zip64 locator byte {o}") for o in (0, 8)]
    places += [(zmap.end + o, f"end record byte {o}") for o in (0, 8, 12, 16)]
    if ctx.round == 0:
        offset, what = places[0]
    elif ctx.rng.random() < 0.5:
        offset, what = ctx.rng.choice(places)
    else:
        offset = ctx.rng.randrange(zmap.directory, zmap.size)
        what = "central directory / end records"
    summary, ops = _flip(ctx, rel, raw, offset, what)
    return summary, ops, False


def plan_truncate_rank(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    zmap = parse_zip(raw)
    last = [r for r in zmap.records if "/data/" in r.name and r.size][-1]
    points = [(last.data + last.size // 2, f"in the middle of {_rec(last.name)}'s data")]
    points += [(0, "empty"), (1, "1 byte"), (29, "inside the first local header"), (zmap.directory, "no directory")]
    for record in zmap.records:
        points += [
            (record.header, f"at {_rec(record.name)}'s local header"),
            (record.data, f"at {_rec(record.name)}'s data"),
            (record.data + record.size, f"at {_rec(record.name)}'s data descriptor"),
        ]
    points += [(zmap.directory + 20, "inside the central directory"), (zmap.end, "before the end record")]
    points += [(zmap.size - 1, "last byte cut")]
    if ctx.round > 0 and ctx.rng.random() < 0.3:
        size = ctx.rng.randrange(zmap.size)
        where = "at a random point"
    else:
        size, where = ctx.pick(points)
    return f"{rel}: truncated to {size} of {zmap.size} bytes ({where})", (("truncate", rel, size),), False


def plan_zero_block(ctx: Ctx):
    """A 4 KiB block zeroed (a lost block, a hole a crash left), or the file from a block on."""
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    blocks = math.ceil(len(raw) / 4096)
    block = blocks // 2 if ctx.round == 0 else ctx.rng.randrange(blocks)
    to_end = ctx.round > 0 and ctx.rng.random() < 0.3
    start, stop = block * 4096, len(raw) if to_end else min(len(raw), block * 4096 + 4096)
    what = "to the end of the file" if to_end else f"block {block}"
    return f"{rel}: bytes {start}..{stop} zeroed ({what})", (("write", rel, start, bytes(stop - start)),), False


def plan_drop_record(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    records = parse_zip(raw).records
    names = [r.name for r in records]
    index = names.index(ctx.pick([n for n in names if "/data/" in n] + names))
    return (
        f"{rel}: {_rec(names[index])}'s central directory entry removed (its bytes stay, unlisted)",
        (("replace", rel, drop_entry(raw, index)),),
        False,
    )


def plan_cut_record(ctx: Ctx):
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    names = [r.name for r in parse_zip(raw).records]
    index = names.index(ctx.pick([n for n in names if "/data/" in n] + names))
    return (
        f"{rel}: record {names[index].split('/', 1)[1]} cut out, the archive re-laid out around it",
        (("replace", rel, relayout(raw, drop=index)),),
        False,
    )


def _size_values(width: int, original: int) -> list[tuple[int, str]]:
    top = (1 << (8 * width)) - 1
    values = [(top, "all ones (-1)"), (1 << (8 * width - 1), "sign bit set (negative)"), (0, "zero")]
    values += [((1 << (8 * width - 1)) - 1, "largest positive"), (original + 1 & top, "+1"), (original - 1 & top, "-1")]
    if width == 8:
        values.insert(1, (1 << 60, "2^60"))
    return values


def plan_size_field(ctx: Ctx):
    """Huge, negative, zero or off-by-one sizes, lengths, offsets and counts in the zip's headers."""
    rel = _rank_file(ctx)
    raw = ctx.read(rel)
    zmap = parse_zip(raw)
    tensor = ctx.pick([r for r in zmap.records if "/data/" in r.name and r.size])
    fields = [
        (tensor.entry + 24, 4, f"{_rec(tensor.name)}'s directory entry: uncompressed size"),
        (tensor.entry + 20, 4, f"{_rec(tensor.name)}'s directory entry: compressed size"),
        (tensor.entry + 42, 4, f"{_rec(tensor.name)}'s directory entry: local header offset"),
        (tensor.entry + 28, 2, f"{_rec(tensor.name)}'s directory entry: name length"),
        (tensor.header + 26, 2, f"{_rec(tensor.name)}'s local header: name length"),
        (tensor.header + 28, 2, f"{_rec(tensor.name)}'s local header: extra field length"),
        (tensor.header + 22, 4, f"{_rec(tensor.name)}'s local header: uncompressed size"),
        (tensor.data + tensor.size + 12, 4, f"{_rec(tensor.name)}'s data descriptor: uncompressed size"),
        (zmap.record("/data.pkl").entry + 24, 4, "data.pkl's directory entry: uncompressed size"),
        (zmap.end + 10, 2, "end record: entry count"),
        (zmap.end + 12, 4, "end record: directory size"),
        (zmap.end + 16, 4, "end record: directory offset"),
    ]
    if zmap.zip64_end is not None:
        fields += [
            (zmap.zip64_end + 32, 8, "zip64 end record: entry count"),
            (zmap.zip64_end + 40, 8, "zip64 end record: directory size"),
            (zmap.zip64_end + 48, 8, "zip64 end record: directory offset"),
            (zmap.locator + 8, 8, "zip64 locator: end record offset"),
        ]
    at, width, what = ctx.pick(fields)
    original = int.from_bytes(raw[at : at + width], "little")
    value, how = ctx.pick(_size_values(width, original))
    new = value.to_bytes(width, "little")
    return f"{rel}: {what} {original} -> {value} ({how})", (("write", rel, at, new),), False


def _swap_kind(ctx: Ctx) -> str:
    """Optimizer files; or model-state files, where there is one per rank (ZeRO-3)."""
    return ctx.pick(["optim", "model"] if "-z3-" in ctx.fixture else ["optim"])


def plan_swap_ranks(ctx: Ctx):
    kind = _swap_kind(ctx)
    a, b = ctx.sources.rank_files(ctx.fixture, kind)[:2]
    return f"{_short(a)} and {_short(b)} swapped (contents; names kept)", (("swap", a, b),), False


def plan_duplicate_rank(ctx: Ctx):
    kind = _swap_kind(ctx)
    files = ctx.sources.rank_files(ctx.fixture, kind)
    src, dst = (files[0], files[1]) if ctx.round == 0 or ctx.rng.random() < 0.5 else (files[1], files[0])
    return f"{_short(dst)} replaced by a copy of {_short(src)}", (("copy", src, dst),), False


def plan_swap_tags(ctx: Ctx):
    """Files of the Trainer's earlier save (checkpoint-3/global_step3) in the last one's tag folder."""
    old_tag = "run/checkpoint-3/global_step3"
    choices = [
        ("optim rank 1", ctx.sources.rank_files(ctx.fixture, "optim")[1:2]),
        ("optim rank 0", ctx.sources.rank_files(ctx.fixture, "optim")[:1]),
        ("model rank 0", ctx.sources.rank_files(ctx.fixture, "model")[:1]),
        (
            "every rank file",
            ctx.sources.rank_files(ctx.fixture, "optim") + ctx.sources.rank_files(ctx.fixture, "model"),
        ),
    ]
    what, files = ctx.pick(choices)
    ops = tuple(("copy", f"{old_tag}/{_short(f)}", f) for f in files)
    return f"{what} of global_step6 replaced by global_step3's ({len(ops)} files)", ops, False


def plan_foreign_run(ctx: Ctx):
    """A rank file from another run of the same shapes and ZeRO stage, under the same name."""
    other = FOREIGN[ctx.fixture]
    mine = ctx.sources.rank_files(ctx.fixture, "optim")
    theirs = ctx.sources.rank_files(other, "optim")
    rank = 1 if ctx.round == 0 else ctx.rng.randrange(len(mine))
    return (
        f"{_short(mine[rank])} replaced by {other}'s",
        (("copy-from", other, theirs[rank], mine[rank]),),
        False,
    )


# --- families: the base's safetensors -------------------------------------------------------------------

BASE_WEIGHTS = "base/model.safetensors"


def _st_parts(raw: bytes) -> tuple[int, dict, bytes]:
    (length,) = struct.unpack_from("<Q", raw, 0)
    return length, json.loads(raw[8 : 8 + length]), raw[8 + length :]


def _st_bytes(header_blob: bytes, data: bytes) -> bytes:
    header_blob += b" " * (-(8 + len(header_blob)) % 8)
    return struct.pack("<Q", len(header_blob)) + header_blob + data


def plan_st_header_length(ctx: Ctx):
    raw = ctx.read(BASE_WEIGHTS)
    length = struct.unpack_from("<Q", raw, 0)[0]
    values = [
        (1 << 60, "2^60"),
        ((1 << 64) - 1, "all ones (-1 as a signed length)"),
        (1 << 63, "sign bit set (negative)"),
        (1 << 40, "1 TiB"),
        (0, "zero"),
        (length - 1, "one short"),
        (length + 1, "one over"),
        (len(raw) - 8, "the whole file"),
        (len(raw), "past the end"),
        ((1 << 32) + length, "2^32 + the real length"),
    ]
    value, how = ctx.pick(values)
    return (
        f"{BASE_WEIGHTS}: header length {length} -> {value} ({how})",
        (("write", BASE_WEIGHTS, 0, struct.pack("<Q", value)),),
        False,
    )


def plan_st_flip_header(ctx: Ctx):
    raw = ctx.read(BASE_WEIGHTS)
    length = struct.unpack_from("<Q", raw, 0)[0]
    blob = raw[8 : 8 + length]
    offset = 8 + (blob.index(b"BF16") + 1 if ctx.round == 0 else ctx.rng.randrange(length))
    summary, ops = _flip(ctx, BASE_WEIGHTS, raw, offset, "in the JSON header")
    return summary, ops, False


def _st_edits(fixture: str, header: dict) -> list[tuple[str, Callable[[dict], object], bool]]:
    """Edits of a parsed safetensors header: (what, edit returning the new header or raw bytes, valid)."""
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"][0])
    rect = next(n for n in names if len(header[n]["shape"]) == 2 and header[n]["shape"][0] != header[n]["shape"][1])
    first, second = names[0], names[1]
    same = next(
        (a, b)
        for a in names
        for b in names
        if a < b and header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    )

    def change(name, key, value):
        def edit(h):
            h[name][key] = value(h[name][key]) if callable(value) else value
            return h

        return edit

    def overlap(h):
        h[same[1]]["data_offsets"] = list(h[same[0]]["data_offsets"])
        return h

    def removed(h):
        del h[second]
        return h

    def renamed(h):
        h[second.replace("weight", "weigth")] = h.pop(second)
        return h

    def extra(h):
        h["model.layers.99.mlp.up_proj.weight"] = dict(h[first])
        return h

    saves = SAVES_FROZEN[fixture]
    return [
        ("an entry's shape made huge ([2^31, 2^31])", change(rect, "shape", [1 << 31, 1 << 31]), False),
        ("an entry's dtype BF16 -> F32 (twice the bytes its offsets hold)", change(rect, "dtype", "F32"), False),
        ("an entry's dtype BF16 -> F16 (same size, other values)", change(rect, "dtype", "F16"), not saves),
        ("an entry's dtype unknown (Q8)", change(rect, "dtype", "Q8"), False),
        ("an entry's shape transposed (same size)", change(rect, "shape", lambda s: s[::-1]), False),
        ("an entry's shape negative", change(rect, "shape", lambda s: [-s[0], *s[1:]]), False),
        ("two entries on the same bytes", overlap, False),
        (
            "an entry's offsets past the end of the file",
            change(rect, "data_offsets", lambda o: [o[0], o[1] + 10**6]),
            False,
        ),
        ("an entry's offsets reversed", change(rect, "data_offsets", lambda o: o[::-1]), False),
        ("an entry's offsets negative", change(rect, "data_offsets", lambda o: [o[0] - 10**9, o[1]]), False),
        ("an entry's end offset 2^62", change(rect, "data_offsets", lambda o: [o[0], 1 << 62]), False),
        ("an entry's offsets fractional", change(rect, "data_offsets", lambda o: [o[0] + 0.5, o[1]]), False),
        ("an entry removed (its bytes left as a hole)", removed, False),
        ("an entry renamed", renamed, False),
        ("an entry added for a tensor the model does not have", extra, False),
        ("the header a JSON list", lambda h: [h], False),
        ("metadata values not strings", lambda h: {**h, "__metadata__": {"format": 5}}, False),
        ("metadata nested 100000 deep", lambda h: b'{"__metadata__":' + b"[" * 100000 + b"]" * 100000 + b"}", False),
        ("non-UTF-8 bytes in a name", lambda h: json.dumps(h).encode().replace(b"model.", b"m\xffdel.", 1), False),
    ]


def plan_st_edit_header(ctx: Ctx):
    raw = ctx.read(BASE_WEIGHTS)
    _, header, data = _st_parts(raw)
    what, edit, valid = ctx.pick(_st_edits(ctx.fixture, json.loads(json.dumps(header))))
    edited = edit(json.loads(json.dumps(header)))
    blob = edited if isinstance(edited, bytes) else json.dumps(edited, separators=(",", ":")).encode()
    return f"{BASE_WEIGHTS}: header rewritten: {what}", (("replace", BASE_WEIGHTS, _st_bytes(blob, data)),), valid


def plan_st_flip_data(ctx: Ctx):
    raw = ctx.read(BASE_WEIGHTS)
    length, header, _ = _st_parts(raw)
    names = sorted(n for n in header if n != "__metadata__")
    name = ctx.pick([n for n in names if "down_proj" in n] + names)
    begin, end = header[name]["data_offsets"]
    offset = 8 + length + (begin + (end - begin) // 2 if ctx.round == 0 else ctx.rng.randrange(begin, end))
    summary, ops = _flip(ctx, BASE_WEIGHTS, raw, offset, f"inside {name}'s data")
    # Where the checkpoint saved the frozen params, they are compared with the base's: a changed base
    # weight is caught. Where it did not, the base is all there is: another base, as far as anyone can tell.
    return summary, ops, not SAVES_FROZEN[ctx.fixture]


def plan_st_truncate(ctx: Ctx):
    raw = ctx.read(BASE_WEIGHTS)
    length = struct.unpack_from("<Q", raw, 0)[0]
    points = [
        (8 + length + (len(raw) - 8 - length) // 2, "in the middle of the data"),
        (0, "empty"),
        (4, "inside the header length"),
        (8, "after the header length"),
        (8 + length // 2, "in the middle of the header"),
        (8 + length, "after the header: no data"),
        (len(raw) - 1, "last byte cut"),
    ]
    if ctx.round > 0 and ctx.rng.random() < 0.3:
        size, where = ctx.rng.randrange(len(raw)), "at a random point"
    else:
        size, where = ctx.pick(points)
    return (
        f"{BASE_WEIGHTS}: truncated to {size} of {len(raw)} bytes ({where})",
        (("truncate", BASE_WEIGHTS, size),),
        False,
    )


def plan_sharded_index(ctx: Ctx):
    """The base split into two shards with an index (as save_pretrained writes a large model), the index
    then damaged; the undamaged split is the control (it must convert to the same bytes)."""
    raw = ctx.read(BASE_WEIGHTS)
    length, header, data = _st_parts(raw)
    metadata = header.pop("__metadata__", None)
    names = sorted(header)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    ops: list[tuple] = [("remove", BASE_WEIGHTS)]
    weight_map = {}
    for file, part in zip(files, halves, strict=True):
        sub, pos, chunks = {"__metadata__": metadata} if metadata else {}, 0, []
        for name in sorted(part, key=lambda n: header[n]["data_offsets"][0]):
            begin, end = header[name]["data_offsets"]
            sub[name] = {**header[name], "data_offsets": [pos, pos + end - begin]}
            chunks.append(data[begin:end])
            pos += end - begin
            weight_map[name] = file
        ops.append(
            ("replace", f"base/{file}", _st_bytes(json.dumps(sub, separators=(",", ":")).encode(), b"".join(chunks)))
        )
    total = len(data)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    victim = halves[1][0]
    variants = [
        ("a weight mapped to a file outside the base folder", {"weight_map": {**weight_map, victim: "../run/latest"}}),
        ("none (the control)", {}),
        ("a weight mapped to an absolute path", {"weight_map": {**weight_map, victim: "/etc/hostname"}}),
        ("a weight mapped to the other shard", {"weight_map": {**weight_map, victim: files[0]}}),
        ("a weight missing from the map", {"weight_map": {k: v for k, v in weight_map.items() if k != victim}}),
        (
            "a weight the shards do not hold",
            {"weight_map": {**weight_map, "model.layers.9.mlp.up_proj.weight": files[0]}},
        ),
        ("the map a list", {"weight_map": list(weight_map.items())}),
        ("total_size 2^70", {"metadata": {"total_size": 1 << 70}}),
        ("a shard missing", "missing-shard"),
        ("the index not JSON", "not-json"),
    ]
    what, change = ctx.pick(variants)
    if change == "missing-shard":
        ops = [op for op in ops if op[1] != f"base/{files[1]}"]
        blob = json.dumps(index, indent=2).encode()
    elif change == "not-json":
        blob = json.dumps(index, indent=2).encode()[:-40]
    else:
        blob = json.dumps({**index, **change}, indent=2).encode()
    ops.append(("replace", "base/model.safetensors.index.json", blob))
    return f"base split into 2 shards + index; index damage: {what}", tuple(ops), False


# --- families: JSON (adapter config, base config) and `latest` -------------------------------------------

JSON_FILES = {"adapter-json": "adapter_config.json", "base-config-json": "base/config.json"}


def _json_rel(ctx: Ctx, target: str) -> str:
    return f"{_checkpoint_rel(ctx.fixture)}/adapter_config.json" if target == "adapter-json" else "base/config.json"


def _same_keys(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_keys(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_keys(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) or {type(a), type(b)} <= {int, float}


def _json_meaning(original: bytes, damaged: bytes, target: str) -> tuple[str, bool]:
    """How a changed JSON file reads: (in words, whether it is a well-formed input with another meaning:
    the same keys, values of the same types, only some values changed; for a model's config.json also a
    key renamed, as transformers takes any key: the old one then has its default, the new one is kept)."""
    try:
        before, after = json.loads(original), json.loads(damaged)
    except (ValueError, RecursionError) as e:
        return f"no longer JSON ({type(e).__name__})", False
    if after == before:
        return "parses to the same values", False
    if _same_keys(before, after):
        changed = [k for k in before if isinstance(before, dict) and before[k] != after.get(k)]
        return f"still JSON, value of {changed} changed", True
    if target == "base-config-json" and isinstance(before, dict) and isinstance(after, dict):
        common = before.keys() & after.keys()
        if all(_same_keys(before[k], after[k]) for k in common) and len(common) == len(before) - 1:
            renamed = sorted(before.keys() - after.keys()) + sorted(after.keys() - before.keys())
            return f"still JSON, key {renamed[0]!r} renamed to {renamed[-1]!r}", True
    return "still JSON, keys or types changed", False


def _plan_json_flip(ctx: Ctx, target: str):
    rel = _json_rel(ctx, target)
    raw = ctx.read(rel)
    offset = raw.index(b"{") if ctx.round == 0 else ctx.rng.randrange(len(raw))
    summary, ops = _flip(ctx, rel, raw, offset, "")
    damaged = bytearray(raw)
    damaged[offset] = ops[0][3][0]
    meaning, valid = _json_meaning(raw, bytes(damaged), target)
    return f"{summary}: {meaning}", ops, valid


def plan_json_flip(ctx: Ctx):
    return _plan_json_flip(ctx, ctx.pick(list(JSON_FILES)))


def plan_json_truncate(ctx: Ctx):
    target = ctx.pick(list(JSON_FILES))
    rel = _json_rel(ctx, target)
    raw = ctx.read(rel)
    size = len(raw) // 2 if ctx.round == 0 else ctx.pick([0, 1, len(raw) - 2, ctx.rng.randrange(len(raw))])
    return f"{rel}: truncated to {size} of {len(raw)} bytes", (("truncate", rel, size),), False


DEEP = "[" * 100000 + "]" * 100000


def _json_edits(target: str) -> list[tuple[str, dict | bytes, bool]]:
    """(what, keys to set, or the file's new bytes, valid input)."""
    common = [
        ("a value nested 100000 deep", {"__deep__": None}, False),
        ("an integer of 5000 digits", {"__bigint__": None}, False),
        ("the file empty", b"", False),
        ("a JSON list, not an object", b"[1, 2, 3]", False),
        ("an empty object", b"{}", False),
        ("non-UTF-8 bytes", b'{"\xff\xfe": 1}', False),
    ]
    if target == "adapter-json":
        return [
            ("r negative", {"r": -8}, False),
            *common,
            ("r zero", {"r": 0}, False),
            ("r a string", {"r": "8"}, False),
            ("r 2^62", {"r": 1 << 62}, False),
            ("r fractional", {"r": 8.5}, False),
            ("lora_alpha null", {"lora_alpha": None}, False),
            ("lora_alpha NaN", {"lora_alpha": "__nan__"}, False),
            ("lora_alpha 1e400 (infinite)", {"lora_alpha": "__1e400__"}, False),
            ("target_modules a number", {"target_modules": 5}, False),
            ("target_modules empty", {"target_modules": []}, False),
            ("target_modules naming no module", {"target_modules": ["nope_proj"]}, False),
            ("peft_type another method", {"peft_type": "IA3"}, False),
            ("use_dora a string", {"use_dora": "yes"}, False),
        ]
    return [
        ("num_hidden_layers 10^9", {"num_hidden_layers": 10**9}, False),
        *common,
        ("num_attention_heads zero", {"num_attention_heads": 0}, False),
        ("hidden_size negative", {"hidden_size": -64}, False),
        ("rms_norm_eps NaN", {"rms_norm_eps": "__nan__"}, False),
        ("vocab_size 2^40", {"vocab_size": 1 << 40}, False),
        ("intermediate_size 10^12", {"intermediate_size": 10**12}, False),
        ("dtype unknown", {"dtype": "float7"}, False),
        ("architectures naming no class", {"architectures": ["NoSuchModelForCausalLM"]}, False),
        ("model_type unknown", {"model_type": "no-such-model"}, False),
    ]


def plan_json_edit(ctx: Ctx):
    target = ctx.pick(list(JSON_FILES))
    rel = _json_rel(ctx, target)
    raw = ctx.read(rel)
    what, change, valid = ctx.pick(_json_edits(target))
    if isinstance(change, bytes):
        new = change
    else:
        text = json.dumps({**json.loads(raw), **change}, indent=2)
        text = text.replace('"__deep__": null', f'"__deep__": {DEEP}')
        text = text.replace('"__bigint__": null', f'"__bigint__": {"9" * 5000}')
        text = text.replace('"__nan__"', "NaN").replace('"__1e400__"', "1e400")
        new = text.encode()
    return f"{rel}: {what}", (("replace", rel, new),), valid


LATEST_EDITS = [
    (b"global_step6/../../..", "a path leaving the checkpoint"),
    (b"", "empty"),
    (b"\n", "a newline"),
    (b"global_step6\n", "a trailing newline (the same tag)"),
    (b" global_step6 ", "spaces around the tag"),
    (b"global_step6\x00", "a NUL byte"),
    (b"global_step7", "a tag that is not there"),
    (b"../global_step6", "a path to the parent"),
    (b"/etc", "an absolute path"),
    (b".", "the checkpoint folder itself"),
    (b"\xffglobal_step6", "non-UTF-8 bytes"),
    (b"a" * (1 << 20), "1 MiB long"),
]


def plan_latest(ctx: Ctx):
    rel = f"{_checkpoint_rel(ctx.fixture)}/latest"
    new, what = ctx.pick(LATEST_EDITS)
    return f"{rel}: {what} ({new[:40]!r})", (("replace", rel, new),), False


def plan_remove_or_empty(ctx: Ctx):
    ckpt = _checkpoint_rel(ctx.fixture)
    files = [
        ctx.sources.rank_files(ctx.fixture, "optim")[-1],
        ctx.sources.rank_files(ctx.fixture, "model")[-1],
        f"{ckpt}/latest",
        f"{ckpt}/adapter_config.json",
        "base/config.json",
        BASE_WEIGHTS,
    ]
    rel = ctx.pick(files)
    how = "emptied" if ctx.round == 0 or ctx.rng.random() < 0.5 else "removed"
    op = ("truncate", rel, 0) if how == "emptied" else ("remove", rel)
    return f"{rel} {how}", (op,), False


def _family(name, target, planner, fixtures=FIXTURES) -> Family:
    return Family(name, target, tuple(fixtures), planner)


FAMILIES: list[Family] = [
    _family("flip-master", "optim", plan_flip_master),
    _family("st-header-length", "base-safetensors", plan_st_header_length),
    _family("flip-moment", "optim", plan_flip_moment),
    _family("truncate-rank", "optim/model", plan_truncate_rank),
    _family("flip-model-tensor", "model", plan_flip_model_tensor, ("engine-z2-bf16", "engine-z3-bf16")),
    _family("st-flip-header", "base-safetensors", plan_st_flip_header),
    _family("flip-pickle", "optim/model", plan_flip_pickle),
    _family("json-flip", "json", plan_json_flip),
    _family("flip-zip-header", "optim/model", plan_flip_zip_header),
    _family("st-edit-header", "base-safetensors", plan_st_edit_header),
    _family("flip-zip-directory", "optim/model", plan_flip_directory),
    _family("json-truncate", "json", plan_json_truncate),
    _family("zip-size-field", "optim/model", plan_size_field),
    _family("st-flip-data", "base-safetensors", plan_st_flip_data),
    _family("zero-block", "optim/model", plan_zero_block),
    _family("json-edit", "json", plan_json_edit),
    _family("drop-zip-entry", "optim/model", plan_drop_record),
    _family("st-truncate", "base-safetensors", plan_st_truncate),
    _family("cut-zip-record", "optim/model", plan_cut_record),
    _family("latest", "latest", plan_latest),
    _family("swap-ranks", "optim/model", plan_swap_ranks),
    _family("st-sharded-index", "base-safetensors", plan_sharded_index),
    _family("duplicate-rank", "optim/model", plan_duplicate_rank),
    _family("swap-tags", "optim/model", plan_swap_tags, ("trainer-z3-bf16",)),
    _family("foreign-run", "optim", plan_foreign_run),
    _family("remove-or-empty", "files", plan_remove_or_empty),
]


# --- running convert -----------------------------------------------------------------------------------


@dataclass
class Run:
    """How one process ended."""

    returncode: int
    stdout: str
    stderr: str
    wall: float
    peak_kb: int  # peak RSS (wait4's ru_maxrss: the process and the children it waited for)
    killed: str | None = None  # "timeout" or "memory": the harness killed it


def child_env() -> dict[str, str]:
    """The environment a conversion runs in: offline (no hub lookup can hang), one thread (2 shared cores)."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONFAULTHANDLER": "1",  # a crash says where
    }


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_process(args: list[str], cwd: Path, timeout: float, kill_above_kb: int, log_dir: Path) -> Run:
    """Run a command in its own session, polling for its end (``wait4``, for the peak RSS) and killing it
    at ``timeout`` seconds or when its RSS passes ``kill_above_kb`` (a guard for the shared machine; the
    verdict on memory is taken from the peak)."""
    out_path, err_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
    start = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            args, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=child_env(), start_new_session=True
        )
    killed = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if killed is None:
            if time.monotonic() - start > timeout:
                killed = "timeout"
            elif _rss_kb(proc.pid) > kill_above_kb:
                killed = "memory"
            if killed:  # the whole session; its leader is not reaped yet, so the group is still ours
                os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.02)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    return Run(
        proc.returncode,
        out_path.read_text(errors="replace"),
        err_path.read_text(errors="replace"),
        time.monotonic() - start,
        usage.ru_maxrss,
        killed,
    )


def convert_args(workspace: Path, fixture: str, output: Path) -> list[str]:
    """``zero2merged -q convert`` on a workspace: -q, so that a refusal is the error line alone."""
    checkpoint = workspace / _checkpoint_rel(fixture)
    base = workspace / "base"
    return [sys.executable, "-m", "zero2merged", "-q", "convert", str(checkpoint), "--output", str(output)] + [
        "--base-model",
        str(base),
    ]


def verify_args(output: Path, workspace: Path, fixture: str) -> list[str]:
    checkpoint = workspace / _checkpoint_rel(fixture)
    return [sys.executable, "-m", "zero2merged", "-q", "verify", str(output), "--checkpoint", str(checkpoint)] + [
        "--base-model",
        str(workspace / "base"),
    ]


# --- the oracle ----------------------------------------------------------------------------------------


def snapshot(folder: Path, root: Path) -> dict[str, bytes]:
    """A folder's files, the model card's mentions of ``root`` made neutral."""
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            data = path.read_bytes()
            if path.name == MODEL_CARD:
                data = data.replace(str(root).encode(), b"<ROOT>")
            files[str(path.relative_to(folder))] = data
    return files


def memory_bound(reference_peak_kb: int) -> int:
    """The most a damaged run may take: the undamaged conversion's peak plus a quarter of it, at least
    64 MiB. At these sizes the peak is the interpreter and its imports (torch, transformers, PEFT); the
    data is under a MB. The margin covers what varies between runs of one command (a few MB) and a
    refusal's own path; an input that makes the conversion allocate by what its damaged bytes claim
    (a length, a shape) goes over it."""
    return reference_peak_kb + max(reference_peak_kb // 4, 64 * 1024)


@dataclass
class Reference:
    """The undamaged conversion of a fixture, which damaged ones are judged against."""

    fixture: str
    workspace: Path
    output: Path
    files: dict[str, bytes]
    peak_kb: int
    wall: float
    verify_line: str

    @property
    def bound_kb(self) -> int:
        return memory_bound(self.peak_kb)

    @property
    def timeout(self) -> float:
        # Ten times the undamaged run, at least a minute: the machine is shared, and its load varies.
        return max(60.0, 10 * self.wall)


@dataclass
class Outcome:
    case: Case
    outcome: str
    detail: str
    run: Run | None = None
    workspace: Path | None = None

    @property
    def ok(self) -> bool:
        return self.outcome in OUTCOMES_OK

    def stderr_tail(self, lines: int = 6) -> str:
        return "\n".join(self.run.stderr.rstrip().splitlines()[-lines:]) if self.run else ""

    def report(self) -> str:
        run = self.run
        facts = f"exit {run.returncode}, {run.wall:.1f} s, peak RSS {run.peak_kb / 1024:.0f} MB" if run else ""
        return (
            f"{self.outcome}: {self.case.describe()}\n  {self.detail}\n  {facts}\n"
            f"  repro: python -m tests.fuzzing repro {self.case.seed}\n"
            f"  stderr (last lines):\n    " + self.stderr_tail().replace("\n", "\n    ")
        )

    def to_dict(self) -> dict:
        run = self.run
        return {
            "seed": self.case.seed,
            "fixture": self.case.fixture,
            "target": self.case.target,
            "mutation": self.case.mutation,
            "summary": self.case.summary,
            "valid_input": self.case.valid_input,
            "outcome": self.outcome,
            "detail": self.detail,
            "returncode": run.returncode if run else None,
            "wall_s": round(run.wall, 2) if run else None,
            "peak_rss_mb": round(run.peak_kb / 1024, 1) if run else None,
            "stderr_tail": self.stderr_tail(),
        }


def _left_behind(case_dir: Path, output: Path, expected: set[str]) -> list[str]:
    """What a run left beside its output that it should not have."""
    found = []
    for path in case_dir.iterdir():
        if path.name not in expected:
            found.append(path.name)
    work = case_dir / f"{output.name}.zero2merged-work"
    if work.exists():
        found += [str(p.relative_to(case_dir)) for p in work.rglob(".merged.tmp")]
        found += [str(p.relative_to(case_dir)) for p in work.rglob("*.partial*")]
    return found


def _work_without_finished_stage(case_dir: Path, output: Path) -> bool:
    """A work directory the run kept though no stage finished in it (it should have removed it)."""
    work = case_dir / f"{output.name}.zero2merged-work"
    if not work.exists():
        return False
    try:
        stages = json.loads((work / "manifest.json").read_text()).get("stages", {})
    except (OSError, ValueError):
        return True
    return not any(record.get("status") == "done" for record in stages.values())


def _describe_difference(mine: dict[str, bytes], theirs: dict[str, bytes]) -> str:
    """Which files differ, and for weight files which tensors and by how much."""
    if not mine:
        return "no output folder"
    notes = []
    for name in sorted(set(mine) | set(theirs)):
        if name not in mine or name not in theirs:
            notes.append(f"{name} {'missing' if name not in mine else 'extra'}")
        elif mine[name] != theirs[name]:
            if name.endswith(".safetensors"):
                notes.append(f"{name}: {_tensor_difference(mine[name], theirs[name])}")
            else:
                notes.append(f"{name} differs")
    return "; ".join(notes)


def _tensor_difference(mine: bytes, theirs: bytes) -> str:
    try:
        from safetensors.torch import load

        a, b = load(mine), load(theirs)
    except Exception as e:  # noqa: BLE001 - an unreadable output is itself the finding
        return f"unreadable ({type(e).__name__}: {e})"
    changed = []
    for name in sorted(set(a) | set(b)):
        if name not in a or name not in b or a[name].shape != b[name].shape or a[name].dtype != b[name].dtype:
            changed.append((name, float("inf")))
        elif not a[name].equal(b[name]):
            changed.append((name, (a[name].float() - b[name].float()).abs().max().item()))
    shown = ", ".join(f"{n} (max abs diff {d:.3g})" for n, d in changed[:3])
    return f"{len(changed)} tensors differ: {shown}{' ...' if len(changed) > 3 else ''}"


class Harness:
    """Plans, runs and judges cases, one at a time, against each fixture's undamaged conversion."""

    def __init__(self, root: Path, *, keep_failures: Path | None = None, log: Callable[[str], None] | None = None):
        self.root = root
        self.sources = Sources()
        self.references: dict[str, Reference] = {}
        self.outcomes: list[Outcome] = []
        self.keep_failures = keep_failures
        self.log = log or (lambda line: None)

    def reference(self, fixture: str) -> Reference:
        """The fixture's undamaged conversion (made once), verified against its undamaged checkpoint."""
        if fixture not in self.references:
            workspace = prepare_workspace(self.sources, fixture, self.root / f"reference-{fixture}")
            output = workspace / "out"
            run = run_process(convert_args(workspace, fixture, output), workspace, 600, 8 << 20, workspace)
            if run.returncode != 0:
                raise RuntimeError(f"the undamaged {fixture} does not convert:\n{run.stderr[-3000:]}")
            verified = run_process(verify_args(output, workspace, fixture), workspace, 600, 8 << 20, workspace)
            if verified.returncode != 0:
                raise RuntimeError(
                    f"the undamaged {fixture}'s conversion fails verify:\n{verified.stdout}{verified.stderr}"
                )
            line = verified.stdout.strip().splitlines()[-1]
            self.references[fixture] = Reference(
                fixture, workspace, output, snapshot(output, workspace), run.peak_kb, run.wall, line
            )
            self.log(
                f"reference {fixture}: {run.wall:.1f} s, peak RSS {run.peak_kb / 1024:.0f} MB "
                f"(bound {memory_bound(run.peak_kb) / 1024:.0f} MB); {line[:60]}..."
            )
        return self.references[fixture]

    def prepare(self, seed: int, case_dir: Path) -> tuple[Case, Path]:
        """The seed's case, applied to a fresh copy of its fixture in ``case_dir``."""
        case = plan(seed, self.sources)
        workspace = prepare_workspace(self.sources, case.fixture, case_dir)
        apply(case, workspace, self.sources)
        return case, workspace

    def run(self, seed: int) -> Outcome:
        case = plan(seed, self.sources)
        reference = self.reference(case.fixture)
        case_dir = self.root / f"case-{seed}"
        shutil.rmtree(case_dir, ignore_errors=True)
        _, workspace = self.prepare(seed, case_dir)
        outcome = self.judge(case, workspace, reference)
        self.outcomes.append(outcome)
        if outcome.ok:
            shutil.rmtree(case_dir, ignore_errors=True)
        elif self.keep_failures is not None:
            kept = self.keep_failures / case_dir.name
            shutil.rmtree(kept, ignore_errors=True)
            shutil.move(str(case_dir), kept)
            outcome.workspace = kept
        return outcome

    def judge(self, case: Case, workspace: Path, reference: Reference) -> Outcome:
        output = workspace / "out"
        before = {p.name for p in workspace.iterdir()}
        run = run_process(
            convert_args(workspace, case.fixture, output),
            workspace,
            reference.timeout,
            max(4 * reference.bound_kb, 2 << 20),
            _logs(workspace),
        )
        lines = [line for line in run.stderr.splitlines() if line.strip()]

        def outcome(name: str, detail: str) -> Outcome:
            return Outcome(case, name, detail, run, workspace)

        if run.killed == "timeout":
            return outcome("hang", f"killed after {reference.timeout:.0f} s")
        if run.killed == "memory" or run.peak_kb > reference.bound_kb:
            return outcome(
                "memory",
                f"peak RSS {run.peak_kb / 1024:.0f} MB > bound {reference.bound_kb / 1024:.0f} MB "
                f"(undamaged: {reference.peak_kb / 1024:.0f} MB)" + (", killed" if run.killed else ""),
            )
        if run.returncode < 0:
            return outcome("crash", f"killed by {signal.Signals(-run.returncode).name}")
        internal = run.returncode == 3 and lines[-1:] and lines[-1].startswith("internal error: ")
        if "Traceback (most recent call last)" in run.stderr or internal:  # the CLI's backstop says it in one line
            last = lines[-1] if lines else ""
            return outcome("traceback", f"exit {run.returncode}: {last[:300]}")
        expected = before | {".logs"}
        if run.returncode == 2:
            if len(lines) != 1 or not lines[0].startswith("error: "):
                return outcome("bad-exit", f"exit 2 with {len(lines)} lines on stderr, last: {lines[-1:]}")
            left = _left_behind(workspace, output, expected | {f"{output.name}.zero2merged-work"})
            if output.exists():
                left.insert(0, f"{output.name}/ ({len(list(output.iterdir()))} files)")
            if _work_without_finished_stage(workspace, output):
                left.append(f"{output.name}.zero2merged-work (no stage finished in it)")
            if left:
                return outcome("output-left-behind", f"refused ({lines[0][:200]}) but left: {', '.join(left)}")
            return outcome("refused", lines[0][:400])
        if run.returncode != 0:
            return outcome("bad-exit", f"exit {run.returncode}: {lines[-1][:300] if lines else '(no stderr)'}")
        left = _left_behind(workspace, output, expected | {output.name, f"{output.name}.zero2merged-work"})
        if left:
            return outcome("output-left-behind", f"converted but left: {', '.join(left)}")
        mine = snapshot(output, workspace) if output.is_dir() else {}
        if mine == reference.files:
            return outcome("converted-ok", "byte-identical to the undamaged conversion")
        difference = _describe_difference(mine, reference.files)
        if case.valid_input and mine:
            # Another input, well-formed: the conversion must be faithful to it.
            faithful = run_process(
                verify_args(output, workspace, case.fixture), workspace, 600, 8 << 20, _logs(workspace)
            )
            verdict = (faithful.stdout.strip().splitlines() or ["(no verdict)"])[-1][:160]
            if faithful.returncode == 0:
                return outcome("converted-other-input", f"{difference}; verify against the damaged input: {verdict}")
            return outcome("silent-difference", f"{difference}; verify against the damaged input fails: {verdict}")
        verdict = "(no output to verify)"
        if mine:
            check = run_process(
                verify_args(output, reference.workspace, case.fixture), workspace, 600, 8 << 20, _logs(workspace)
            )
            verdict = (check.stdout.strip().splitlines() or [f"exit {check.returncode}"])[-1][:160]
        return outcome("silent-difference", f"{difference}; verify against the undamaged checkpoint: {verdict}")


def _logs(workspace: Path) -> Path:
    logs = workspace / ".logs"
    logs.mkdir(exist_ok=True)
    return logs


def table(outcomes: list[Outcome]) -> str:
    """How the cases ended: counts per outcome class, overall and per mutation family."""
    counts = collections.Counter(o.outcome for o in outcomes)
    classes = [c for c in (*OUTCOMES_OK, *FAILURES) if counts[c]]
    lines = [f"fuzz: {len(outcomes)} cases, {sum(o.ok for o in outcomes)} ended as they must", ""]
    lines += [f"  {name:24} {counts[name]:5}" for name in classes]
    per_family: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        per_family[o.case.mutation][o.outcome] += 1
    width = max([len(f.name) for f in FAMILIES] + [8])
    lines += ["", "  " + "family".ljust(width) + "".join(f"{c[:14]:>16}" for c in classes)]
    for family in FAMILIES:
        if family.name in per_family:
            row = per_family[family.name]
            lines.append("  " + family.name.ljust(width) + "".join(f"{row[c] or '':>16}" for c in classes))
    return "\n".join(lines)


# --- command line --------------------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.fuzzing", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    show = commands.add_parser("show", help="print the cases seeds make")
    show.add_argument("seeds", help="e.g. 0-29 or 3,17")
    run = commands.add_parser("run", help="run cases one at a time and print how they ended")
    run.add_argument("seeds", nargs="?", default=f"{FULL_SEEDS.start}-{FULL_SEEDS.stop - 1}")
    run.add_argument("--json", type=Path, help="write every case's outcome here")
    run.add_argument("--keep-failures", type=Path, help="move failing cases' folders here")
    repro = commands.add_parser("repro", help="make a seed's damaged copy in DIR and print the command to run")
    repro.add_argument("seed", type=int)
    repro.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args(argv)

    sources = Sources()
    if args.command == "show":
        for seed in _seeds(args.seeds):
            print(plan(seed, sources).describe())
        return 0
    if args.command == "repro":
        case = plan(args.seed, sources)
        case_dir = args.dir or Path(tempfile.mkdtemp(prefix=f"fuzz-{args.seed}-"))
        workspace = prepare_workspace(sources, case.fixture, case_dir)
        apply(case, workspace, sources)
        print(case.describe())
        print(" ".join(convert_args(workspace, case.fixture, workspace / "out")).replace(sys.executable, "python"))
        return 0

    with tempfile.TemporaryDirectory(prefix="zero2merged-fuzz-") as tmp:
        harness = Harness(Path(tmp), keep_failures=args.keep_failures, log=lambda line: print(line, flush=True))
        if args.keep_failures:
            args.keep_failures.mkdir(parents=True, exist_ok=True)
        seeds = _seeds(args.seeds)
        started = time.monotonic()
        for i, seed in enumerate(seeds, 1):
            outcome = harness.run(seed)
            print(f"[{i}/{len(seeds)}] {outcome.outcome:22} {outcome.case.describe()[:150]}", flush=True)
            if not outcome.ok:
                print("  " + outcome.report().replace("\n", "\n  "), flush=True)
        print(f"\n{table(harness.outcomes)}\n\n{time.monotonic() - started:.0f} s")
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps([o.to_dict() for o in harness.outcomes], indent=1))
        return 0 if all(o.ok for o in harness.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

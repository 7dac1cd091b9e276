"""Options are checked before any work: one line saying what is accepted; the CLI's names are the records'."""

from __future__ import annotations

import pytest

from zero2merged.cli import main
from zero2merged.core.errors import OptionError
from zero2merged.core.options import ConvertOptions, Source, Tuning, convert_options, field_names, parse_size


@pytest.mark.parametrize(
    "size,expected",
    [("5GB", 5 * 10**9), ("100KB", 100_000), (" 2.5MB", 2_500_000), ("1tb", 10**12), (1234, 1234), ("1234", 1234)],
)
def test_sizes_are_read_as_save_pretrained_reads_them(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5XB", "GB", "", "-1GB", "0", 0, -5, "5 GiB", True, None])
def test_a_size_that_is_not_one_is_refused_in_one_line(size):
    with pytest.raises(OptionError, match="is not a size: .*5GB, 500MB or 100KB"):
        parse_size(size)


@pytest.mark.parametrize(
    "options,says",
    [
        ({"dtype": "int8"}, "--dtype must be auto, fp32, bf16, fp16"),
        ({"workers": 0}, "--workers must be at least 1"),
        ({"device": "mps"}, "only cpu and cuda"),
        ({"device": "cuda:x"}, "only cpu and cuda"),
        ({"in_memory": True, "workers": 2}, "apply to the streaming conversion"),
        ({"max_shard_size": "big"}, "is not a size"),
    ],
)
def test_bad_convert_options_are_refused(options, says):
    with pytest.raises(OptionError, match=says):
        ConvertOptions(**options)


def test_options_are_normalized():
    options = ConvertOptions(max_shard_size="60KB", work_dir="~/work")
    assert options.max_shard_size == 60_000 and "~" not in str(options.work_dir) and options.streaming
    assert not ConvertOptions(in_memory=True).streaming
    with pytest.raises(OptionError, match="--lora-alpha must be a positive number"):
        Source("run", lora_alpha=0)
    with pytest.raises(OptionError, match="must be positive"):
        Tuning(block_bytes=0)


def test_keyword_options_are_split_between_the_run_and_the_conversion():
    source, options = convert_options("run", {"base_model": "base", "tag": "t", "dtype": "bf16", "workers": 2})
    assert (source.base_model, source.tag, str(source.checkpoint)) == ("base", "t", "run")
    assert (options.dtype, options.workers) == ("bf16", 2)
    with pytest.raises(TypeError, match="bogus"):
        convert_options("run", {"bogus": 1})


def test_the_cli_options_are_the_records_fields():
    """What lets the CLI hand its options to the library as they are."""
    convert = {param.name for param in main.commands["convert"].params if param.expose_value}
    assert convert - {"checkpoint", "output", "as_json"} == set(field_names(Source)[1:]) | (
        set(field_names(ConvertOptions)) - {"tuning"}
    )
    for command in ("inspect", "verify", "export-adapter"):
        assert set(field_names(Source)[1:]) <= {param.name for param in main.commands[command].params}


@pytest.mark.parametrize(
    "args,says",
    [
        (["--max-shard-size", "5XB"], "--max-shard-size '5XB' is not a size"),
        (["--device", "mps"], "--device 'mps': only cpu and cuda[:N]"),
    ],
)
def test_the_command_line_refuses_a_bad_value_in_one_line_before_any_work(tmp_path, args, says):
    from click.testing import CliRunner

    result = CliRunner().invoke(main, ["convert", str(tmp_path), "-o", str(tmp_path.parent / "out"), *args])
    assert result.exit_code == 2 and result.stderr.startswith("error: ") and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not (tmp_path.parent / "out").exists()

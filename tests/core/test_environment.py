"""The supported versions: one statement of them (pyproject.toml agrees), each installed library judged
against it, a library below its range refused in one line before any work, a newer one let through."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
from click.testing import CliRunner

from zero2merged.cli import main
from zero2merged.core import environment
from zero2merged.core.environment import BY_NAME, LIBRARIES, require_supported, status
from zero2merged.core.errors import LibraryError

ROOT = Path(__file__).resolve().parents[2]


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11 and up
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(lines: list[str]) -> dict[str, str]:
    from packaging.requirements import Requirement

    return {Requirement(line).name: str(Requirement(line).specifier) for line in lines}


def _same(a: str, b: str) -> bool:
    from packaging.specifiers import SpecifierSet

    return SpecifierSet(a) == SpecifierSet(b)


def test_pyproject_states_the_supported_ranges():
    project = _pyproject()["project"]
    declared = _requirements(project["dependencies"])
    declared.update(_requirements(project["optional-dependencies"]["qlora"]))
    for library in LIBRARIES:
        assert library.name in declared, library.name
        assert _same(declared[library.name], library.spec), (library.name, declared[library.name], library.spec)
    assert project["requires-python"] == environment.PYTHON


def test_the_oldest_tested_versions_are_what_make_test_oldest_pins():
    pins = {}
    for line in (ROOT / "constraints-oldest.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    for library in LIBRARIES:
        if library.name != "bitsandbytes":  # not in the oldest stack: QLoRA is tested on today's
            assert pins[library.name] == library.oldest, library.name
            assert status(library, library.oldest).verdict == "ok", library.name


@pytest.mark.parametrize(
    "name,version,verdict",
    [
        ("torch", "2.13.0+cpu", "ok"),
        ("torch", "2.6.0+cu124", "ok"),
        ("torch", "2.5.1", "too old"),
        ("torch", "2.14.1", "untested"),  # above the upper bound only: it runs
        ("transformers", "4.56.2", "ok"),
        ("transformers", "4.57.6", "ok"),
        ("transformers", "4.56.1", "too old"),
        ("transformers", "5.0.0", "excluded"),
        ("transformers", "5.20.2", "excluded"),
        ("transformers", "5.21.0", "ok"),
        ("transformers", "6.0.0", "untested"),  # newer than tested
        ("peft", "0.17.0", "too old"),
        ("peft", "0.30.0", "untested"),
        ("deepspeed", "0.16.9", "too old"),
        ("deepspeed", "0.17.6", "ok"),
    ],
)
def test_a_version_is_judged_against_the_range(name, version, verdict):
    assert status(BY_NAME[name], version).verdict == verdict


def _installed_as(monkeypatch, **versions):
    real = metadata.version

    def version(name):
        if name in versions:
            if versions[name] is None:
                raise metadata.PackageNotFoundError(name)
            return versions[name]
        return real(name)

    monkeypatch.setattr(environment.metadata, "version", version)


def test_a_library_below_its_range_is_refused_in_one_line(monkeypatch):
    _installed_as(monkeypatch, transformers="4.55.4")
    with pytest.raises(LibraryError) as caught:
        require_supported()
    message = str(caught.value)
    assert "\n" not in message and "transformers 4.55.4 is older than the supported >=4.56.2" in message
    assert "'transformers>=4.56.2'" in message


def test_an_excluded_version_and_a_missing_required_library_are_refused(monkeypatch):
    _installed_as(monkeypatch, transformers="5.10.4")
    with pytest.raises(LibraryError, match=r"transformers 5.10.4 is one of the versions outside .*not 5.0-5.20"):
        require_supported()
    _installed_as(monkeypatch, transformers="5.25.0", peft=None)
    with pytest.raises(LibraryError, match=r"peft is not installed"):
        require_supported()


def test_newer_versions_and_missing_optional_libraries_pass(monkeypatch):
    _installed_as(monkeypatch, torch="2.14.1", transformers="6.1.0", deepspeed=None, bitsandbytes=None)
    require_supported()


def test_an_old_deepspeed_is_refused_where_installed(monkeypatch):
    _installed_as(monkeypatch, deepspeed="0.16.9")
    with pytest.raises(LibraryError, match="deepspeed 0.16.9 is older"):
        require_supported()


def test_convert_verify_export_and_inspect_refuse_before_any_work(monkeypatch, tmp_path):
    """Exit code 2 and one line, before a missing checkpoint (or anything else) is looked at."""
    _installed_as(monkeypatch, peft="0.16.0")
    for args in (
        ["convert", tmp_path, "--output", tmp_path / "out"],
        ["inspect", tmp_path],
        ["verify", tmp_path, "--checkpoint", tmp_path],
        ["export-adapter", tmp_path, "--output", tmp_path / "out"],
    ):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 2, (args, result.output)
        last = result.output.strip().splitlines()[-1]
        assert last.startswith("error: peft 0.16.0 is older than the supported >=0.17.1"), args
    assert not (tmp_path / "out").exists()


def test_a_peft_feature_is_named_with_the_peft_that_has_it(monkeypatch):
    _installed_as(monkeypatch, peft="0.16.0")
    with pytest.raises(LibraryError, match=r"uses target_parameters .* needs PEFT 0.17.0 or newer; PEFT 0.16.0"):
        environment.require_peft_feature("target_parameters", "run/adapter_config.json")
    _installed_as(monkeypatch, peft="0.17.1")
    environment.require_peft_feature("target_parameters", "run/adapter_config.json")


def test_env_reports_every_library_its_range_and_cuda():
    result = CliRunner().invoke(main, ["env"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("zero2merged") and lines[1].startswith("python")
    for library in LIBRARIES:
        line = next(line for line in lines if line.startswith(f"{library.name} "))
        assert (metadata.version(library.name) if status(library).version else "not installed") in line
        assert "supported " in line and library.oldest in line
    assert lines[-1].startswith("CUDA") and ("not visible" in lines[-1] or "visible" in lines[-1])
    data = json.loads(CliRunner().invoke(main, ["env", "--json"]).output)
    assert set(data["libraries"]) == {library.name for library in LIBRARIES}
    assert data["libraries"]["torch"]["supported"] == BY_NAME["torch"].spec


def test_env_says_what_would_be_refused(monkeypatch):
    _installed_as(monkeypatch, torch="2.5.1")
    result = CliRunner().invoke(main, ["env"])  # stderr mixed into output, as click 8.1 and 8.2 both do
    assert result.exit_code == 0
    assert "torch         2.5.1           too old" in result.output
    assert "not supported: torch (too old)" in result.output

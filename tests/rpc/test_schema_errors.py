"""A schema error is an error, never an abort: ``capbus compile`` prints the compiler's
message (the whole path, line and columns) and exits 1; ``capbus.load`` raises SchemaError
with the same text; the process goes on (before, pycapnp's parser aborted it: exit 134).
Also ``compile -o`` with a directory, and several schemas in one call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import capbus
from capbus.rpc.schemacheck import SchemaError

BROKEN = {
    "syntax": ("@0xbf5147cbbecf40c2;\nstruct Foo { a @0 :Text\n", ":3:1: error: Parse error."),
    "unknown_type": (
        "@0xbf5147cbbecf40c1;\nstruct Foo {\n  a @0 :Text;\n  b @1 :Nope;\n}\n",
        ":4:9-13: error: Not defined: Nope",
    ),
    "missing_import": (
        '@0xbf5147cbbecf40c3;\nusing import "missing.capnp".Foo;\nstruct A { b @0 :Foo; }\n',
        ":2:14-29: error: Import failed: missing.capnp",
    ),
    "no_id": ("struct A { b @0 :Text; }\n", ":1:1: error: File does not declare an ID."),
    "duplicate_ordinal": (
        "@0xbf5147cbbecf40c4;\ninterface I {\n  a @0 ();\n  b @0 ();\n}\n",
        ":4:6-7: error: Duplicate ordinal number.",
    ),
}

GOOD = "@0xbf5147cbbecf40c5;\ninterface Greeter {\n  hello @0 (name :Text) -> (greeting :Text);\n}\n"


def _compile(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "capbus", "compile", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_capbus_compile_prints_the_compilers_message_and_exits_1(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    schema = tmp_path / "deep" / "dir" / f"{case}.capnp"
    schema.parent.mkdir(parents=True)
    schema.write_text(text)
    result = _compile(str(schema), cwd=tmp_path)  # (a path under the working directory, even)
    assert result.returncode == 1, result  # (not 134: no abort)
    assert result.stderr.startswith(f"{schema}{expected}"), result.stderr
    assert "terminate called" not in result.stderr and not result.stdout
    assert not (schema.parent / f"{case}_capnp.py").exists()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_capbus_load_raises_schema_error_with_the_same_text(tmp_path: Path, case: str) -> None:
    text, expected = BROKEN[case]
    schema = tmp_path / f"{case}.capnp"
    schema.write_text(text)
    with pytest.raises(SchemaError) as raised:
        capbus.load(schema)
    assert str(raised.value).startswith(f"{schema}{expected}")
    assert capbus.SchemaError is SchemaError


def test_an_error_in_an_imported_file_names_that_file(tmp_path: Path) -> None:
    (tmp_path / "types.capnp").write_text("@0xbf5147cbbecf40c6;\nstruct T { a @0 :Bogus; }\n")
    main = tmp_path / "main.capnp"
    main.write_text('@0xbf5147cbbecf40c7;\nusing import "types.capnp".T;\nstruct U { t @0 :T; }\n')
    with pytest.raises(SchemaError, match=rf"^{tmp_path}/types.capnp:2:18-23: error: Not defined: Bogus"):
        capbus.load(main)


def test_a_missing_schema_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.capnp"
    with pytest.raises(FileNotFoundError) as raised:
        capbus.load(missing)
    assert raised.value.filename == str(missing)
    result = _compile(str(missing), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip() == f"capbus compile: {missing}: no such schema file"


def test_compile_writes_into_a_directory_and_takes_several_schemas(tmp_path: Path) -> None:
    first, second = tmp_path / "first.capnp", tmp_path / "second-one.capnp"
    first.write_text(GOOD)
    second.write_text(GOOD.replace("c5;", "c8;"))
    out = tmp_path / "generated"
    out.mkdir()
    result = _compile(str(first), str(second), "-o", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    written = [out / "first_capnp.py", out / "second_one_capnp.py"]
    assert result.stdout.split() == [str(path) for path in written]
    for path in written:
        assert "class Greeter" in path.read_text()
    refused = _compile(str(first), str(second), "-o", str(out / "x.py"), cwd=tmp_path)
    assert refused.returncode == 1 and "-o must be a directory" in refused.stderr


def test_a_good_schema_still_loads_and_compiles(tmp_path: Path) -> None:
    schema = tmp_path / "greeter.capnp"
    schema.write_text(GOOD)
    assert capbus.load(schema).Greeter.interface.methods["hello"].ordinal == 0
    result = _compile(str(schema), cwd=tmp_path)
    assert result.returncode == 0 and (tmp_path / "greeter_capnp.py").exists()


def test_two_files_sharing_an_id_say_so(tmp_path: Path) -> None:
    first, second = tmp_path / "first.capnp", tmp_path / "copy.capnp"
    first.write_text(GOOD.replace("c5;", "c9;"))
    second.write_text(GOOD.replace("c5;", "c9;").replace("Greeter", "Other"))
    capbus.load(first)
    capbus.load(first)  # (the same file again: fine)
    with pytest.raises(
        SchemaError, match=rf"^{second}: the id @0xbf5147cbbecf40c9 is declared in {first} too"
    ):
        capbus.load(second)
    result = _compile(str(first), str(second), "-o", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1 and "the id @0xbf5147cbbecf40c9 is declared in" in result.stderr

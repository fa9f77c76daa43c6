"""Files written whole or not at all, and JSON that every JSON reader accepts.

`atomic_write` writes into a temporary file beside the target, flushes it to disk, renames
it over the target and flushes the folder: a reader (or the next run) sees the old file or
the new one, never half of one, even when the writer is killed or the machine loses power.
A killed writer leaves its temporary file behind; the next process writing into that
folder removes it.

Base layer: the standard library only, so every layer above can write its files this way.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

TEMP_SUFFIX = ".fedbt-tmp"
# .<target name>.<writer pid>.<random>.fedbt-tmp: hidden, and never mistaken for a result.
TEMP_NAME = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
# No temporary file of this process is older than this; one that is was left by an earlier writer.
PROCESS_STARTED = time.time()
_cleaned_folders: set[Path] = set()


def _writer_running(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap liveness check: keep the file rather than break a writer
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def remove_stale_temps(folder: Path) -> list[Path]:
    """Delete the temporary files killed writers left in `folder`; returns them.

    Stale means: named by `atomic_write`, last written before this process started, and its
    writer is not running on this machine (another process may be writing the same folder:
    a shared decode cache).
    """
    removed = []
    for entry in os.scandir(folder):
        match = TEMP_NAME.match(entry.name)
        if match is None or _writer_running(int(match.group(1))):
            continue
        try:
            if entry.stat(follow_symlinks=False).st_mtime < PROCESS_STARTED:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except FileNotFoundError:
            pass  # another process cleaned it first
    return removed


def _clean_once(folder: Path) -> None:
    # Stale files predate this process, so one look per folder and process finds them all.
    if folder not in _cleaned_folders:
        remove_stale_temps(folder)
        _cleaned_folders.add(folder)


def _sync_folder(folder: Path) -> None:
    if os.name != "posix":
        return  # Windows cannot open a folder to flush it; its renames are journaled by NTFS
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_folders(folder: Path) -> None:
    """Create `folder` and its missing parents readable by their owner alone (0700); existing ones stay as they are."""
    for each in reversed([folder, *folder.parents]):
        if not each.exists():
            each.mkdir(mode=0o700, exist_ok=True)


def atomic_write(
    path: str | Path, write: Callable[[IO[bytes]], Any], durable: bool = True, private: bool = False
) -> Path:
    """Replace `path` with what `write(binary file)` writes, all at once.

    durable=False skips the two flushes to disk (about 7 ms a file here): for files that are
    cheap to make again and checked when read, such as decode-cache entries.
    private=True: for what holds patient-derived data (decoded pixels, trained weights): the
    file is its owner's alone (0600) from its first byte, and folders it creates are 0700.
    """
    path = Path(path)
    folder = path.parent
    if private:
        make_private_folders(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
    _clean_once(folder)
    tmp = folder / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
    mode = 0o600 if private else 0o666  # less the umask, as open() does
    try:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _sync_folder(folder)
    return path


def write_text(path: str | Path, text: str) -> Path:
    """UTF-8; a file name that is not valid UTF-8 (kept by Python as surrogates) is written as \\x.. escapes."""
    data = text.encode("utf-8", errors="backslashreplace")
    return atomic_write(path, lambda fh: fh.write(data))


def finite_or_null(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None, in nested dicts, lists and tuples."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_null(item) for item in value]
    return value


def to_json(value: Any) -> str:
    """Strict JSON (RFC 8259): a metric that is NaN or infinite is written as null, meaning undefined
    (the accuracy of a split without images, an AUC with one class present); never a bare NaN."""
    return json.dumps(finite_or_null(value), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, value: Any) -> Path:
    return write_text(path, to_json(value))


def read_json(path: str | Path) -> Any | None:
    """The JSON a file holds; None when it is missing, unreadable, truncated or not JSON."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError):
        return None

"""Writing files safely: a fresh temporary name in the target folder, then ``os.replace``.

Shared by every writer of the package (checkpoints, reports, plots): a symbolic link planted at the
target name is replaced itself, never written through, a reader never sees a half-written file,
and a temporary file left by a killed writer is removed by the next write of the same name.
"""

from __future__ import annotations

import os
import re
import tempfile
from typing import Callable, Union

PathLike = Union[str, "os.PathLike[str]"]


def _umask() -> int:
    # Read without changing it (os.umask sets a value to read one, which races other threads).
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _split(path: str) -> tuple[str, str, str]:
    folder = os.path.dirname(path) or "."
    name = os.path.basename(path)
    # ".tmp" goes before the whole known extension, so tools that go by it still recognise the file.
    for ext in (".safetensors", ".json", ".md", ".png", ".npz", ".pdf", ".svg", ".txt"):
        if name.endswith(ext) and len(name) > len(ext):
            return folder, name[: -len(ext)], ext
    stem, ext = os.path.splitext(name)
    return folder, stem, ext


def remove_stale_temps(path: PathLike) -> None:
    """Remove temporary files that an interrupted :func:`write_replacing` of ``path`` left behind
    (only names of the form it creates, ``<stem>.<8 chars>.tmp<ext>``; links are removed, never followed)."""
    folder, stem, ext = _split(os.fspath(path))
    pattern = re.compile(re.escape(stem) + r"\.[a-z0-9_]{8}\.tmp" + re.escape(ext))
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if pattern.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def write_replacing(path: PathLike, write: Callable[[str], None]) -> None:
    """Write the file ``path`` with ``write(tmp)``, never through a link planted at ``path``.

    ``write`` gets the name of a fresh, exclusively created file in the same folder (same
    extension, for tools that go by it; the usual permissions for new files), which then replaces
    ``path`` with ``os.replace``: a symbolic link at ``path`` is replaced itself, its target is
    never written. The temporary file is removed if ``write`` fails, and any left by an
    interrupted run are removed first.
    """
    path = os.fspath(path)
    folder, stem, ext = _split(path)
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=stem + ".", suffix=".tmp" + ext)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a report or checkpoint is an ordinary file
    finally:
        os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: PathLike, text: str) -> None:
    """:func:`write_replacing` of a text file."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    write_replacing(path, write)

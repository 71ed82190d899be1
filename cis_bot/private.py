"""Files and directories for their owner only: 0700 directories, 0600 files, whatever the umask.

The state directory holds secrets (access tokens and password hashes in the homeserver's
database, appservice tokens, transcripts, task outputs), so everything cis_bot writes under it
goes through here. The process umask is left alone: tasks inherit it, and the files they make in
a user's work directory must come out as that user expects.

Like ``errors.py``, this module imports nothing of cis_bot, so every part may use it (the
embedded homeserver too, for its database and media).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

DIR_MODE = 0o700
FILE_MODE = 0o600


def make_dirs(path: Path) -> Path:
    """``path`` as a directory, with its missing parents, each 0700 (an existing one that is
    ours is made 0700 too). NotADirectoryError when it is something else."""
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(20, "Not a directory", str(path))
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # made meanwhile by another process
            directory.mkdir(DIR_MODE)
        directory.chmod(DIR_MODE)  # the umask may have taken bits away
    fix_mode(path)
    return path


def fix_mode(path: Path) -> None:
    """Make ``path`` 0700 (a directory) or 0600 (anything else) if it is ours and is not; a
    symbolic link, or what another user owns, is left alone."""
    st = os.lstat(path)
    if st.st_uid != os.geteuid() or stat.S_ISLNK(st.st_mode):
        return
    wanted = DIR_MODE if stat.S_ISDIR(st.st_mode) else FILE_MODE
    if stat.S_IMODE(st.st_mode) != wanted:
        path.chmod(wanted)


def open_file(path: Path, flags: int) -> int:
    """``os.open`` for a file created 0600 (an existing one of ours is made 0600)."""
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    try:
        st = os.fstat(fd)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != FILE_MODE:
            os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_file(path: Path, data: str | bytes) -> None:
    """Write ``path`` whole, 0600, atomically: a reader sees the old content or the new."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = open_file(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        temporary.replace(path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def fix_tree(root: Path) -> int:
    """Make everything of ours under ``root`` (and ``root``) 0700 / 0600; returns how many
    modes were changed."""
    changed = 0
    stack = [root]
    while stack:
        directory = stack.pop()
        with contextlib.suppress(FileNotFoundError):
            before = os.lstat(directory).st_mode
            fix_mode(directory)
            changed += before != os.lstat(directory).st_mode
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    st = entry.stat(follow_symlinks=False)
                    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid():
                        continue
                    if stat.S_IMODE(st.st_mode) != FILE_MODE:
                        Path(entry.path).chmod(FILE_MODE)
                        changed += 1
    return changed

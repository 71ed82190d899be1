"""libc's ``posix_spawn`` through ctypes: a process started as the leader of a new session, with
a terminal as its controlling terminal, in one exec.

``os.posix_spawn`` cannot change the child's directory, and ``subprocess`` cannot give it a
controlling terminal without running code in the child (which rules out vfork), so without this
every agent went through util-linux ``setsid --ctty``: an extra exec per session (about 0.6 ms of
CPU) and a longer wait for the parent. Here the child is set up by libc before its exec: signals
back to their defaults and none blocked, ``setsid`` (``POSIX_SPAWN_SETSID``), the working
directory (``posix_spawn_file_actions_addchdir_np``), then the terminal opened by path as stdin,
which for a session leader without one makes it the controlling terminal (Linux's rule for an
open without ``O_NOCTTY``), and dup'd onto stdout and stderr; every other descriptor closed
(``addclosefrom_np`` where libc has it; ours are close-on-exec anyway). An exec failure comes
back as the error number, the failed child already reaped by libc. (glibc leaves its two
internal signals, 32 and 33, ignored in the child: programs do not use them, glibc's own set
their handlers when they need them.)

Needs glibc 2.29 or musl 1.1.24 (``addchdir_np``); ``available()`` says whether this libc has
what it takes, and the caller falls back to the other ways (``spawn.py``). (The call waits for
the child's exec, as vfork does. Making it from another thread, which ctypes would allow since
it releases the GIL, was measured slower: the loop then sends the room's events in smaller
batches, and each spawn waits for the GIL to come back.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

POSIX_SPAWN_SETSIGDEF = 0x04
POSIX_SPAWN_SETSIGMASK = 0x08
POSIX_SPAWN_SETSID = 0x80
# Opaque libc types, given more room than any libc needs (glibc on x86-64: 80, 336, 128 bytes).
_FILE_ACTIONS_BYTES = 256
_ATTR_BYTES = 1024
_SIGSET_BYTES = 256


def _load() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        required = (
            "posix_spawn",
            "posix_spawn_file_actions_init",
            "posix_spawn_file_actions_destroy",
            "posix_spawn_file_actions_addopen",
            "posix_spawn_file_actions_adddup2",
            "posix_spawn_file_actions_addchdir_np",
            "posix_spawnattr_init",
            "posix_spawnattr_destroy",
            "posix_spawnattr_setflags",
            "posix_spawnattr_setsigdefault",
            "posix_spawnattr_setsigmask",
            "sigemptyset",
            "sigaddset",
        )
        for function in required:
            getattr(libc, function)
    except (OSError, AttributeError, TypeError):
        return None
    pointer, text = ctypes.c_void_p, ctypes.c_char_p
    libc.posix_spawn.argtypes = [
        ctypes.POINTER(ctypes.c_int),
        text,
        pointer,
        pointer,
        pointer,
        pointer,
    ]
    libc.posix_spawn_file_actions_addopen.argtypes = [
        pointer,
        ctypes.c_int,
        text,
        ctypes.c_int,
        ctypes.c_uint,
    ]
    libc.posix_spawn_file_actions_adddup2.argtypes = [pointer, ctypes.c_int, ctypes.c_int]
    libc.posix_spawn_file_actions_addchdir_np.argtypes = [pointer, text]
    libc.posix_spawnattr_setflags.argtypes = [pointer, ctypes.c_short]
    libc.sigaddset.argtypes = [pointer, ctypes.c_int]
    return libc


_libc = _load()
_closefrom = getattr(_libc, "posix_spawn_file_actions_addclosefrom_np", None)


def available() -> bool:
    return _libc is not None


def _strings(items: Iterable[bytes]) -> ctypes.Array[ctypes.c_char_p]:
    values = list(items)
    array = (ctypes.c_char_p * (len(values) + 1))(*values)
    array[len(values)] = None
    return array


class Spawn:
    """One ``posix_spawn`` call: set up, then made by ``run`` (once: it also frees what was
    set up)."""

    def __init__(
        self,
        path: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: Path,
        terminal: str,
        default_signals: Iterable[signal.Signals],
    ) -> None:
        """Start ``path`` (absolute) with ``argv`` as a session leader whose stdin, stdout,
        stderr and controlling terminal are ``terminal`` (a tty's path). OSError when the
        set-up fails."""
        libc = _libc
        if libc is None:
            raise OSError("posix_spawn is not available")
        self._libc = libc
        self._path = os.fsencode(path)
        self._argv = _strings(os.fsencode(arg) for arg in argv)
        self._env = _strings(os.fsencode(f"{k}={v}") for k, v in env.items())
        self._actions = ctypes.create_string_buffer(_FILE_ACTIONS_BYTES)
        self._attr = ctypes.create_string_buffer(_ATTR_BYTES)
        _check(libc.posix_spawn_file_actions_init(self._actions))
        try:
            _check(libc.posix_spawnattr_init(self._attr))
        except OSError:
            libc.posix_spawn_file_actions_destroy(self._actions)
            raise
        try:
            self._set_up(cwd, terminal, default_signals)
        except OSError:
            self._free()
            raise

    def _set_up(self, cwd: Path, terminal: str, default_signals: Iterable[signal.Signals]) -> None:
        libc, actions, attr = self._libc, self._actions, self._attr
        _check(libc.posix_spawn_file_actions_addchdir_np(actions, os.fsencode(cwd)))
        _check(
            libc.posix_spawn_file_actions_addopen(actions, 0, os.fsencode(terminal), os.O_RDWR, 0)
        )
        _check(libc.posix_spawn_file_actions_adddup2(actions, 0, 1))
        _check(libc.posix_spawn_file_actions_adddup2(actions, 0, 2))
        if _closefrom is not None:
            _check(_closefrom(actions, 3))
        defaults = ctypes.create_string_buffer(_SIGSET_BYTES)
        mask = ctypes.create_string_buffer(_SIGSET_BYTES)
        _check(libc.sigemptyset(defaults))
        for sig in default_signals:
            _check(libc.sigaddset(defaults, int(sig)))
        _check(libc.sigemptyset(mask))
        _check(libc.posix_spawnattr_setsigdefault(attr, defaults))  # copied into attr
        _check(libc.posix_spawnattr_setsigmask(attr, mask))
        flags = POSIX_SPAWN_SETSIGDEF | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSID
        _check(libc.posix_spawnattr_setflags(attr, flags))

    def run(self) -> int:
        """Spawn; the child's pid. OSError (its exec's error) when it could not start."""
        try:
            pid = ctypes.c_int()
            result = self._libc.posix_spawn(
                ctypes.byref(pid), self._path, self._actions, self._attr, self._argv, self._env
            )
            _check(result)
            return pid.value
        finally:
            self._free()

    def _free(self) -> None:
        self._libc.posix_spawnattr_destroy(self._attr)
        self._libc.posix_spawn_file_actions_destroy(self._actions)


def _check(result: int) -> None:
    """posix_spawn and its helpers return an error number (0: fine); sigset helpers -1."""
    if result == 0:
        return
    number = ctypes.get_errno() if result < 0 else result
    raise OSError(number, os.strerror(number))

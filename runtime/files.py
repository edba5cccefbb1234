"""Reading files the runtime did not write: regular files only, size checked before reading.

Images and manifests arrive from cameras, downloads and USB sticks. Three things
must never happen when one of them is opened: a hang (``open`` on a FIFO blocks
until a writer appears; ``/dev/zero`` never ends), a read that exhausts memory
(the size is checked against a limit before a byte is read), and an error message
that shows the file's contents (a link to a secret would leak its first bytes to
whoever sees the message).

Decisions:

- ``os.stat`` (following links) classifies the path first, so a link loop, a
  dangling link, a FIFO, a device, a socket and a directory each get their own
  message instead of "does not exist" or "is empty".
- The file is then opened with ``O_NONBLOCK`` and checked again with ``fstat``:
  a path swapped for a FIFO between the two calls still cannot block, and the
  check applies to what was actually opened.
- The caller supplies the error type (:class:`ImageDecodeError` for images,
  :class:`BundleError` for manifests) so each boundary keeps its own typed error.
"""
from __future__ import annotations

import errno
import os
import stat
from typing import Callable, NoReturn

__all__ = ["read_regular_file", "regular_file_size", "describe_kind"]

#: ``refuse(problem, fix)`` raises the caller's typed error; it never returns.
Refuse = Callable[[str, str], NoReturn]


def describe_kind(mode: int) -> str:
    """What a non-regular file is, in words a user recognises."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "an unknown kind of file"


def regular_file_size(path: str | os.PathLike[str], refuse: Refuse, max_bytes: int | None = None) -> int:
    """The size of ``path`` after checking it is a readable regular file within ``max_bytes``."""
    name = os.fspath(path)
    if "\x00" in name:
        refuse("path contains a NUL byte", "pass a file path, not file contents")
    try:
        info = os.stat(name)
    except OSError as exc:
        _refuse_stat_error(name, exc, refuse)
    _check_regular(info, max_bytes, refuse)
    return int(info.st_size)


def read_regular_file(path: str | os.PathLike[str], max_bytes: int, refuse: Refuse) -> bytes:
    """The bytes of regular file ``path``; refuses anything else, or a file over ``max_bytes``."""
    name = os.fspath(path)
    regular_file_size(name, refuse, max_bytes)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(name, flags)
    except OSError as exc:
        _refuse_stat_error(name, exc, refuse)
    with os.fdopen(fd, "rb") as f:
        # The path may have been replaced since the stat: judge what was opened.
        opened = os.fstat(f.fileno())
        _check_regular(opened, max_bytes, refuse)
        try:
            data = f.read(opened.st_size + 1)  # one byte more: a file that grew is noticed
        except OSError as exc:
            refuse(f"file cannot be read ({exc.strerror or type(exc).__name__})", "check the file and the disk")
    if len(data) > opened.st_size:
        refuse("file grew while it was read", "pass a file that is no longer being written")
    return data


def _check_regular(info: os.stat_result, max_bytes: int | None, refuse: Refuse) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = describe_kind(info.st_mode)
        if stat.S_ISDIR(info.st_mode):
            refuse("path is a directory, not a file", "pass the path of one file")
        refuse(f"not a regular file: it is {kind}", "pass the path of a regular file; the runtime does not read pipes, "
                                               "devices or sockets")
    if max_bytes is not None and info.st_size > max_bytes:
        refuse(f"file is {info.st_size} bytes, over the limit of {max_bytes} bytes",
               "pass a smaller file, or raise the limit if the file is genuine")


def _refuse_stat_error(name: str, exc: OSError, refuse: Refuse) -> NoReturn:
    code = exc.errno
    if code == errno.ELOOP:
        refuse("symlink loop (too many levels of symbolic links)", "point the link at a real file")
    if code == errno.ENOENT:
        if os.path.islink(name):
            refuse("dangling symlink (its target does not exist)", "point the link at a real file")
        refuse("file does not exist", f"check the path (working directory: {os.getcwd()!r})")
    if code == errno.ENAMETOOLONG:
        refuse(f"path is too long ({len(name)} characters)", "pass a shorter path")
    if code == errno.ENOTDIR:
        refuse("a folder in the path is a file", "check the path")
    if code in (errno.EACCES, errno.EPERM):
        refuse("permission denied", "check the file's permissions")
    refuse(f"file cannot be opened ({exc.strerror or type(exc).__name__})", "check the path and the file")

"""Atomic file and directory writes: nothing half-written ever stands where a good file stood.

- :func:`atomic_write_bytes` / :func:`atomic_write_text`: a temporary file beside the target, fsync,
  rename.
- :func:`atomic_write_dir`: a directory filled in a sibling temporary directory, fsync'ed, then
  swapped into place (one ``renameat2(RENAME_EXCHANGE)`` on Linux, two renames elsewhere).
- :func:`check_output_path`: refuse an output that is, contains or lies inside an input.
- :func:`exclusive_lock`: one process at a time builds a cache entry (others wait, then read it).

Nothing here knows what the files hold; what a model folder is lives in :mod:`mergelab.core.checkpoint`.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from mergelab.core.errors import InputError


def _is_within(a: Path, b: Path) -> bool:
    """True if ``a`` is ``b`` or inside it."""
    try:
        a.relative_to(b)
        return True
    except ValueError:
        return False


def check_output_path(out: str | os.PathLike[str], inputs: Iterable[str | os.PathLike[str]]) -> Path:
    """Refuse an output path that is, contains, or lies inside one of the input paths."""
    out_p = Path(out).expanduser().resolve()
    for spec in inputs:
        inp = Path(spec).expanduser()
        if not inp.exists():
            continue
        inp = inp.resolve()
        if _is_within(out_p, inp) or _is_within(inp, out_p):
            raise InputError(f"output path {out} would overwrite the input {spec}; choose another --out")
    return out_p


def _tmp_tag() -> str:
    """``<host>-<pid>``: whose temporary directory this is (see :func:`_remove_dead_tmp`)."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    return f"{host}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists, under another user
        return True
    return True


def _remove_dead_tmp(out: Path) -> None:
    """Remove temporary directories beside ``out`` left by killed writers on this host.

    Only ``.<name>.tmp-<host>-<pid>-*`` of this host whose process is gone; never the ``.old-*``
    copy (between the two renames of a replacement it may be the only copy of the previous output).
    """
    host = _tmp_tag().rsplit("-", 1)[0]
    prefix = f".{out.name}.tmp-{host}-"
    for p in out.parent.glob(f"{glob.escape(prefix)}*"):
        pid = p.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    """Flush the files under ``root`` to disk, so that a rename never publishes unwritten data."""
    for f in sorted(root.rglob("*")):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_write_dir(out: Path, fill: Callable[[Path], None], *,
                     replaceable: Callable[[Path], None] | None = None) -> Path:
    """Create a directory at ``out`` by ``fill(tmp_dir)`` in a sibling temporary directory + rename.

    ``replaceable(out)`` may refuse (raise) to replace what stands at ``out``; see
    :func:`mergelab.core.checkpoint.write_model_dir`, which refuses anything but a model folder. An existing
    ``out`` is swapped with the new directory in one atomic step where the system allows it (Linux).
    A writer killed mid-way leaves ``out`` as it was and its temporary directory beside it; the next
    write to ``out`` on this host removes such leftovers of dead processes.
    """
    out = Path(out)
    if replaceable is not None:
        replaceable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_tmp(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{_tmp_tag()}-", dir=out.parent))
    try:
        fill(tmp)
        _fsync_tree(tmp)
        if out.is_dir() and not out.is_symlink() and _exchange(tmp, out):
            shutil.rmtree(tmp, ignore_errors=True)  # now holds the previous output
        elif out.exists():
            # no atomic exchange (not Linux, or a file system without it): two renames; a kill between
            # them leaves the previous output at .<name>.old-<pid>
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it into place.

    The file gets the usual permissions (0666 less the umask), not ``mkstemp``'s private 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


@contextmanager
def exclusive_lock(target: str | os.PathLike[str]) -> Iterator[None]:
    """Hold an exclusive advisory lock for ``target`` (an empty file ``.locks/NAME`` beside it) while the block runs.

    Two processes that fill the same cache entry (two benchmark runs, sweep trials on one machine) then
    build it once: the second waits, and finds the entry when it gets the lock. ``flock`` locks go with
    the open file, so they are released when the holder exits or dies, and never go stale. Where
    ``fcntl`` does not exist (Windows) the block runs unlocked: at worst an entry is built twice, and
    the atomic rename keeps it whole.
    """
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover  (Windows)
        yield
        return
    path = Path(target)
    locks = path.parent / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / path.name, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_text", "check_output_path", "exclusive_lock"]

"""What every CLI of the toolchain shares (compress, export, runtime): one-line argparse errors,
the output location reserved before any expensive work, one whole-directory atomic publish,
and one line (never a traceback) for filesystem errors and Ctrl-C.

    with reserve_output(args.out, kind="dir", accepts=looks_like_mine):   # validated + locked
        ...expensive work...
        with staging_dir(out) as tmp:                                      # published in one swap
            write files into tmp

Standard library only, below every stage (calibration_data -> compress -> export -> runtime), so
importing it loads no framework: runtime's CLI stays usable on a machine without torch.
"""
from __future__ import annotations

import argparse
import errno
import fcntl
import logging
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .files import atomic_path, atomic_write_bytes, atomic_write_text, figure_png, json_text, write_json
from .gpus import nvidia_smi_gpus

__all__ = ["OneLineParser", "OutputError", "atomic_path", "atomic_write_bytes", "atomic_write_text", "figure_png",
           "json_text", "nvidia_smi_gpus", "option_value", "oserror_line", "publish_dir", "remove_stale", "reserve_output", "run_cli",
           "staging_dir", "write_json"]

log = logging.getLogger(__name__)

# What a killed run leaves: staging folders beside the output (.<name>.tmp-*, .<name>.old-*), the
# temporary file of an atomic single-file writer (.<name>.<random>.tmp), export's former in-place
# staging folder, and report writers' temporary files inside an output folder.
STALE_SIBLINGS = (".{name}.tmp-*", ".{name}.old-*", ".{name}.*.tmp")
STALE_INSIDE = (".export-*", ".*.json.*.tmp", ".*.md.*.tmp", ".*.png.*.tmp")


# Library warnings that would add lines to a one-line error and that the error itself explains.
QUIET_WARNINGS = (r"Detected pickle protocol",)  # torch's weights-only unpickler on a foreign pickle


class OutputError(ValueError):
    """An output location this run cannot create, replace or lock (a user error: exit code 2)."""


class OneLineParser(argparse.ArgumentParser):
    """argparse with compress's error form: one line and exit code 2 instead of a usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def oserror_line(e: OSError, path: str | Path | None = None) -> str:
    """'cannot access PATH: cause' for any OSError (the path from the error, else ``path``)."""
    where = e.filename if e.filename is not None else path
    cause = e.strerror or str(e) or type(e).__name__
    if getattr(e, "filename2", None):
        where = f"{where} -> {e.filename2}"
    return f"{'cannot access ' + str(where) + ': ' if where is not None else ''}{cause}".splitlines()[0]


def run_cli(body: Callable[[], int], user_errors: tuple[type[BaseException], ...] = (),
            code_of: Callable[[BaseException], int] = lambda e: 2, prefix: str = "error: ",
            is_user_error: Callable[[BaseException], bool] | None = None) -> int:
    """``body()``, with user errors, OSErrors and Ctrl-C answered in one line on stderr:
    user errors exit ``code_of(e)`` (2), OSError 1 (a filesystem fault), Ctrl-C 130.
    Anything else is a programming error and raises as usual."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    try:
        return body()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - re-raised below unless it is one of ours
        if isinstance(e, (OutputError, *user_errors)) or (is_user_error is not None and is_user_error(e)):
            text = str(e).strip()
            print(f"{prefix}{text.splitlines()[0] if text else type(e).__name__}", file=sys.stderr)
            return code_of(e)
        if isinstance(e, OSError):
            print(f"{prefix}{oserror_line(e)}", file=sys.stderr)
            return 1
        raise


def _check_path(path, kind: str, accepts, what: str) -> Path:
    if path is None or not str(path).strip():
        raise OutputError(f"{what} is empty; give a {'directory' if kind == 'dir' else 'file'} path")
    p = Path(path).expanduser().absolute()
    if p.name in ("", ".", ".."):
        raise OutputError(f"{what} {path} names no {'directory' if kind == 'dir' else 'file'} of its own")
    if p.exists() or p.is_symlink():
        if kind == "dir" and not p.is_dir():
            raise OutputError(f"{what} {p} exists and is not a directory; choose a new path")
        if kind == "file" and p.is_dir():
            raise OutputError(f"{what} {p} is a directory; give a file path")
        reason = accepts(p) if accepts is not None else None
        if reason:
            raise OutputError(f"{what} {p} {reason}")
    anc = p.parent
    while not anc.exists():
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot create {what} {p}: {anc} is a file, not a directory")
    return p


def _probe_writable(d: Path, what: str, p: Path) -> None:
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {what} {p}: {d}: {e.strerror or e}") from None


def _make_parents(d: Path, what: str, p: Path) -> list[Path]:
    """mkdir -p d; returns the folders it created (deepest last) so a failed run can remove them."""
    missing = []
    q = d
    while not q.exists():
        missing.append(q)
        q = q.parent
    _probe_writable(q, what, p)
    for m in reversed(missing):
        try:
            m.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise OutputError(f"cannot create {what} {p}: {m}: {e.strerror or e}") from None
    return list(reversed(missing))


@contextmanager
def _lock(p: Path, what: str) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``p``; a second run refuses at once."""
    lock = p.parent / f".{p.name}.lock"
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot lock {what} {p}: {lock}: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise OutputError(f"another run (pid {holder}) is writing {p}; wait for it to finish or "
                                  f"choose another {what}") from None
            raise OutputError(f"cannot lock {what} {p}: {lock}: {e.strerror or e}") from None
        try:  # the holder before us may have unlinked the file we opened: lock the current one
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        except OSError:
            pass
        os.close(fd)


def remove_stale(p: Path) -> list[Path]:
    """Delete the staging folders killed runs left for output ``p`` (call with its lock held)."""
    found = [q for pat in STALE_SIBLINGS for q in p.parent.glob(pat.format(name=p.name))]
    if p.is_dir():
        found += [q for pat in STALE_INSIDE for q in p.glob(pat)]
    for q in found:
        log.info("removing %s, left by an interrupted run", q)
        if q.is_dir() and not q.is_symlink():
            shutil.rmtree(q, ignore_errors=True)
        else:
            q.unlink(missing_ok=True)
    return found


@contextmanager
def reserve_output(path, kind: str = "dir", accepts: Callable[[Path], str | None] | None = None,
                   what: str = "--out") -> Iterator[Path]:
    """Validate and lock an output path before any expensive work; yields it absolute.

    Refuses (OutputError, one line) an empty path, a file where a directory is wanted (or the
    reverse), an existing path ``accepts`` rejects (it returns the reason), a parent that is a
    file or cannot be written, and a path another run holds. Missing parent folders are created
    and removed again if the body fails; staging folders of killed runs are deleted.
    """
    if kind not in ("dir", "file"):
        raise ValueError(f"kind must be 'dir' or 'file', got {kind!r}")
    p = _check_path(path, kind, accepts, what)
    created = _make_parents(p.parent, what, p)
    ok = False
    try:
        with _lock(p, what):
            remove_stale(p)
            yield p
        ok = True
    finally:
        if not ok:
            for d in reversed(created):  # deepest first; only if still empty
                try:
                    d.rmdir()
                except OSError:
                    break


def publish_dir(tmp: Path, out: Path) -> None:
    """Replace ``out`` by the finished folder ``tmp`` (a sibling): one rename when ``out`` is
    new; else old aside, new in, old removed (a crash between leaves a stale .old-, removed on rerun)."""
    os.chmod(tmp, 0o755)
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


@contextmanager
def staging_dir(out: str | Path) -> Iterator[Path]:
    """An empty folder beside ``out``; when the block ends normally it becomes ``out`` in one
    swap (publish_dir), on any exception (Ctrl-C included) it is deleted and ``out`` is untouched.
    An OSError without a file name gets ``out`` as its file name, so its one line names a path."""
    out = Path(out).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        publish_dir(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None:
            e.filename = str(out)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def option_value(text: str) -> tuple[str, object]:
    """argparse type of a repeatable KEY=VALUE option: the value as bool, int, float or string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    lowered = value.lower()
    if lowered in ("true", "false"):
        return key, lowered == "true"
    for cast in (int, float):
        try:
            return key, cast(value)
        except ValueError:
            pass
    return key, value

"""Writing files safely: atomic writes whose failures are one sentence, and the run-directory lock.

Atomic writes. :func:`atomic_write` calls a writer on a temporary file in the target's folder
(``.NAME.PID.RANDOM.tmp``), fsyncs it and renames it onto the target, so readers see the old file or the new one,
never a partial one. When the writer fails for a reason of the machine (a full disk, a read-only folder, a quota,
a missing permission), the temporary file is removed, the old file is left as it was, and a :class:`WriteError`
(a :class:`~landscape.errors.LandscapeError`) names the path and the cause. The libraries that write for us wrap
the operating system's error in their own: safetensors in ``SafetensorError("... (os error 28)")``, torch's
zip writer in ``RuntimeError("... unexpected pos ...")``, h5py in ``OSError`` with ``errno = 28`` in its text;
:func:`os_error_of` recovers the original, and :func:`open_capturing` hands a writer a file object that keeps
the error its ``write`` raised.

The lock. One writer at a time per run directory: ``landscape train`` holds an exclusive ``flock`` on
``RUN/.lock`` while it works; an analysis holds a shared one (several analyses of one run may compute at once)
and appends its results under an exclusive lock on ``RUN/analysis/.lock``, re-reading the file inside it. A
process that cannot take the run's lock gets one sentence naming the holder's pid. The operating system releases
a ``flock`` when its process ends, however it ends, so a killed process never leaves a run locked.

Temporary files carry their writer's pid, so :func:`remove_stale_temporaries` removes those of dead processes
only and never the file a live writer is filling.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import fcntl
import glob
import os
import re
import secrets
import time
import typing
from pathlib import Path
from typing import Any, Iterator

from landscape.errors import LandscapeError

LOCK_NAME = ".lock"


class WriteError(LandscapeError):
    """A file could not be written for a reason of the machine; ``path``, ``errno`` and ``strerror`` say which
    file and why. Nothing that was saved before is changed."""

    def __init__(self, message: str, *, path: Path | None = None, error: OSError | None = None):
        super().__init__(message)  # the keywords are optional so that it can be unpickled (from a study's worker)
        self.path = path
        self.errno = error.errno if error is not None else None
        self.strerror = (error.strerror or str(error)) if error is not None else None


# -- what went wrong ----------------------------------------------------------------------------------------------
_ERRNO_IN_TEXT = (re.compile(r"os error (\d+)"), re.compile(r"errno\s*=\s*(\d+)"), re.compile(r"\[Errno (\d+)\]"))


def os_error_of(error: BaseException) -> OSError | None:
    """The operating system's error behind ``error``: itself if it is an ``OSError``, one in its chain of causes,
    or one rebuilt from an errno in its text (safetensors, h5py); ``None`` when it is not an I/O failure."""
    seen = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return current
        for pattern in _ERRNO_IN_TEXT:
            match = pattern.search(str(current))
            if match:
                code = int(match.group(1))
                return OSError(code, os.strerror(code))
        current = current.__cause__ or current.__context__
    if isinstance(error, OSError):
        return error
    return None


def describe_os_error(error: OSError) -> str:
    """The cause in words, with advice for the failures a user can act on."""
    text = (error.strerror or str(error)).rstrip(".")
    advice = {
        _errno.ENOSPC: "free some space or write elsewhere",
        _errno.EDQUOT: "free some space or write elsewhere",
        _errno.EFBIG: "free some space or write elsewhere",
        _errno.EROFS: "the file system is mounted read-only; write elsewhere",
        _errno.EACCES: "write to a folder you may write to",
        _errno.EPERM: "write to a folder you may write to",
    }.get(error.errno)
    return f"{text}; {advice}" if advice else text


def write_error(path: str | os.PathLike, error: OSError, *, kept: str | None = None) -> WriteError:
    """The one-sentence :class:`WriteError` for a failed write of ``path``."""
    path = Path(path)
    kept = kept or ("the previous version is kept" if path.exists() else "nothing already saved was changed")
    return WriteError(f"Could not write {path} ({describe_os_error(error)}); {kept}.", path=path, error=error)


class _CapturingFile:
    """A binary file for writers that wrap the errors of ``write`` in their own (torch's zip writer):
    ``error`` keeps the ``OSError`` so the caller can report it."""

    def __init__(self, f: typing.BinaryIO):
        self._f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self._f.flush()
        except OSError as e:
            self.error = e
            raise

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, *args) -> int:
        return self._f.seek(*args)

    def seekable(self) -> bool:
        return self._f.seekable()


@contextlib.contextmanager
def open_capturing(path: str | os.PathLike) -> Iterator[_CapturingFile]:
    """Open ``path`` for binary writing; an exception raised inside becomes the ``OSError`` that ``write``
    raised, when there was one (so that ``torch.save(obj, f)`` on a full disk reports ENOSPC, not a zip error)."""
    with open(path, "wb") as raw:
        f = _CapturingFile(raw)
        try:
            yield f
        except Exception as e:
            if f.error is not None and f.error is not e:
                raise f.error from None
            raise


# -- atomic writes ------------------------------------------------------------------------------------------------
def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temporary_name(path: Path) -> str:
    """The prefix of ``path``'s temporary files: ``.NAME.PID.`` (the pid tells a live writer from a dead one)."""
    return f".{temporary_stem(path)}.{os.getpid()}."


def temporary_stem(path: Path) -> str:
    """``path``'s name, or for a name so long that the temporary's would pass the file system's 255 bytes, its
    first 150 bytes (whole characters) and 10 hex digits of its SHA-1 (every name the file system takes stays
    writable)."""
    name = path.name
    if len(os.fsencode(name)) <= 200:
        return name
    import hashlib

    head = name[:150]
    while len(os.fsencode(head)) > 150:  # bytes, not characters: 数 takes three
        head = head[:-1]
    return f"{head}~{hashlib.sha1(os.fsencode(name)).hexdigest()[:10]}"


def atomic_write(path: str | os.PathLike, write: typing.Callable[[Path], Any], *, kept: str | None = None) -> None:
    """Call ``write(tmp_path)``, fsync the result and rename it onto ``path``.

    The temporary file lives in the same directory (so the rename is atomic on POSIX) and is removed if anything
    fails, leaving any previous ``path`` untouched. A failure of the machine (full disk, read-only folder, quota,
    permissions; also as wrapped by safetensors, torch or h5py) is raised as one :class:`WriteError` sentence;
    ``kept`` replaces its last clause (what is still safe). Other exceptions (programming errors) pass unchanged.
    Once written, the temporary files of ``path`` that killed writers left behind are removed.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            # The name is held before the file exists, so a signal that lands just after the file is created
            # (SIGTERM turned into an exception) still finds it below and removes it.
            tmp = path.parent / f"{temporary_name(path)}{secrets.token_hex(6)}.tmp"
            try:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                break
            except FileExistsError:
                tmp = None
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make 0600 files; runs are meant to be shared
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # what a killed writer of this same file left (a figure, a report, outside any run's own sweep)
        _remove_stale(path.parent.glob(f".{glob.escape(temporary_stem(path))}.*.tmp"))
    except BaseException as e:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
        interrupt = _interrupt_behind(e)
        if interrupt is not None:  # Ctrl-C or SIGTERM/SIGHUP inside the writer, whose clean-up then failed too
            # (torch.save's zip writer: "unexpected pos"): the interrupt is what happened, and it ends the command
            raise interrupt from None
        cause = os_error_of(e) if isinstance(e, Exception) and not isinstance(e, LandscapeError) else None
        if cause is not None:
            raise write_error(path, cause, kept=kept) from None
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def _interrupt_behind(error: BaseException) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl-C, or a SIGTERM/SIGHUP raised as one) that ``error`` was raised while handling, if any."""
    seen = error.__context__
    for _ in range(16):
        if seen is None:
            return None
        if isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__context__
    return None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, kept: str | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), kept=kept)


def atomic_write_text(path: str | os.PathLike, text: str, *, kept: str | None = None) -> None:
    atomic_write_bytes(path, text.encode(), kept=kept)


def check_writable(folder: str | os.PathLike) -> Path:
    """Write (then remove) a small file in ``folder``, or in its nearest existing parent when it is yet to be made
    (it is made by the first write, so a refusal leaves no empty folder behind), so that work whose results go
    there can be refused before it starts, not after: a read-only or permission-denied folder is one
    :class:`WriteError` sentence."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise LandscapeError(f"{folder} exists and is not a directory.")
    probe = next((p for p in (folder, *folder.absolute().parents) if p.is_dir()), folder)
    name = probe / f"{temporary_name(probe / 'write-check')}{secrets.token_hex(6)}.tmp"
    try:
        os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise WriteError(f"Cannot write in {folder} ({describe_os_error(e)}); nothing was computed.", path=folder,
                         error=e) from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(name)
    return folder


def make_dirs(path: str | os.PathLike) -> Path:
    """``mkdir -p path``; a failure of the machine is one :class:`WriteError` sentence."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise LandscapeError(f"{path} exists and is not a directory.") from None
    except OSError as e:
        raise WriteError(f"Could not create the folder {path} ({describe_os_error(e)}).", path=path, error=e) from None
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie counts until it is reaped)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TEMP_PID = re.compile(r"^\..+\.(\d+)\.[^.]+\.tmp$")


STALE_AFTER_S = 3600.0
"""A temporary file of a live pid untouched this long is not that process's write under way."""


def remove_stale_temporaries(folder: str | os.PathLike, *, recursive: bool = False) -> list[Path]:
    """Remove the temporary files (``.*.tmp``) in ``folder`` left by processes that are no longer running (an
    interrupted write); those of a live process are kept, unless untouched for :data:`STALE_AFTER_S` (the pid
    then belongs to another process: a run copied from another machine, or a pid reused). Returns the files
    removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return _remove_stale(folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp"))


def _remove_stale(candidates: typing.Iterable[Path]) -> list[Path]:
    removed = []
    now = time.time()
    for tmp in candidates:
        match = _TEMP_PID.match(tmp.name)
        if match and (int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1)))):
            with contextlib.suppress(OSError):
                if now - tmp.stat().st_mtime < STALE_AFTER_S:
                    continue  # a write under way (each write touches the file)
        with contextlib.suppress(OSError):
            tmp.unlink()
            removed.append(tmp)
    return removed


# -- the run-directory lock ---------------------------------------------------------------------------------------
class RunBusy(LandscapeError):
    """Another landscape process holds the lock of a run directory."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return pid > 0
    return pid > 0


def _lock_pids(text: str) -> list[int]:
    """The process ids written in a lock file that are still running (one per line; analyses share a lock)."""
    pids = []
    for word in text.split():
        with contextlib.suppress(ValueError):
            pid = int(word)
            if _alive(pid) and pid not in pids:
                pids.append(pid)
    return pids


def _flock_holders(lock_path: Path) -> list[int]:
    """The processes Linux says hold a ``flock`` on ``lock_path`` (``/proc/locks``; empty where it cannot say):
    unlike the pids written in the file, never a process that has released the lock or an unrelated one that
    took a listed pid over."""
    try:
        st = os.stat(lock_path)
        table = Path("/proc/locks").read_text()
    except OSError:
        return []
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in table.splitlines():
        fields = line.split()  # "1: FLOCK  ADVISORY  READ 1234 fe:00:5678 0 EOF"; a waiter's line has "->"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == where and fields[4].isdigit():
            if int(fields[4]) not in pids:
                pids.append(int(fields[4]))
    return pids


def _holder(lock_path: Path) -> str:
    pids = _flock_holders(lock_path)
    if pids and not any(_alive(p) for p in pids):  # its forked workers (a DataLoader's) hold it for a few seconds
        return (f"the worker processes of a landscape process that has just ended (pid {pids[0]}), which end within "
                "seconds")
    if not pids:  # no /proc/locks (or a file system it does not list): the pids the holders wrote
        try:
            pids = _lock_pids(lock_path.read_text(errors="replace"))
        except OSError:
            pids = []
    if not pids:
        return "another landscape process"
    if len(pids) == 1:
        return f"another landscape process (pid {pids[0]})"
    return f"other landscape processes (pids {', '.join(map(str, pids))})"


def _acquire(lock_path: Path, mode: int, *, wait: bool, busy: typing.Callable[[], str]) -> int:
    """Open ``lock_path`` and ``flock`` it; retried when the file was replaced between the open and the lock."""
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            if e.errno in (_errno.EROFS, _errno.EACCES, _errno.EPERM) and mode == fcntl.LOCK_SH:
                return -1  # a folder nobody can write: there is no writer to keep out, and reading is safe
            raise WriteError(f"Could not lock {lock_path.parent} ({describe_os_error(e)}).", path=lock_path,
                             error=e) from None
        try:
            fcntl.flock(fd, mode | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            raise RunBusy(busy()) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _write_pid(fd: int, *, shared: bool = False) -> None:
    """Write this process's id into the lock file: alone (an exclusive holder), or beside those of the other
    holders still running (a shared one), so that a refusal names a process that holds the lock."""
    with contextlib.suppress(OSError):
        others: list[int] = []
        if shared:
            others = [p for p in _lock_pids(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")) if p != os.getpid()]
        text = "".join(f"{pid}\n" for pid in [*others, os.getpid()])
        os.ftruncate(fd, 0)
        os.pwrite(fd, text.encode(), 0)


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of the file at ``path``, in hex."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds a control character (a newline, a tab, DEL, ...), which no name printed in a table,
    a log line or a legend may hold."""
    return any(ord(c) < 32 or ord(c) == 127 for c in text)


def check_run_name(root: str | os.PathLike) -> None:
    """Refuse a new run folder whose path has a control character (a newline, a tab), which every table, log and
    figure that names the run would break on, or bytes that are not UTF-8 text."""
    if has_control_character(str(root)):
        raise LandscapeError(f"The run folder {str(root)!r} has a control character (a newline, a tab) in its name, "
                             "which would break every table, log and figure that names the run; choose another --out.")
    try:
        str(root).encode("utf-8")
    except UnicodeEncodeError:  # bytes of another encoding: safetensors and netCDF take UTF-8 paths only
        raise LandscapeError(f"The run folder {str(root)!r} has bytes in its name that are not UTF-8 text, which the "
                             "checkpoint and results files cannot be opened under; choose another --out.") from None


class RunLock:
    """The lock of one run directory, held until :meth:`release` (or the end of the process).

    ``shared=False`` (training): one holder, and no analysis at the same time. ``shared=True`` (analyses): any
    number of analyses at once, and no training. ``create`` makes the folder first (a new run).
    """

    def __init__(self, root: str | os.PathLike, *, shared: bool = False, create: bool = False):
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.created = create and not self.root.exists()  # made here: the caller may remove it when left unused
        if create:
            if self.root.exists() and not self.root.is_dir():
                raise LandscapeError(f"{self.root} exists and is not a directory.")
            check_run_name(self.root)  # a new run, also in a folder made before (empty, or overwritten)
            make_dirs(self.root)
        what = "analysing" if shared else "training into"
        self.made_file = not self.path.exists()  # the lock file is new: a caller that wrote nothing may remove it

        def busy() -> str:
            return (f"{self.root} is in use by {_holder(self.path)}; wait for it to finish or stop it before "
                    f"{what} this run{'' if shared else ', or choose another --out folder'}.")

        self._fd = _acquire(self.path, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, wait=False, busy=busy)
        if self._fd >= 0:
            _write_pid(self._fd, shared=shared)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = -1

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.release()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, doing: str) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` itself (made if missing; no lock file is left in it) while one process
    writes a set of files there, ``doing`` what the message says (``"drawing figures into"``); a second process is
    refused in one sentence instead of mixing its files with the first one's."""
    made = not Path(folder).exists()
    folder = make_dirs(folder)
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LandscapeError(f"{folder} is in use by another landscape process; wait for it to finish before "
                                 f"{doing} it, or choose another folder.") from None
        except OSError:  # a file system without locks: go on unlocked, as before
            pass
        yield folder
    finally:
        if made:  # made here and left empty (the work was refused): not left behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        os.close(fd)


@contextlib.contextmanager
def exclusive_file_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Wait for and hold an exclusive lock on ``folder/.lock`` (short critical sections: appending results)."""
    folder = make_dirs(folder)
    fd = _acquire(folder / LOCK_NAME, fcntl.LOCK_EX, wait=True, busy=lambda: "")
    try:
        _write_pid(fd)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def special_file(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is no regular file or folder (``"a named pipe (FIFO)"``, ``"a socket"``,
    ``"a device"``), else ``None``: reading a pipe would wait for a writer forever, beyond Ctrl-C's reach in
    libraries that read it natively."""
    import stat

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None  # missing or unreadable: the reader says so in its own words
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return None


def refuse_special(path: str | os.PathLike, wanted: str, *, error: type[LandscapeError] = LandscapeError,
                   advice: str = "") -> None:
    """Raise ``error("PATH is a named pipe (FIFO), not WANTED[; ADVICE].")`` when ``path`` is a pipe, a socket or a
    device (see :func:`special_file`): every reader calls this before it opens a file a user named."""
    what = special_file(path)
    if what is not None:
        raise error(f"{path} is {what}, not {wanted}{'; ' + advice if advice else ''}.")


RUN_FILES = ("config.yaml", "metrics.csv", "data.json")
"""The files a run keeps that nothing can make again (its settings, its training record, the record of its data)."""
RUN_FOLDERS = ("checkpoints", "state", "analysis", "preconditioner")
"""The folders of a run's weights, training state and measurements."""
RUN_OUTPUTS = ("figures", "report.md", "report.html")
"""What a run holds that is drawn or written from the rest (``landscape figures`` / ``report`` make it again)."""
RUN_ENTRIES = frozenset(RUN_FILES + RUN_FOLDERS + RUN_OUTPUTS)
"""Every name a run writes in its folder."""


def is_run_root(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is the root of a run: its config beside its checkpoints or its training record."""
    folder = Path(folder)
    return (folder / "config.yaml").is_file() and ((folder / "checkpoints").is_dir()
                                                   or (folder / "metrics.csv").is_file())


def figures_folder(folder: str | os.PathLike) -> Path:
    """Where figures asked for in ``folder`` go: ``folder/figures`` when ``folder`` is a run's root (which holds
    only what the run writes: figures among its own files made it look like no run), else ``folder``."""
    folder = Path(folder)
    resolved = folder.resolve()
    if resolved.name in RUN_FOLDERS and is_run_root(resolved.parent):  # among the run's checkpoints or results
        raise LandscapeError(f"{folder} is the {resolved.name}/ folder of the run {resolved.parent}, which holds "
                             "only what the run writes; draw the figures into another folder (the run's own folder "
                             "takes them in its figures/).")
    return folder / "figures" if is_run_root(folder) else folder


def refuse_overwrite(path: str | os.PathLike, what: str, suffixes: tuple[str, ...], *,
                     error: type[LandscapeError] = LandscapeError, option: str = "--out",
                     ours: typing.Callable[[str], bool] | None = None) -> None:
    """Raise ``error`` when writing ``what`` to ``path`` would replace a file it must not: a device, pipe or socket
    (the write renames a new file over the path: ``--out /dev/null`` as root would replace the device), one of a
    run's own files (its config, metrics, data record, a checkpoint, its state or an analysis result), an existing
    file of another kind than ``suffixes`` (``--out ~/.bashrc``), or, given ``ours`` (a test of the file's first
    characters), a non-empty file of that kind that this command did not write (``--out README.md``). A new path,
    or an earlier output of the same command, passes. ``option`` is the option that gave ``path``, named in the
    refusal."""
    path = Path(path)
    special = special_file(path)
    if special is not None:
        raise error(f"{path} is {special}, not a file {what} can be written to; give {option} a file path.")
    if not path.is_file():
        return
    resolved = path.resolve()
    for parent in list(resolved.parents)[:3]:
        inside = resolved.relative_to(parent).parts
        if is_run_root(parent) and (inside[0] in RUN_FOLDERS or (len(inside) == 1 and inside[0] in RUN_FILES)):
            raise error(f"{path} is a file of the run {parent}, which {what} would replace; give {option} another "
                        "path.")
    if path.suffix.lower() not in suffixes:
        raise error(f"{path} exists and is not {what} ({' or '.join(suffixes)}), so it is not replaced; give "
                    f"{option} a new path or one ending in {suffixes[0]}.")
    if ours is not None:
        try:
            with open(path, "rb") as f:
                head = f.read(4096).decode("utf-8", "replace")
        except OSError:
            return  # unreadable: the write says what is wrong
        if head.strip() and not ours(head):
            raise error(f"{path} exists and is not {what} that landscape wrote, so it is not replaced; give {option} "
                        "a new path, or move the file away first.")


def dangling(path: str | os.PathLike) -> str:
    """`` (a symbolic link to nowhere: a loop or a missing target)`` for such a link, else ``""``: what to add to
    "does not exist" so that the sentence names what is there."""
    return " (a symbolic link to nowhere: a loop or a missing target)" if os.path.islink(path) else ""

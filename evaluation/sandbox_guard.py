"""The child side of the code sandbox (evaluation/sandbox.py starts it as a script; never import it).

    python -I sandbox_guard.py --program <tmp>/program.py --dir <tmp> --memory-mb M --cpu-s C --file-mb F
                               --result-fd N [--deny <path> ...]     (stdin: a one-line nonce)

In order: read the nonce, set the OS limits (address space, CPU seconds, file size, no core files; hard
limits the program cannot raise), compile the program, install the audit hook (PEP 578; it cannot be
removed once installed), run the program as ``__main__``, and only if it returns write the
nonce to the result pipe. The parent counts a sample as passed only on that nonce, so a program that exits
early (``sys.exit(0)``, ``os._exit(0)``) before its tests ran is a failure.

The audit hook refuses, with a PermissionError that becomes the sample's reason:
- new processes and signals (fork, exec, spawn, system, subprocess, kill);
- writing, creating, renaming or deleting anything outside the temporary directory;
- reading or listing the denied paths (the run directory, the checkpoint);
- sockets, and the modules that would bypass the hook (ctypes, _posixsubprocess).
"""

import argparse
import os
import resource
import sys

BLOCKED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system", "os.startfile",
    "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "os.setuid", "os.setgid",
    "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto", "socket.sendmsg",
    "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "ctypes.call_function", "ctypes.addressof",
})  # fmt: skip
"""Events refused outright. (Not ``sys._getframe``: namedtuple, enum and typing need it. A program that went
looking through the frames for the nonce would be written to cheat, which the hook does not pretend to stop.)"""

BLOCKED_MODULES = frozenset({"ctypes", "_ctypes", "_posixsubprocess", "multiprocessing", "_multiprocessing"})

# Events whose first argument (or first two) is a path the program changes.
CHANGING_EVENTS = frozenset({
    "os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.symlink", "os.link",
    "os.truncate", "os.utime", "os.chdir", "os.chflags", "os.lchflags", "os.mkfifo", "os.mknod",
    "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.copytree",
    "shutil.chown", "shutil.make_archive", "shutil.unpack_archive",
})  # fmt: skip
LISTING_EVENTS = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.walk", "os.fwalk"})
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def make_hook(*, directory: str, deny: list[str]):
    """The audit hook: ``directory`` is the only place written to; ``deny`` is neither read nor listed."""
    directory = os.path.realpath(directory)
    deny = [os.path.realpath(d) for d in deny]
    busy = []  # re-entrancy guard: realpath itself raises no events today, but a later Python might

    def resolved(path) -> str | None:
        if isinstance(path, int) or path is None:
            return None  # an already open descriptor: its path was checked when it was opened
        return os.path.realpath(os.fsdecode(path))

    def refuse(what: str) -> None:
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event: str, args: tuple) -> None:
        if busy:
            return
        busy.append(1)
        try:
            if event in BLOCKED_EVENTS:
                refuse(event)
            elif event == "import" and args[0].split(".")[0] in BLOCKED_MODULES:
                refuse(f"import {args[0]}")
            elif event == "open":
                path, mode, flags = (tuple(args) + (None, None))[:3]
                target = resolved(path)
                writes = any(c in str(mode or "") for c in "wax+") or bool((flags or 0) & _WRITE_FLAGS)
                if target is not None and writes and not _inside(target, directory):
                    refuse(f"writing {target} (outside the sandbox directory)")
                if target is not None and any(_inside(target, d) for d in deny):
                    refuse(f"reading {target}")
            elif event in CHANGING_EVENTS:
                for path in args[:2]:
                    target = resolved(path) if isinstance(path, (str, bytes, os.PathLike)) else None
                    if target is not None and not _inside(target, directory):
                        refuse(f"{event} on {target} (outside the sandbox directory)")
            elif event in LISTING_EVENTS and args:
                target = resolved(args[0]) if isinstance(args[0], (str, bytes, os.PathLike)) else None
                if target is not None and any(_inside(target, d) for d in deny):
                    refuse(f"listing {target}")
        finally:
            busy.clear()

    return hook


def set_limits(*, memory_mb: int, cpu_s: int, file_mb: int) -> None:
    for limit, value in ((resource.RLIMIT_AS, memory_mb << 20), (resource.RLIMIT_FSIZE, file_mb << 20),
                         (resource.RLIMIT_CORE, 0)):  # fmt: skip
        resource.setrlimit(limit, (value, value))
    # The kernel sends SIGXCPU at the soft limit and SIGKILL at the hard one: a second between them lets
    # the parent tell "CPU limit" from any other kill.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--program", required=True)
    parser.add_argument("--dir", required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    parser.add_argument("--cpu-s", type=int, required=True)
    parser.add_argument("--file-mb", type=int, required=True)
    parser.add_argument("--result-fd", type=int, required=True)
    parser.add_argument("--deny", action="append", default=[])
    opts = parser.parse_args()
    nonce = sys.stdin.readline().strip()
    result = os.fdopen(opts.result_fd, "w")  # opened before the hook, which refuses nothing on it later
    with open(opts.program, encoding="utf-8") as handle:
        source = handle.read()
    code = compile(source, "program.py", "exec")
    set_limits(memory_mb=opts.memory_mb, cpu_s=opts.cpu_s, file_mb=opts.file_mb)
    sys.argv = ["program.py"]
    sys.addaudithook(make_hook(directory=opts.dir, deny=opts.deny))
    try:
        exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as stop:
        print(f"SystemExit: the program exited ({stop.code!r}) before its tests finished", file=sys.stderr)
        os._exit(3)
    except MemoryError:
        print(f"MemoryError: out of memory (the limit is {opts.memory_mb} MB)", file=sys.stderr)
        os._exit(1)
    except BaseException as err:  # noqa: BLE001 - every failure of the program is a failed sample
        print(f"{type(err).__name__}: {err}"[:500], file=sys.stderr)
        os._exit(1)
    result.write(nonce)
    result.flush()
    os._exit(0)


if __name__ == "__main__":
    main()

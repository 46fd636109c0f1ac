"""Run untrusted Python programs (model-written code) confined, one process tree per program.

Each program runs under a small launcher (a fresh `python -I -S` process, stdlib only) that builds
the confinement from what Linux gives an unprivileged process, then execs the program:

    launcher (host namespaces; writes the id maps)
      └─ unsharer: new user, mount, network, PID, IPC and UTS namespaces
           └─ init (PID 1 of the new PID namespace): private tmpfs work folder, private /proc;
              reaps orphans; when the program exits, it exits, and the kernel kills whatever is left
                └─ program (PID 2): rlimits, unprivileged uid, no_new_privs, Landlock, seccomp,
                   clean environment, then execve(python -I -B -S program.py)

The parent enforces the wall-time limit (it kills the whole launcher process group; each stage
also dies with its parent). docs/sandbox.md says which mechanism covers which threat and what is
not covered. A mechanism that cannot be set up makes the run refuse (SandboxUnavailable) unless
the caller names it in `allow_missing`; nothing ever silently runs unconfined.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from qtulu.errors import QtuluError

# Every mechanism the launcher sets up, by the name used in `allow_missing` and in reports.
MECHANISMS = (
    "userns",  # user namespace: unprivileged ids, capabilities only inside
    "mountns",  # private mounts: tmpfs work folder (size-capped), nothing leaks to the host
    "netns",  # network namespace with no interface up: no network at all
    "pidns",  # PID namespace: cannot see or signal host processes; killed as a whole
    "proc",  # a private /proc for the PID namespace (host processes invisible)
    "nproc",  # a process-count limit that binds (RLIMIT_NPROC in the fresh user namespace)
    "landlock",  # filesystem allow-list (read: interpreter + system libraries; write: work folder)
    "seccomp",  # deny-list of kernel interfaces a test program never needs (ptrace, bpf, mount...)
)
# A file the program writes to stdout/stderr is capped by RLIMIT_FSIZE; we keep this much of it.
_OUTPUT_TAIL = 16 * 1024
_SETUP_EXIT = 121  # the launcher's exit code when a required mechanism failed (details on the report pipe)
_ENV_ALLOW_UNSAFE = "QTULU_SANDBOX_ALLOW_MISSING"  # comma list of mechanisms, or "all"


class SandboxUnavailable(QtuluError):
    """A confinement mechanism could not be set up and the caller did not allow running without it."""

    exit_code = 2


@dataclass(frozen=True)
class SandboxConfig:
    """Limits for one program. Memory is per process (RLIMIT_AS); a program may have at most
    `max_processes` processes and threads, so its whole tree stays under max_processes × memory_mb."""

    timeout_s: float = 10.0  # wall time, enforced by the parent
    cpu_s: int | None = None  # CPU seconds per process (RLIMIT_CPU); default: ceil(timeout_s)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    max_processes: int = 4  # processes + threads of the program's tree (RLIMIT_NPROC)
    disk_mb: int = 32  # size of the private tmpfs work folder
    max_file_mb: int = 8  # largest file it may write, stdout/stderr included (RLIMIT_FSIZE)
    max_open_files: int = 64  # RLIMIT_NOFILE
    python: str = sys.executable  # the interpreter that runs the program
    # False: the standard library only (`python -S`; HumanEval needs nothing else, and skipping
    # site-packages' .pth start-up hooks makes each run several times faster). True: also the
    # interpreter's installed packages.
    site_packages: bool = False
    read_paths: tuple[str, ...] = ()  # extra paths the program may read (Landlock), beyond the defaults
    allow_missing: frozenset[str] = frozenset()  # mechanisms it may run without (see MECHANISMS)
    # For tests of the refusal path: behave as if these mechanisms were unavailable on this machine.
    simulate_missing: frozenset[str] = frozenset()

    def __post_init__(self):
        unknown = (set(self.allow_missing) | set(self.simulate_missing)) - set(MECHANISMS)
        if unknown:
            raise QtuluError(
                f"unknown sandbox mechanism(s) {', '.join(sorted(unknown))}: choose from {', '.join(MECHANISMS)}",
                exit_code=2,
            )
        if self.timeout_s <= 0 or self.memory_mb < 64 or self.max_processes < 1:
            raise QtuluError("sandbox limits: timeout_s > 0, memory_mb >= 64 and max_processes >= 1", exit_code=2)


def config_from_env(**overrides) -> SandboxConfig:
    """A SandboxConfig whose allow_missing also honours $QTULU_SANDBOX_ALLOW_MISSING ("all" or a
    comma list), the switch a user sets to run on a machine where a mechanism is unavailable."""
    allowed = set(overrides.pop("allow_missing", ()))
    raw = os.environ.get(_ENV_ALLOW_UNSAFE, "").strip()
    if raw:
        allowed |= set(MECHANISMS) if raw == "all" else {m.strip() for m in raw.split(",") if m.strip()}
    return SandboxConfig(allow_missing=frozenset(allowed), **overrides)


@dataclass
class RunResult:
    """What happened to one program. `passed` means it exited 0 within its limits."""

    outcome: str  # "passed" | "failed" (non-zero exit) | "killed" (a signal: CPU, file size...) | "timeout"
    returncode: int | None  # exit code, or -signal
    duration_s: float
    output: str  # the tail of its stdout+stderr
    missing: tuple[str, ...] = ()  # mechanisms it ran without (only those the caller allowed)

    @property
    def passed(self) -> bool:
        return self.outcome == "passed"


# --------------------------------------------------------------------------------------------------
# The launcher. It runs as `python -I -S -c _LAUNCHER` with a clean environment, reads its settings
# (and the program) from stdin as JSON, and reports on a pipe (fd in the settings) one JSON object
# per line: {"skipped": MECH, "message": ...} for an allowed missing mechanism, {"missing": MECH,
# "message": ...} for a required one (then exits _SETUP_EXIT), {"status": WAITSTATUS} at the end.
# Standard library only: the program's interpreter may not have qtulu installed.
_LAUNCHER = r'''
import ctypes, json, os, resource, signal, struct, sys

cfg = json.loads(sys.stdin.buffer.read())
REP = cfg["report_fd"]
ALLOW = set(cfg["allow_missing"])
SIMULATE = set(cfg["simulate_missing"])
SETUP_EXIT = cfg["setup_exit"]
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
PR_SET_PDEATHSIG, PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 8, 38, 47
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 16384, 1 << 18
INNER_ID = 1000  # the program's uid/gid inside its user namespace

def report(**kw):
    try:
        os.write(REP, (json.dumps(kw) + "\n").encode())
    except OSError:
        pass

def errmsg():
    return os.strerror(ctypes.get_errno())

def lacking(mech, message):
    """A mechanism failed: go on without it only if the caller allowed that."""
    if mech in ALLOW:
        report(skipped=mech, message=message)
        return
    report(missing=mech, message=message)
    os._exit(SETUP_EXIT)

def simulated(mech):
    if mech in SIMULATE:
        lacking(mech, "%s unavailable (simulated)" % mech)
        return True
    return False

def die_with_parent():
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

def relay(status):
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)

# ---- Landlock (raw syscalls; numbers are the same on every architecture) ----
LL_CREATE, LL_ADD_RULE, LL_RESTRICT = 444, 445, 446
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15

def landlock(read_paths, write_dir, dev_files):
    if simulated("landlock"):
        return
    abi = libc.syscall(LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return lacking("landlock", "Landlock is not available (%s)" % errmsg())
    fs = (1 << 13) - 1  # ABI 1: execute .. make_sym
    if abi >= 2:
        fs |= 1 << 13  # refer
    if abi >= 3:
        fs |= FS_TRUNCATE
    if abi >= 5:
        fs |= FS_IOCTL_DEV
    net = 3 if abi >= 4 else 0  # bind_tcp | connect_tcp, with no rule: no TCP at all
    scoped = 3 if abi >= 6 else 0  # abstract unix sockets | signals, only within the sandbox
    attr = struct.pack("=QQQ", fs, net, scoped)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    buf = ctypes.create_string_buffer(attr, 24)
    rfd = libc.syscall(LL_CREATE, buf, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if rfd < 0:
        return lacking("landlock", "landlock_create_ruleset failed (%s)" % errmsg())
    file_read = FS_EXECUTE | FS_READ_FILE
    def allow(path, access):
        try:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return  # a default path this machine does not have
        try:
            if not os.path.isdir(path):
                access &= file_read | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV
            rule = ctypes.create_string_buffer(struct.pack("=Qi", access & fs, fd), 12)
            if libc.syscall(LL_ADD_RULE, ctypes.c_int(rfd), ctypes.c_int(1), rule, ctypes.c_uint32(0)) != 0:
                lacking("landlock", "landlock_add_rule %s failed (%s)" % (path, errmsg()))
        finally:
            os.close(fd)
    for p in read_paths:
        allow(p, file_read | FS_READ_DIR)
    for p in dev_files:
        allow(p, file_read | FS_WRITE_FILE | FS_TRUNCATE)
    allow(write_dir, fs)
    if libc.syscall(LL_RESTRICT, ctypes.c_int(rfd), ctypes.c_uint32(0)) != 0:
        return lacking("landlock", "landlock_restrict_self failed (%s)" % errmsg())
    os.close(rfd)
    report(landlock_abi=abi)

# ---- seccomp, through libseccomp (resolves syscall names for the running architecture) ----
SECCOMP_DENY = (
    "ptrace process_vm_readv process_vm_writev kexec_load kexec_file_load bpf perf_event_open "
    "keyctl add_key request_key userfaultfd io_uring_setup io_uring_enter io_uring_register "
    "mount umount2 pivot_root chroot unshare setns fsopen fsconfig fsmount fspick move_mount "
    "open_tree mount_setattr init_module finit_module delete_module swapon swapoff reboot acct "
    "open_by_handle_at name_to_handle_at syslog quotactl lookup_dcookie settimeofday clock_settime "
    "adjtimex clock_adjtime vhangup uselib iopl ioperm"
).split()
NS_FLAGS = (CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET,
            0x02000000, 0x00000080)  # + CLONE_NEWCGROUP, CLONE_NEWTIME

class ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

def seccomp():
    if simulated("seccomp"):
        return
    try:
        ls = ctypes.CDLL("libseccomp.so.2", use_errno=True)
    except OSError as e:
        return lacking("seccomp", "libseccomp.so.2 not found (%s)" % e)
    ls.seccomp_init.restype = ctypes.c_void_p
    ls.seccomp_init.argtypes = [ctypes.c_uint32]
    ls.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                          ctypes.c_uint, ctypes.POINTER(ArgCmp)]
    ls.seccomp_load.argtypes = [ctypes.c_void_p]
    ls.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    eperm, enosys = 0x00050000 | 1, 0x00050000 | 38
    ctx = ls.seccomp_init(0x7FFF0000)  # default: allow
    if not ctx:
        return lacking("seccomp", "seccomp_init failed")
    def rule(action, name, cmp=None):
        nr = ls.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:
            return  # not a syscall on this architecture
        arr = (ArgCmp * 1)(cmp) if cmp is not None else None
        rc = ls.seccomp_rule_add_array(ctx, action, nr, 1 if cmp is not None else 0, arr)
        if rc != 0:
            lacking("seccomp", "seccomp rule for %s failed (%s)" % (name, os.strerror(-rc)))
    for name in SECCOMP_DENY:
        rule(eperm, name)
    for flag in NS_FLAGS:  # clone() into new namespaces; clone3 hides its flags in memory: ENOSYS
        rule(eperm, "clone", ArgCmp(0, 7, flag, flag))  # SCMP_CMP_MASKED_EQ
    rule(enosys, "clone3")
    # No unix-domain sockets: the network namespace isolates abstract ones but not those bound to
    # a path (a host daemon's socket). socketpair() stays allowed.
    rule(eperm, "socket", ArgCmp(0, 4, 1, 0))  # SCMP_CMP_EQ, AF_UNIX
    rc = ls.seccomp_load(ctx)
    if rc != 0:
        return lacking("seccomp", "seccomp_load failed (%s)" % os.strerror(-rc))

# ---- capabilities (root host only): keep CAP_DAC_READ_SEARCH across setuid and exec ----
CAP_DAC_READ_SEARCH = 2

def keep_read_search():
    hdr = ctypes.create_string_buffer(struct.pack("=Ii", 0x20080522, 0), 8)
    bit = 1 << CAP_DAC_READ_SEARCH
    data = ctypes.create_string_buffer(struct.pack("=IIIIII", bit, bit, bit, 0, 0, 0), 24)
    if libc.capset(hdr, data) != 0:
        return False
    return libc.prctl(PR_CAP_AMBIENT, 2, CAP_DAC_READ_SEARCH, 0, 0) == 0  # PR_CAP_AMBIENT_RAISE

# ---- stage 4: the program ----
def program(userns_ok):
    work = cfg["work"]
    os.chdir(work)
    if simulated("nproc"):
        pass
    elif userns_ok and cfg["host_root"]:
        # We are uid 0 inside (= host root, for which RLIMIT_NPROC does not bind): become the
        # unprivileged inner uid (host uid 65534), keeping only the right to read and search
        # (bounded by Landlock), since the interpreter may live under a root-only folder.
        libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0)
        try:
            os.setgroups([])
            os.setresgid(INNER_ID, INNER_ID, INNER_ID)
            os.setresuid(INNER_ID, INNER_ID, INNER_ID)
        except OSError as e:
            lacking("nproc", "cannot drop to an unprivileged uid (%s)" % e)
        if not keep_read_search():
            lacking("nproc", "cannot keep CAP_DAC_READ_SEARCH after dropping root (%s)" % errmsg())
    elif os.geteuid() == 0:
        lacking("nproc", "running as root without a user namespace: RLIMIT_NPROC would not bind")
    lim = cfg["limits"]
    for name, value in (("RLIMIT_CORE", 0), ("RLIMIT_AS", lim["memory"]), ("RLIMIT_FSIZE", lim["fsize"]),
                        ("RLIMIT_NOFILE", lim["nofile"])):
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu"], lim["cpu"] + 1))
    # Tasks of this (user namespace, uid) other than the program's own: the unsharer and init
    # when they share its uid (non-root host).
    nproc = lim["nproc"] + (0 if cfg["host_root"] or not userns_ok else 2)
    if "nproc" not in SIMULATE:
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        lacking("landlock", "cannot set no_new_privs (%s)" % errmsg())
    landlock(cfg["read_paths"], work, cfg["dev_files"])
    seccomp()
    os.set_inheritable(REP, False)
    os.closerange(3, REP)
    os.closerange(REP + 1, 65536)
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
    try:
        flags = ["-I", "-B"] + ([] if cfg["site_packages"] else ["-S"])
        os.execve(cfg["python"], [cfg["python"]] + flags + ["program.py"], env)
    except OSError as e:
        report(missing="exec", message="cannot start %s (%s)" % (cfg["python"], e))
        os._exit(SETUP_EXIT)

# ---- stage 3: PID 1 of the new PID namespace ----
def init():
    die_with_parent()
    work = cfg["work"]
    cfg["proc_private"] = False
    if libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        lacking("mountns", "cannot make mounts private (%s)" % errmsg())
    else:
        opts = "size=%dm,mode=0700,uid=%d,gid=%d" % (cfg["disk_mb"], INNER_ID, INNER_ID)
        if libc.mount(b"tmpfs", work.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()) != 0:
            lacking("mountns", "cannot mount a tmpfs work folder (%s)" % errmsg())
        if simulated("proc"):
            pass
        elif libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None) != 0:
            lacking("proc", "cannot mount a private /proc (%s)" % errmsg())
        else:
            cfg["proc_private"] = True
            cfg["read_paths"].append("/proc")
    path = os.path.join(work, "program.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(cfg["source"])
    os.chmod(path, 0o644)
    try:
        os.chown(path, INNER_ID, INNER_ID)
    except OSError:
        pass
    child = os.fork()
    if child == 0:
        try:
            program(True)
        except BaseException as e:  # a setup step raised: report it, never run unconfined
            report(missing="setup", message="%s: %s" % (type(e).__name__, e))
        os._exit(SETUP_EXIT)
    while True:  # reap orphans re-parented to us until the program itself exits
        pid, status = os.wait()
        if pid == child:
            report(status=status)
            relay(status)  # leaving PID 1 kills every process still in the namespace

# ---- stages 1 and 2 ----
def main():
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    unsharer = os.fork()
    if unsharer == 0:
        os.close(ready_r)
        os.close(go_w)
        die_with_parent()
        flags = CLONE_NEWUSER | CLONE_NEWIPC | CLONE_NEWUTS
        for mech, flag in (("mountns", CLONE_NEWNS), ("netns", CLONE_NEWNET), ("pidns", CLONE_NEWPID)):
            if not simulated(mech):
                flags |= flag
        ok = "userns" not in SIMULATE and libc.unshare(flags) == 0
        why = "simulated" if "userns" in SIMULATE else errmsg()
        os.write(ready_w, b"1" if ok else b"0")
        os.close(ready_w)
        if os.read(go_r, 1) != b"1":
            os._exit(SETUP_EXIT)
        if not ok:
            for mech in ("userns", "mountns", "netns", "pidns", "proc"):
                lacking(mech, "cannot create namespaces (unshare: %s)" % why)
            # Allowed to go on unconfined by namespaces: no private mounts, no PID 1 of our own.
            child = os.fork()
            if child == 0:
                cfg["proc_private"] = False
                path = os.path.join(cfg["work"], "program.py")
                with open(path, "w", encoding="utf-8") as f:
                    f.write(cfg["source"])
                try:
                    program(False)
                except BaseException as e:
                    report(missing="setup", message="%s: %s" % (type(e).__name__, e))
                os._exit(SETUP_EXIT)
            _, status = os.waitpid(child, 0)
            report(status=status)
            relay(status)
        pid1 = os.fork()
        if pid1 == 0:
            try:
                init()
            except BaseException as e:
                report(missing="setup", message="%s: %s" % (type(e).__name__, e))
            os._exit(SETUP_EXIT)
        report(init=pid1)  # its host pid: the parent waits for it to be gone
        _, status = os.waitpid(pid1, 0)
        relay(status)
    os.close(ready_w)
    os.close(go_r)
    if os.read(ready_r, 1) == b"1":
        try:
            if cfg["host_root"]:
                # Inner 0 = host root (for the set-up only); inner 1000 = host nobody (the program).
                maps = ("0 0 1\n%d 65534 1\n" % INNER_ID, "0 0 1\n%d 65534 1\n" % INNER_ID)
            else:
                with open("/proc/%d/setgroups" % unsharer, "w") as f:
                    f.write("deny")
                maps = ("%d %d 1\n" % (INNER_ID, os.geteuid()), "%d %d 1\n" % (INNER_ID, os.getegid()))
            for name, text in zip(("uid_map", "gid_map"), maps):
                with open("/proc/%d/%s" % (unsharer, name), "w") as f:
                    f.write(text)
        except OSError as e:
            report(missing="userns", message="cannot write the user namespace id maps (%s)" % e)
            os.kill(unsharer, signal.SIGKILL)
            os.waitpid(unsharer, 0)
            os._exit(SETUP_EXIT)
    try:
        os.write(go_w, b"1")
    except BrokenPipeError:
        pass  # the unsharer has already gone (it reported why)
    os.close(go_w)
    _, status = os.waitpid(unsharer, 0)
    relay(status)

main()
'''


def _default_read_paths(python: str) -> list[str]:
    """What a Python program needs to read: its interpreter's prefixes and the system libraries, a
    few name-service files from /etc (not all of /etc: the program may hold CAP_DAC_READ_SEARCH)."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    exe = Path(python)
    prefixes.add(str(exe.parent.parent))
    prefixes.add(str(exe.resolve().parent.parent))
    if exe.parent.parent.joinpath("pyvenv.cfg").is_file():  # a venv: its base interpreter too
        for line in exe.parent.parent.joinpath("pyvenv.cfg").read_text().splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "home":
                prefixes.add(str(Path(value.strip()).parent))
    system = ["/usr", "/lib", "/lib64", "/lib32", "/bin"]
    etc = ["/etc/ld.so.cache", "/etc/localtime", "/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/hosts"]
    return sorted(p for p in prefixes if p not in ("", "/")) + system + etc


_DEV_FILES = ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - _OUTPUT_TAIL))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(source: str, config: SandboxConfig | None = None) -> RunResult:
    """Run one Python program confined; never raises for what the program does (only for a
    sandbox that cannot be set up: SandboxUnavailable)."""
    config = config or SandboxConfig()
    host_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="qtulu-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir(mode=0o700)
        out_path = Path(tmp) / "output"
        report_r, report_w = os.pipe()
        os.set_blocking(report_r, False)
        settings = {
            "report_fd": report_w,
            "allow_missing": sorted(config.allow_missing),
            "simulate_missing": sorted(config.simulate_missing),
            "setup_exit": _SETUP_EXIT,
            "host_root": host_root,
            "work": str(work),
            "source": source,
            "python": config.python,
            "site_packages": config.site_packages,
            "read_paths": _default_read_paths(config.python) + list(config.read_paths),
            "dev_files": _DEV_FILES,
            "disk_mb": config.disk_mb,
            "limits": {
                "memory": config.memory_mb << 20,
                "fsize": config.max_file_mb << 20,
                "nofile": config.max_open_files,
                "cpu": config.cpu_s or max(1, math.ceil(config.timeout_s)),
                "nproc": config.max_processes,
            },
        }
        start = time.monotonic()
        try:
            with open(out_path, "wb") as out:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _LAUNCHER],
                    stdin=subprocess.PIPE,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(report_w,),
                    env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
                    cwd=tmp,
                    start_new_session=True,
                )
            os.close(report_w)
            report_w = -1
            try:
                proc.stdin.write(json.dumps(settings).encode())
                proc.stdin.close()
            except BrokenPipeError:
                pass
            # + 1 s for the launcher's own start-up, which the program's limits do not include.
            messages, timed_out = _supervise(proc, report_r, start + config.timeout_s + 1.0)
            duration = time.monotonic() - start
        finally:
            if report_w >= 0:
                os.close(report_w)
            os.close(report_r)
        output = _tail(out_path)

    missing = [m for m in messages if "missing" in m]
    if missing:
        m = missing[0]
        raise SandboxUnavailable(
            f"sandbox: {m['message']} [{m['missing']}]; refusing to run untrusted code without it "
            f"(to accept this, set {_ENV_ALLOW_UNSAFE}={m['missing']} or pass allow_missing)"
        )
    skipped = tuple(dict.fromkeys(m["skipped"] for m in messages if "skipped" in m))
    statuses = [m["status"] for m in messages if "status" in m]
    if timed_out:
        return RunResult("timeout", None, duration, output, skipped)
    if not statuses:  # killed before it reported (e.g. its init died): count as killed
        code = proc.returncode
        return RunResult("killed", code, duration, output, skipped)
    status = statuses[-1]
    if os.WIFSIGNALED(status):
        return RunResult("killed", -os.WTERMSIG(status), duration, output, skipped)
    code = os.waitstatus_to_exitcode(status)
    return RunResult("passed" if code == 0 else "failed", code, duration, output, skipped)


def _supervise(proc: subprocess.Popen, report_fd: int, deadline: float) -> tuple[list[dict], bool]:
    """Wait for the launcher until `deadline`, collecting its reports; on time-out kill its process
    group. Either way, return only once the program's PID namespace is gone: its init (whose host
    pid the unsharer reports) has exited, and the kernel kills and reaps every process in the
    namespace before its init exits."""
    messages: list[dict] = []
    buf = b""
    init_fd = None

    def take(data: bytes) -> None:
        nonlocal buf, init_fd
        buf += data
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                msg = json.loads(line)
            except json.JSONDecodeError:
                continue
            messages.append(msg)
            if "init" in msg and init_fd is None:
                with contextlib.suppress(OSError):  # already gone: nothing to wait for
                    init_fd = os.pidfd_open(msg["init"])

    try:
        launcher_fd = os.pidfd_open(proc.pid)
    except OSError:  # no pidfds (old kernel, or a seccomp profile that refuses them): poll
        launcher_fd = None
    poller = select.poll()
    poller.register(report_fd, select.POLLIN)
    if launcher_fd is not None:
        poller.register(launcher_fd, select.POLLIN)
    timed_out = False
    report_open = True
    try:
        while launcher_fd is not None or proc.poll() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            wait_ms = math.ceil(remaining * 1000)
            events = dict(poller.poll(wait_ms if launcher_fd is not None else min(50, wait_ms)))
            if report_open and report_fd in events:
                data, eof = _read_available(report_fd)
                take(data)
                if eof:  # every writer has closed it
                    poller.unregister(report_fd)
                    report_open = False
            if launcher_fd is not None and launcher_fd in events:
                break
        if timed_out:
            with contextlib.suppress(ProcessLookupError):  # launcher, unsharer, init (launcher unreaped: pgid ours)
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if init_fd is not None:
            _wait_fd(init_fd, 10.0)
        take(_read_available(report_fd)[0] + b"\n")
    finally:
        if launcher_fd is not None:
            os.close(launcher_fd)
        if init_fd is not None:
            os.close(init_fd)
    return messages, timed_out


def _wait_fd(fd: int, timeout_s: float) -> None:
    p = select.poll()
    p.register(fd, select.POLLIN)
    p.poll(int(timeout_s * 1000))


def _read_available(fd: int) -> tuple[bytes, bool]:
    """What can be read now without blocking, and whether the writers have all closed."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks), False
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


_probe_lock = threading.Lock()
_probed: dict[SandboxConfig, tuple[str, ...]] = {}


def check_sandbox(config: SandboxConfig | None = None) -> tuple[str, ...]:
    """Set the sandbox up once with a trivial program: raises SandboxUnavailable (one line) if a
    required mechanism is missing; returns the mechanisms it runs without (allowed ones)."""
    config = config or SandboxConfig()
    with _probe_lock:
        if config not in _probed:
            result = run_program("print('ok')\n", config)
            if not result.passed:
                raise SandboxUnavailable(
                    f"sandbox: a trivial program did not run ({result.outcome}, exit {result.returncode}): "
                    f"{result.output.strip().splitlines()[-1] if result.output.strip() else 'no output'}"
                )
            _probed[config] = result.missing
        return _probed[config]


def describe(config: SandboxConfig | None = None) -> dict:
    """What a report should record about the sandbox used (after check_sandbox)."""
    config = config or SandboxConfig()
    missing = check_sandbox(config)
    return {
        "mechanisms": [m for m in MECHANISMS if m not in missing],
        "missing": list(missing),
        "timeout_s": config.timeout_s,
        "memory_mb": config.memory_mb,
        "max_processes": config.max_processes,
    }


def run_programs(
    sources: Sequence[str],
    config: SandboxConfig | None = None,
    jobs: int | None = None,
    on_result: Callable[[int, RunResult], None] | None = None,
) -> list[RunResult]:
    """Run many programs, up to `jobs` (default: the number of cores) at a time; results in order.
    A hostile or broken program only fails its own result."""
    config = config or SandboxConfig()
    check_sandbox(config)
    jobs = max(1, jobs or len(os.sched_getaffinity(0)))
    results: list[RunResult | None] = [None] * len(sources)

    def one(i: int) -> None:
        results[i] = run_program(sources[i], config)
        if on_result is not None:
            on_result(i, results[i])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for fut in [pool.submit(one, i) for i in range(len(sources))]:
            fut.result()  # re-raises SandboxUnavailable
    return results  # type: ignore[return-value]


__all__: Iterable[str] = [
    "MECHANISMS",
    "RunResult",
    "SandboxConfig",
    "SandboxUnavailable",
    "check_sandbox",
    "config_from_env",
    "describe",
    "run_program",
    "run_programs",
]

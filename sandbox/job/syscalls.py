"""The job's system-call filter: seccomp-bpf, built with libseccomp (through pyseccomp's ctypes binding).

A deny-list, like Docker's default profile and systemd's `SystemCallFilter=~...`: every call in
`DENIED` fails with EPERM, so Python code gets an OSError rather than a dead process; the rest is
allowed. Three calls are filtered by their arguments: `clone` with any CLONE_NEW* flag (EPERM);
`clone3`, whose flags sit in a struct a filter cannot read, fails with ENOSYS, so glibc falls back
to `clone` (threads, fork and posix_spawn keep working); `personality` may only combine PER_LINUX32
and UNAME26 (Docker's values; the 0xffffffff query is refused too). A call through another ABI (i386
via `int 0x80`, x32 on x86_64) fails with EPERM whatever its number: only the native one is in the
filter, so its numbering is the only one read.

Contract: `install()` runs in the job's own process after its uid switch and capability drop and
before any of the job's code, in every launch path; libseccomp sets `no_new_privs` before loading
(the kernel requires it without CAP_SYS_ADMIN), and the filter binds every thread and every process
the job starts, for good. `prepare()` builds the filter ahead, in the fork-server or the exec
launcher's interpreter before the child confines itself, so a job only loads it; it must run before
the job's environment applies: pyseccomp finds libseccomp by running `ldconfig -p`, which would
otherwise run the job's LD_PRELOAD unfiltered. `install()` refuses to run without it.
`unavailable()` says why the filter cannot be installed here.
"""

from __future__ import annotations

import errno
import functools
import platform

ARCHES = ("x86_64", "aarch64")  # clone's flags are its first argument on both (not on s390x)

DENIED: dict[str, tuple[str, ...]] = {
    # A user namespace hands the job every capability inside it: network namespaces and mounts
    # without limit, kernel memory outside its cgroup, code paths an unprivileged process never reaches.
    "creating or entering namespaces": ("unshare", "setns"),
    # A user keyring lives as long as its uid: keys would reach the tenant's next job.
    "keyrings": ("add_key", "keyctl", "request_key"),
    # Large kernel surfaces no Taichi job needs; io_uring's operations bypass this filter.
    "bpf, perf events, userfaultfd, io_uring": ("bpf", "perf_event_open", "userfaultfd", "io_uring_setup",
                                                "io_uring_enter", "io_uring_register"),
    "mounts": ("mount", "umount", "umount2", "pivot_root", "move_mount", "open_tree", "fsopen", "fsmount",
               "fsconfig", "fspick", "mount_setattr"),
    "modules, kexec, reboot, swap": ("init_module", "finit_module", "delete_module", "kexec_load",
                                     "kexec_file_load", "reboot", "swapon", "swapoff"),
    # Without namespaces a job shares its uid with other jobs (and, under a supervisor that is not
    # root, with the fork-server): ptrace would let it take them over.
    "ptrace and other processes' memory": ("ptrace", "process_vm_readv", "process_vm_writev", "pidfd_getfd"),
}
CLONE_NEW = {"NS": 0x00020000, "CGROUP": 0x02000000, "UTS": 0x04000000, "IPC": 0x08000000, "USER": 0x10000000,
             "PID": 0x20000000, "NET": 0x40000000}
PERSONAS = 0x0008 | 0x0020000  # PER_LINUX32, UNAME26: the only personality bits a job may set


_prepared = False  # set by prepare() in this process (or the one it was forked from)


class SyscallFilterUnavailable(RuntimeError):
    """The filter cannot be built or installed here (the message says why, in one line)."""


def describe() -> str:
    """What the filter denies, for people (enforcement reports and probe)."""
    groups = ", ".join(DENIED)
    return (f"seccomp-bpf (libseccomp): EPERM for {groups}, clone with CLONE_NEW* flags (clone3: ENOSYS), "
            "personality beyond PER_LINUX32/UNAME26, and every non-native ABI (i386 int 0x80, x32)")


@functools.cache
def _library():
    """pyseccomp, imported on first use (it runs `ldconfig -p` to find libseccomp: ~15 ms)."""
    try:
        import pyseccomp
    except (ImportError, RuntimeError, OSError) as err:  # RuntimeError: no libseccomp.so found
        raise SyscallFilterUnavailable(f"pyseccomp cannot load libseccomp ({err}): install the "
                                       "libseccomp2 package (scripts/install-system-deps.sh)") from None
    return pyseccomp


@functools.cache
def _built():
    """The filter, built once per process (never loaded here)."""
    if platform.machine() not in ARCHES:
        raise SyscallFilterUnavailable(f"the system-call filter is written for {' and '.join(ARCHES)}, "
                                       f"not {platform.machine()}")
    seccomp = _library()
    eperm = seccomp.ERRNO(errno.EPERM)
    built = seccomp.SyscallFilter(seccomp.ALLOW)
    built.set_attr(seccomp.Attr.ACT_BADARCH, eperm)  # only the native ABI is in the filter
    built.set_attr(seccomp.Attr.CTL_TSYNC, 1)
    for names in DENIED.values():
        for name in names:
            number = seccomp.resolve_syscall(seccomp.Arch.NATIVE, name)
            if number == -1:  # __NR_SCMP_ERROR: unknown to this libseccomp
                raise SyscallFilterUnavailable(f"libseccomp does not know the system call {name}: it is too old")
            if number >= 0:  # negative: not a call of this arch (umount on x86_64)
                built.add_rule(eperm, number)
    for flag in CLONE_NEW.values():
        built.add_rule(eperm, "clone", seccomp.Arg(0, seccomp.MASKED_EQ, flag, flag))
    built.add_rule(seccomp.ERRNO(errno.ENOSYS), "clone3")
    for bit in range(32):  # the kernel reads an unsigned int
        if not PERSONAS & (1 << bit):
            built.add_rule(eperm, "personality", seccomp.Arg(0, seccomp.MASKED_EQ, 1 << bit, 1 << bit))
    return built


@functools.cache
def unavailable() -> str | None:
    """Why the filter cannot be installed here (no libseccomp, another arch, a kernel without
    seccomp filters), or None when it can. Checked once per process."""
    try:
        with open("/proc/sys/kernel/seccomp/actions_avail") as f:
            if "errno" not in f.read().split():
                return "this kernel's seccomp lacks the errno action"
    except OSError:
        return "this kernel has no seccomp filters (no /proc/sys/kernel/seccomp)"
    try:
        _built()
    except (SyscallFilterUnavailable, OSError) as err:
        return str(err)
    return None


def prepare() -> None:
    """Build the filter now, if it can be built, so that `install()` only loads it."""
    global _prepared
    unavailable()
    _prepared = True


def install() -> None:
    """Load the filter prepared in this process (no_new_privs first), for good. Raises
    SyscallFilterUnavailable, or OSError when the kernel refuses it."""
    why = unavailable() if _prepared else "it was not prepared before the job's environment applied"
    if why is not None:
        raise SyscallFilterUnavailable(f"the system-call filter cannot be installed: {why}")
    _built().load()

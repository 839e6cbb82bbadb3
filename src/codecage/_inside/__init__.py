"""Code that runs in the template and inside the jail: standard library only.

Nothing here imports pydantic or anything of the service; the host imports only
protocol.py (framing), seccomp.py and landlock.py (probes, profiles), mounts.DEVICES and
steps.claim (the spec's `done`).

    zygote.py      the template: imports the preload list once, forks sandboxes on request
    steps.py       the one ordered list of confinement steps and its runner, for every
                   backend: the spec's `done` names the steps its runtime already did
    pipeline.py    the namespace jail's path: set-up runs the list's "setup" phase, forks
                   init, which runs the "init" phase, then init.run
    namespaces.py  cgroup membership, namespaces, hostname, loopback (first steps after fork)
    mounts.py      the sandbox's filesystem: tmpfs root, read-only binds, /etc, /dev, tmpfs
    caps.py        rlimits, the unprivileged uid/gid, no capabilities, no_new_privs
    landlock.py    Landlock: writes only under the workspace, /tmp, /dev/shm, the devices
    seccomp.py     the seccomp deny list, built once in the template, loaded in each sandbox
    libc.py        the system calls Python lacks (unshare, mount, pivot_root, prctl, capset)
    entry.py       PID 1 of an exec-based sandbox (bwrap): the list but its `done`, then init
    oci.py         PID 1 of an OCI sandbox (gvisor, container): the host's listeners, then entry
    guest.py       PID 1 of a full-VM guest after its initramfs: greets on its virtio port
    vmrelay.py     many streams over the guest's one virtio-serial port (guest and host)
    init.py        PID 1's loop: starts the kernel, reaps orphans, restarts it on request
    kernel.py      the kernel: runs code in a persistent namespace, streams frames to the host
    protocol.py    framing of the kernel channel (length + JSON), shared with the host
    messages.py    the typed requests and events of every channel (docs/protocol.md)
    shell.py       IPython inside: execution, magics, `!cmd`, rich display as MIME bundles
    contexts.py    code contexts: independent Python shells and bash processes in one kernel
    charts.py      structured results: a matplotlib figure as chart data, a DataFrame as columns
    imports.py     the policy's module allow/deny lists on user code's imports (not a wall)
    files.py       file requests, done by the kernel (the host never opens a sandbox path)
    watch.py       directory watchers for the file requests (inotify, no thread)
    commands.py    shell commands inside the sandbox (`sbx.commands.run`)
    procman.py     the process manager: background commands and ptys, outside the kernel
"""

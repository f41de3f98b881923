"""What jails and watches processes on the host: child processes, bubblewrap jails,
cgroups, the seccomp filter, and the sandboxes' network (egress)."""

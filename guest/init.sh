#!/bin/busybox sh
# sandboxd's VM init (the initramfs's /init): load the virtio modules, mount the image
# read-only under a tmpfs overlay, and hand over to the agent as PID 1, which talks to
# the host on the virtio-serial port sandboxd.agent if the VM has one, else on vsock.
# With "sandboxd.probe" on the kernel command line it only proves that the VM boots.

/bin/busybox --install -s /bin
export PATH=/bin

# Ending a VM is a reboot: QEMU (-no-reboot) and Firecracker (reboot=k) exit on one,
# while a power-off would leave a Firecracker VM halted and its VMM running.
fail() {
    echo "sandboxd-init: $*"
    reboot -f
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for module in $(cat /modules.order); do
    insmod "/modules/$module.ko" || fail "cannot load module $module"
done
vsock_port=52  # the agent's, when the VM has vsock: sandboxd.agent_port=N overrides it
vsock_peer=""  # sandboxd.vsock_privileged: the host is a kernel that anyone can dial from
net=""  # sandboxd.net=ADDRESS/PREFIX,GATEWAY: the VM has a NIC (sandboxd.host.vm_network)
for word in $(cat /proc/cmdline); do
    case "$word" in
        sandboxd.agent_port=*) vsock_port="${word#*=}" ;;
        sandboxd.vsock_privileged) vsock_peer="--vsock-privileged-peer" ;;
        sandboxd.net=*) net="${word#*=}" ;;
    esac
done
if grep -q sandboxd.probe /proc/cmdline; then
    echo "sandboxd-probe-ok"
    reboot -f
fi

# The same address in every VM, so that each clone of the snapshot has it already: the
# host routes it out only for a job that asks, and the agent keeps it from the others.
ip link set lo up
if [ -n "$net" ]; then
    ip addr add "${net%,*}" dev eth0 && ip link set eth0 up \
        && ip route add default via "${net#*,}" || fail "cannot set up eth0 ($net)"
fi

# The program runs as an unprivileged uid beside the agent, which is root: it may not link
# to files it does not own, nor make the agent follow its links in sticky directories.
echo 1 > /proc/sys/fs/protected_hardlinks
echo 1 > /proc/sys/fs/protected_symlinks
mount -t ext4 -o ro /dev/vda /lower || fail "cannot mount the root image /dev/vda"
mount -t tmpfs -o mode=0755 tmpfs /rw || fail "cannot mount the tmpfs"
mkdir -p /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot \
    || fail "cannot mount the overlay"
mkdir -p /newroot/opt/sandboxd
cp /agent.pyz /newroot/opt/sandboxd/agent.pyz || fail "cannot place the agent"
for fs in proc sys dev; do
    mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs"
done
exec switch_root /newroot /usr/bin/python3 -I -S /opt/sandboxd/agent.pyz \
    --vm --port-name sandboxd.agent --vsock-port "$vsock_port" $vsock_peer --workdir /work

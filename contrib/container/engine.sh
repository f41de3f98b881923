# Sourced by build and run: the container engine ($CONTAINER_ENGINE, else podman, else
# docker), as the array "${engine[@]}".
# crun refuses a host whose cgroups mix v1 with an empty v2 (hybrid); runc runs there.
engine=("${CONTAINER_ENGINE:-$(command -v podman || command -v docker || true)}")
[ -n "${engine[0]}" ] || { echo "neither podman nor docker is installed" >&2; exit 1; }
if [ "$(basename "${engine[0]}")" = podman ] && [ -d /sys/fs/cgroup/unified ] &&
    command -v runc >/dev/null; then
    engine+=(--runtime runc)
fi

"""The firecracker backend: a Firecracker microVM per sandbox under its jailer, driven
through Firecracker's HTTP API."""

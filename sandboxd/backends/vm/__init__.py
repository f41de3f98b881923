"""What the VM backends share: the VM sandbox and its snapshot pool, the guest kernel,
the initramfs that starts the agent, and the channel the daemon reaches it on."""

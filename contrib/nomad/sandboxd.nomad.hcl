# sandboxd on every Nomad client: a system job, the daemon and its gateway as the host's
# own processes (raw_exec: the daemon makes jails, cgroups and, for VMs, opens /dev/kvm),
# on the host's network, behind the health check load balancers use (GET /ready).
# Install the .deb on each client first (apt install ./sandboxd_*.deb), with the same API
# key file everywhere (/etc/sandboxd/api-keys); see docs/scale-out.md. Enable raw_exec in
# the client's config (plugin "raw_exec" { config { enabled = true } }).
job "sandboxd" {
  type = "system" # one on every eligible client

  group "node" {
    network {
      mode = "host"
      port "http" {
        static = 8000
      }
    }

    # Asked to stop, the gateway drains (gateway.drain_seconds) and the daemon answers
    # what it accepted (30 s): give both that long before Nomad kills them.
    task "sandboxd" {
      driver       = "raw_exec"
      kill_timeout = "45s"
      config {
        command = "/usr/bin/sandboxd"
        args    = ["run"]
      }
      env {
        # Session ids start with it, which the balancer routes on ([a-z0-9-], 32 at most).
        SANDBOXD_NODE = "${node.unique.name}"
      }
    }

    task "gateway" {
      driver       = "raw_exec"
      user         = "sandboxd-gateway" # unprivileged; in group sandboxd for the socket
      kill_timeout = "45s"
      config {
        command = "/usr/bin/sandboxd-gateway"
        args    = ["--bind", "0.0.0.0:8000", "--api-keys", "/etc/sandboxd/api-keys"]
      }
    }

    service {
      name     = "sandboxd"
      port     = "http"
      provider = "nomad"
      check {
        type     = "http"
        path     = "/ready"
        interval = "2s"
        timeout  = "1s"
      }
    }
  }
}

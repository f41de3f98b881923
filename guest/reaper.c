/* The namespaces jail's PID 1 for a sandbox kept warm: it starts the warm runtime at
 * once and reports how it ended, so that a job that fits the runtime costs no agent
 * start (a second interpreter). The daemon does the rest of such a job itself: files,
 * rlimits, the source, stdin, output and limits (sandboxd/backends/direct_run.py).
 * A job that does not fit has this process become the agent (an exec, keeping PID 1).
 *
 *   reaper CONTROL STDIN STDOUT STDERR SOURCE N RUNTIME-ARGV[N] AGENT-ARGV...
 *
 * fds: 0/1 the agent's channel and 2 the log, as the agent has them; CONTROL a
 * SOCK_SEQPACKET socket to the daemon; STDIN, STDOUT and STDERR the runtime's pipes.
 * To the daemon, records "<c3xiiqqq" (type, pid, wait status, utime us, stime us,
 * maxrss KiB): 'R' once the runtime started (pid in the jail), 'X' when it ended, sent
 * once every other process of the jail has been sent SIGKILL (what the program left
 * running dies with it, as under the agent, and the runtime's pipes close as it does).
 * From the daemon: "L" then "<c3xi" and count "<i4xQQ" (resource, soft, hard) sets the
 * runtime's rlimits, as the agent sets a warm runtime's (the daemon may lack
 * CAP_SYS_RESOURCE over the jail's uid), and answers an 'L' record whose status is 0
 * or an errno. The first message, queued before the jail starts, is the rlimits the
 * runtime starts with: they are set before the 'R' record, whose status is theirs, so a
 * sandbox is ready without a round trip. "A" kills the runtime and everything else and
 * execs the agent. The daemon closing its end ends the jail.
 *
 * Built by the image's own cc when the backend starts; C because an interpreter here
 * is the cost this exists to save. Signals a program sends PID 1 are dropped by the
 * kernel unless PID 1 handles them, and it handles none; it is not dumpable, so the
 * program (the same uid) can neither trace it nor open its fds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

static int control; /* the socket to the daemon */

struct __attribute__((packed)) limit {
	int32_t resource;
	int32_t pad;
	uint64_t soft;
	uint64_t hard;
};
enum { MAX_LIMITS = 16 };

struct __attribute__((packed)) record {
	char type;
	char pad[3];
	int32_t pid;
	int32_t status;
	int64_t utime_us;
	int64_t stime_us;
	int64_t maxrss_kb;
};

static void close_from_3(void)
{
	if (syscall(SYS_close_range, 3, ~0U, 0) == 0)
		return;
	/* A kernel before 5.9: each fd it has, whatever its number. */
	DIR *fds = opendir("/proc/self/fd");
	if (fds == NULL)
		_exit(127); /* nothing may start with an fd of ours */
	int own = dirfd(fds);
	for (struct dirent *entry; (entry = readdir(fds)) != NULL;) {
		int fd = atoi(entry->d_name);
		if (fd >= 3 && fd != own)
			close(fd);
	}
	closedir(fds);
}

static void fail(const char *what)
{
	dprintf(2, "reaper: %s: %s\n", what, strerror(errno));
	_exit(1);
}

static void report(char type, pid_t pid, int status, const struct rusage *usage)
{
	struct record r = {.type = type, .pid = pid, .status = status};
	if (usage) {
		r.utime_us = usage->ru_utime.tv_sec * 1000000LL + usage->ru_utime.tv_usec;
		r.stime_us = usage->ru_stime.tv_sec * 1000000LL + usage->ru_stime.tv_usec;
		r.maxrss_kb = usage->ru_maxrss;
	}
	/* If the daemon is gone, reading the socket says so next (it may have closed it
	 * right after asking for the agent: that request is still to be read). */
	send(control, &r, sizeof r, MSG_NOSIGNAL);
}

static pid_t start_runtime(char **argv, const int pipes[3], const sigset_t *old_mask)
{
	pid_t pid = fork();
	if (pid < 0)
		fail("fork");
	if (pid > 0)
		return pid;
	/* As the agent starts a program: its own session, default signals, the pipes. */
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigprocmask(SIG_SETMASK, old_mask, NULL);
	setsid();
	for (int fd = 0; fd < 3; fd++)
		if (dup2(pipes[fd], fd) < 0)
			_exit(127);
	close_from_3();
	int adj = open("/proc/self/oom_score_adj", O_WRONLY | O_CLOEXEC);
	if (adj >= 0) { /* the program, not PID 1, is what the OOM killer takes first */
		if (write(adj, "1000", 4) < 0) { /* nothing to do: it stays as it was */ }
		close(adj);
	}
	execvp(argv[0], argv);
	dprintf(2, "cannot start %s: %s\n", argv[0], strerror(errno));
	_exit(127);
}

static int set_limits(pid_t pid, const char *message, size_t size)
{
	int32_t count;
	memcpy(&count, message + 4, sizeof count);
	if (count < 0 || count > MAX_LIMITS || size != 8 + count * sizeof(struct limit))
		return EINVAL;
	for (int32_t i = 0; i < count; i++) {
		struct limit l;
		memcpy(&l, message + 8 + i * sizeof l, sizeof l);
		struct rlimit value = {.rlim_cur = l.soft, .rlim_max = l.hard};
		if (prlimit(pid, l.resource, &value, NULL) != 0)
			return errno;
	}
	return 0;
}

static void become_agent(char **agent, const char *source, const sigset_t *old_mask)
{
	kill(-1, SIGKILL); /* as PID 1: every other process of the jail */
	while (wait(NULL) > 0 || errno == EINTR)
		;
	unlink(source);
	for (int sig = 1; sig < NSIG; sig++)
		signal(sig, SIG_DFL);
	sigprocmask(SIG_SETMASK, old_mask, NULL);
	close_from_3();
	execvp(agent[0], agent);
	fail("exec the agent");
}

int main(int argc, char **argv)
{
	int words = argc > 6 ? atoi(argv[6]) : 0;
	if (words < 1 || 7 + words >= argc) { /* a runtime of one word at least, and an agent */
		dprintf(2, "usage: reaper CONTROL STDIN STDOUT STDERR SOURCE N RUNTIME-ARGV[N]"
			   " AGENT-ARGV...\n");
		return 2;
	}
	char **agent = argv + 7 + words;
	char **runtime = calloc(words + 1, sizeof *runtime); /* its own, NULL-ended */
	if (runtime == NULL)
		fail("calloc");
	memcpy(runtime, argv + 7, words * sizeof *runtime);
	control = atoi(argv[1]);
	int pipes[3] = {atoi(argv[2]), atoi(argv[3]), atoi(argv[4])};
	const char *source = argv[5];

	prctl(PR_SET_DUMPABLE, 0);
	sigset_t children, old_mask;
	sigemptyset(&children);
	sigaddset(&children, SIGCHLD);
	sigprocmask(SIG_BLOCK, &children, &old_mask);
	int exits = signalfd(-1, &children, SFD_CLOEXEC | SFD_NONBLOCK);
	if (exits < 0)
		fail("signalfd");
	if (mkfifo(source, 0644) != 0)
		fail("mkfifo");
	unsetenv("PWD"); /* bubblewrap's --chdir sets it; the agent gives programs none */
	char first[8 + MAX_LIMITS * sizeof(struct limit)];
	ssize_t size = recv(control, first, sizeof first, 0);
	if (size <= 0)
		return 0; /* the daemon is gone */
	if (first[0] != 'L' || size < 8) {
		errno = EPROTO;
		fail("the first message is not the runtime's rlimits");
	}

	pid_t pid = start_runtime(runtime, pipes, &old_mask);
	for (int fd = 0; fd < 3; fd++)
		close(pipes[fd]);
	/* Set before the daemon hears of the runtime: it feeds no source until then. */
	report('R', pid, set_limits(pid, first, (size_t)size), NULL);

	struct pollfd fds[2] = {{.fd = exits, .events = POLLIN}, {.fd = control, .events = POLLIN}};
	for (;;) {
		if (poll(fds, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			fail("poll");
		}
		if (fds[0].revents) {
			struct signalfd_siginfo info;
			while (read(exits, &info, sizeof info) > 0)
				;
			int status;
			struct rusage usage;
			pid_t done;
			while ((done = wait4(-1, &status, WNOHANG, &usage)) > 0)
				if (done == pid) {
					kill(-1, SIGKILL); /* as PID 1: the jail's others */
					report('X', pid, status, &usage);
				}
		}
		if (fds[1].revents) {
			char message[8 + MAX_LIMITS * sizeof(struct limit)];
			ssize_t got = recv(control, message, sizeof message, 0);
			if (got <= 0)
				return 0;
			if (message[0] == 'A')
				become_agent(agent, source, &old_mask);
			if (message[0] == 'L' && got >= 8)
				report('L', pid, set_limits(pid, message, (size_t)got), NULL);
		}
	}
}

"""sandboxd's guest agent: runs one job inside a sandbox (or a session's requests, one
after another) and reports on it.

It runs on the image's own python3 and uses only the standard library. Every backend
starts it the same way; only the channel differs (the jail's stdin/stdout pipes, a
virtio-serial port or vsock), and it never needs a network interface.

Wire protocol: one JSON object per line, UTF-8, in both directions.

    host → agent   {"type": "sync", "nonce": N, "entropy": base64, "time": unix seconds,
                    "warm": {"argv": [...], "env": {...}, "source": "main.py"} | null}
    agent → host   {"type": "hello", "protocol": 2, "pid": N, "nonce": N}
                   (a VM restored from a snapshot meets a new host: it syncs again,
                   reseeding its random pool and setting its clock from the host's;
                   the warm runtime, if any, starts after that: see WarmRuntime)
    host → agent   {"type": "job",
                    "files":  [{"path": "main.py", "content": "...", "encoding": "utf-8"|"base64"}],
                    "compile": {"argv": [...], "file_size_bytes": n} | null,
                    "run":     {"argv": [...], "cell": "code"},  (cell: in a session only,
                               the code of a Python cell, run in the session's interpreter)
                    "env":    {"NAME": "value"},
                    "stdin":  "...",
                    "stdin_stream": false,    (true: stdin stays open for "stdin" messages)
                    "network": false,         (true: the job asked for the network; in a VM
                                               with a NIC, the others' processes run in a
                                               network namespace of their own, only lo)
                    "limits": {"wall_time": s, "cpu_time": s, "compile_time": s,
                               "memory_bytes": n, "processes": n, "output_bytes": n,
                               "file_size_bytes": n}}
    host → agent   {"type": "stdin", "data": "...", "eof": bool}  (during the run, if streamed)
    host → agent   {"type": "cancel"}  (its caller left: the agent kills the program and
                                        answers as it does when a limit stops it)
    agent → host   {"type": "stage", "stage": "compile"|"run"}     (as each stage starts)
    agent → host   {"type": "output", "stage": "compile"|"run", "stream": "stdout"|"stderr",
                    "data": "..."}                                   (any number of these)
    agent → host   {"type": "result", "status": ..., "message": ..., "exit_code": n|null,
                    "signal": n|null, "truncated": {"stdout": bool, "stderr": bool},
                    "compile": {"exit_code", "signal", "truncated", "time"}|null,
                    "timings": {"compile": s, "run": s},
                    "usage": {"cpu_time": s, "memory_bytes": n},
                    "warm": bool,  (the run was the warm runtime's)
                    "cell": {"value": repr|null, "fresh": bool, "kept": bool}}  (a cell's)

The agent exits after the result: a sandbox serves one job. Unless the first message after
hello is a session's (session.py):

    host → agent   {"type": "session"}   then, until the host closes the channel, any of:
    host → agent   a job, answered as above
    host → agent   {"type": "file.write", "path": p, "content": base64, "append": bool,
                    "max_bytes": n}                    → {"type": "done", "size": n}
    host → agent   {"type": "file.read", "path": p, "max_bytes": n}
                   → {"type": "file.data", "data": base64} ... then {"type": "done", "size": n}
    host → agent   {"type": "file.list", "path": p}
                   → {"type": "done", "entries": [{"name", "type", "size"}], "truncated": bool}
    host → agent   {"type": "file.remove", "path": p}  → {"type": "done"}
                   (any of them, refused: {"type": "error", "message": "..."})

Output is streamed as it is produced, up to ``output_bytes`` per stream (the prefix); a
program that writes more is stopped. The host keeps what was streamed: the result does
not carry it again, and the agent holds none of it (its memory counts against the
job's). With ``--isolated`` the agent knows it is alone in its pid namespace (it is PID
1 there) and removes every process the program left behind.

The agent is this package, shipped to sandboxes as one zip file (``bundle.py``) and run
as ``python3 -I -S agent.pyz``; it uses only the standard library of the image's python
and cannot import sandboxd (tests/guest/test_contract.py checks what they share).
"""

"""Exit statuses of every dvtrain command and developer tool, in one place.

A refusal (bad input, a path of the wrong kind, work that cannot succeed, storage that cannot be
written) is one line and EXIT_USER_ERROR; Ctrl-C is EXIT_INTERRUPTED and SIGTERM EXIT_TERMINATED (the
shell's 128 + signal number); a rank that lost a peer process exits EXIT_PEER_FAILED (the failing rank
says why).
"""

EXIT_OK = 0
EXIT_PEER_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_TERMINATED = 143  # 128 + SIGTERM

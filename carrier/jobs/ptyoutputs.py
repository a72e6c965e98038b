"""The ways a tmux-backed PTY job's output can reach Carrier (``pty.tmux_output``; see
``carrier.jobs.ptypipe``). Kept apart so the configuration can name them without importing jobs."""

OUTPUTS = ("pipe", "control")
DEFAULT_OUTPUT = "pipe"

"""Jobs: the one model every door uses for playbook, adhoc, exec and pty work (``Manager``)."""

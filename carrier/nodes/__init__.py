"""Execution nodes: plays run near their hosts over ansible-runner's streaming protocol.

``pool`` turns ``execution_nodes:`` into reachable nodes and picks the node a job's hosts belong
to; ``transport`` carries the transmit/worker/process stream (``SshTransport`` over Carrier's
ControlPersist masters; a Receptor transport would be a second ``NodeTransport``); ``stream`` is
the controller's half of one run (transmit, relay with a heartbeat, process), called by the detached
worker (``carrier.ansible.worker``). See docs/nodes.md.
"""

"""The Ansible engine: inventory (ansible-core's own loader), ControlPersist ssh, the exec fast
path, ansible-runner runs in a detached worker, and the playbook catalog."""

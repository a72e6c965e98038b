"""Carrier: drive the hosts in an Ansible inventory from signed email, MCP and CI."""

__version__ = "0.1.0"

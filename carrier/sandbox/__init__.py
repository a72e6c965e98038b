"""The loopback sandbox: real Dovecot, SMTP, sshd hosts, GnuPG homes and a keyserver for tests and demos."""

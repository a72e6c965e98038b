"""The mail layer: IMAP and SMTP connections, composition and parsing."""

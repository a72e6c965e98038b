"""Named secrets (``secrets:`` in carrier.yml): read one when it is used, never keep or show it.

A secret comes from a file (mode 0600 or stricter, owned by the user running Carrier), an
environment variable, or an Ansible Vault file decrypted with Ansible's own VaultLib and a vault
password file (same rules as a plain file). Errors name the secret and the file, never a value.
"""

from __future__ import annotations

from carrier.config import Config, ConfigProblems, Secret, _Invalid, _read_owned_secret_file, _read_secret
from carrier.errors import ConfigError


class SecretError(ConfigError):
    """A named secret cannot be read; the message says which one and how to fix it."""


def _vault(ref: Secret) -> str:
    assert ref.vault_file is not None and ref.vault_password_file is not None
    password = _read_owned_secret_file(ref.vault_password_file)
    try:
        data = ref.vault_file.read_bytes()
    except OSError as exc:
        raise _Invalid(f"cannot read {ref.vault_file}: {exc.strerror}") from None
    from ansible.errors import AnsibleError
    from ansible.parsing.vault import VaultLib, VaultSecret, is_encrypted

    if not is_encrypted(data):
        raise _Invalid(f"{ref.vault_file} is not an Ansible Vault file: "
                       "encrypt it with `ansible-vault encrypt`")
    try:
        plain = VaultLib([("default", VaultSecret(password.encode()))]).decrypt(data)
    except AnsibleError:
        raise _Invalid(f"cannot decrypt {ref.vault_file} with {ref.vault_password_file}: "
                       "wrong vault password (or another vault id)") from None
    try:
        value: str = bytes(plain).decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError:
        raise _Invalid(f"{ref.vault_file} does not decrypt to UTF-8 text") from None
    if not value:
        raise _Invalid(f"{ref.vault_file} decrypts to nothing: put the secret in it")
    return value


def secret_value(ref: Secret) -> str:
    """The value of one named secret (read now, from its source)."""
    try:
        if ref.vault_file is not None:
            return _vault(ref)
        if ref.file is not None:
            return _read_owned_secret_file(ref.file)
        return _read_secret(ref.env, None, ref.environ)
    except _Invalid as exc:
        raise SecretError(f"secret {ref.name!r}: {exc}") from None


def lookup(config: Config, name: str) -> str:
    """The value of the secret called ``name``; a clear error when it is not defined."""
    ref = config.secret_refs.get(name)
    if ref is None:
        known = ", ".join(config.secret_refs) or "none"
        raise ConfigProblems([f"no secret named {name!r} under secrets: (secrets: {known})"])
    return secret_value(ref)

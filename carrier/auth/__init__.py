"""The trust layer: nothing runs unless this says yes.

- ``pgp``: verify PGP/MIME and clear-signed mail bound to an expected fingerprint; sign/encrypt replies.
- ``keyring``: Carrier's GnuPG home (python-gnupg), key inspection and careful import.
- ``keyserver``: find a sender's key (attachment, WKD, VKS) and accept it only for its own address.
- ``mailauth``: command mail = enrolled key of the From address + fresh + never seen.
- ``enrollment``: the persisted request -> challenge -> confirm -> admin decision state machine.
- ``tokens``, ``policy``, ``ratelimit``, ``netgate``, ``audit``: MCP tokens, the one decision
  function, persisted token buckets, IP gates that narrow, the hash-chained audit trail.
- ``service.Trust`` wires all of it from a ``Config`` and a ``Store``; ``cli`` has the commands.
"""

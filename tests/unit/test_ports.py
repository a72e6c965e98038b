"""carrier.ports: a taken port is named with the process that holds it."""

from __future__ import annotations

import os
import socket

from carrier.ports import port_holders, port_in_use, port_taken


def test_a_held_port_names_its_process_and_what_to_do() -> None:
    with socket.create_server(("127.0.0.1", 0)) as held:
        port = held.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
        assert (os.getpid(), port_holders(port)[0][1]) in port_holders(port)
        message = port_taken("the door", "127.0.0.1", port, "Pick another port.")
        assert message is not None
        assert message.startswith(f"the door cannot listen on 127.0.0.1:{port}: the port is in use by "
                                  f"pid {os.getpid()} (")
        assert message.endswith(". Pick another port.")
    assert not port_in_use("127.0.0.1", port)
    assert port_taken("the door", "127.0.0.1", port, "x") is None
    assert port_holders(port) == []

"""Real-time gateway: sockets, wire protocol, fan-out, presence, chat."""

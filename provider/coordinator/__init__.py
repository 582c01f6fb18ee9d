"""The connection to the coordinator, from handshake to close.

- :mod:`.messages`: wire types and decoding at the edge (pure);
- :mod:`.session`: one connection: register, receive, handle, drain;
- :mod:`.sender`: the one serialised writer, every send bounded;
- :mod:`.heartbeat`: the wall-clock heartbeat and the half-open watchdog;
- :mod:`.reconnect`: backoff policy and close codes (pure);
- :mod:`.sockopts`: the capped send buffer and ``TCP_USER_TIMEOUT``;
- :mod:`.jobs`: one request from ``inference_request`` to its one end frame,
  the token relay and the cancel path;
- :mod:`.state`: the provider's state machine (pure);
- :mod:`.window`: the heartbeat's ``*_since_last`` metrics window (pure).
"""

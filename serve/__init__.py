"""Websocket streaming server, protocol and browser client -- installed as ``streamkd.serve``.
Empty until the real-time streaming issue lands."""

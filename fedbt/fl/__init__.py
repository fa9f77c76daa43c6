"""The federated core, free of Flower: the round, the strategies, the reply checks, the site's work.

The server side (`server.py`) plays rounds over a small `Transport` (`transport.py`); the site
side (`site.py`) answers a `Request` with a `Reply` (`protocol.py`). The Flower apps in
fedbt.federated only map Flower's Messages onto these and back, and tests play whole
federations in memory (`transport.InMemoryTransport`) without starting a process.
"""

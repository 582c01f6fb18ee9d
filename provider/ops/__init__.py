"""What the Mac's owner runs and reads.

- :mod:`.status_server`: the local ``/healthz``, ``/status`` and ``/metrics``;
- :mod:`.doctor`: ``mlx-provider doctor``, each check with its fix;
- :mod:`.service_cli`: ``install``, ``start``, ``stop``, ``status``, ``logs``...;
- :mod:`.demo`: ``mlx-provider demo``, stub + provider + a local model.
"""

"""The machine the provider runs on.

- :mod:`.service`: the launchd (and systemd) service;
- :mod:`.power`: the no-idle-sleep assertion and wake-from-sleep detection;
- :mod:`.hardware`: memory, cores and chip facts, process RSS.
"""

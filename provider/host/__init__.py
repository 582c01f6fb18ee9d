"""The machine the provider runs on.

- :mod:`.service`: the launchd (and systemd) service;
- :mod:`.power`: the no-idle-sleep assertion and wake-from-sleep detection;
- :mod:`.hardware`: memory, chip, cores and GPU facts (with the chip table), process RSS;
- :mod:`.sensors`: memory pressure, thermal state, power source, CPU and GPU use;
- :mod:`.monitor`: sampling the machine in the background, off the event loop;
- :mod:`.guard`: the owner's machine first, as a pure policy with hysteresis;
- :mod:`.restarts`: the restart count kept next to the config.
"""

"""pydbd: the userspace control layer of the dattobd-compatible snapshot driver.

One module per concern: ``abi`` (ioctl numbers and structs), ``errors`` (typed failures),
``control`` (the /dev/datto-ctl device), ``procinfo`` (/proc/datto-info), ``cow`` (the COW
file format), and the console scripts ``dbdctl`` and ``updateimg``.
"""

__version__ = "0.12.1"

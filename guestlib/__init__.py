"""Guest-side half of the backup oracles: block hashing, signed workloads, file churn and the oracles.

Standard library only (plus the equally pure ``pydbd`` package of this checkout): it runs inside
QEMU guests on Python 3.11 and 3.13 with ``PYTHONPATH=/src``.
"""

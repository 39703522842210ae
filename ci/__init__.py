"""CI entry points: the test runner behind ./run-tests and the kernel-matrix driver."""

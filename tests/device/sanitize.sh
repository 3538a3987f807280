#!/bin/sh
# Memcheck over the fuzzed batch of tests/device/sanitize.py; run from the repository root on a GPU machine.
exec compute-sanitizer --tool memcheck --error-exitcode 1 python tests/device/sanitize.py "$@"

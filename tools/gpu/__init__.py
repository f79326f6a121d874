"""The GPU kit: what a session with a GPU machine needs to measure sdrt there in minutes.

prepare.py (here, with network) downloads the wheels the GPU machine lacks and splits the big one
into parts that fit the `run` tool's carry limit; device.sh / device.py (there, no network) put
them back together, install them, run the GPU tests and the benchmark. parts.py is the shared,
standard-library-only part. The sequence of calls is in bench/GPU_RUNBOOK.md.
"""

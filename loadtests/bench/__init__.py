"""`make bench`: wrk against the running stack beside the ceilings of this machine.

`python -m loadtests.bench`; see `loadtests/bench/__main__.py` and docs/loadtesting.md.
"""

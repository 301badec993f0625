"""The pytest-benchmark suite (a package only so its module names never clash with tests/)."""

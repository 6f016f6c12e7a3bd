"""hubnode benchmark suite: `python -m bench` (short) or `python -m bench --full`."""

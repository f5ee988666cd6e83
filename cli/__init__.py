"""The ``lpeer`` command line (installed as ``lifelong_peer.cli``): thin wrappers over the library."""

"""Kernel sources shared between backends (see ``elements``)."""

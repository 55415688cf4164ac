"""The `pickcell` command: the composition root that wires arm, grasping, hitl and sim together."""

__version__ = "0.1.0"

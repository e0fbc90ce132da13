"""The ``shouhu`` command: the launcher that wires the packages below it into processes.

Nothing imports ``launch``: it is the top floor (see docs/architecture.md).
"""

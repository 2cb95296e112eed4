"""The command-line tools beside ``apm fit``, one module each, each with a ``main(argv) -> int``
registered in ``apm.cli.TOOLS``. Argument parsing lives here and nowhere else: the work is done
by the library modules (``apm.analysis``, ``apm.perceive``, ``apm.classify``, ...)."""

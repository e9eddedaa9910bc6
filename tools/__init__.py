"""pyraft's command-line tools (installed as ``pyraft.tools``; the source lives in ``tools/``)."""

"""A ``--plugin`` module that raises on import, with a message of two lines."""

raise RuntimeError("myplug's settings are missing\nset MYPLUG_HOME first")

"""Built-in task specs. Each module defines ``TASK``, ``load_data`` and ``build_model``."""

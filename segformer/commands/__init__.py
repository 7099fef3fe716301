"""Sub-commands of the ``segformer`` program, one module each (see segformer/cli.py)."""

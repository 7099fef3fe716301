import sys

try:
    from .cli import main
except KeyboardInterrupt:  # (Ctrl-C while the package loads: the exit code of an interrupt, no traceback)
    sys.exit(130)

sys.exit(main())

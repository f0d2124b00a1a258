"""``python -m lucidlm`` (e.g. under ``torchrun``): the ``lucidlm`` command of apps/cli.py."""

from lucidlm.apps.cli import main

if __name__ == "__main__":
    main()

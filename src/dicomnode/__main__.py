"""``python -m dicomnode``."""

from dicomnode.cli import main

if __name__ == "__main__":
    main()

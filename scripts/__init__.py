"""Entry points (python -m scripts.NAME or python scripts/NAME.py); scripts.common is what they share."""

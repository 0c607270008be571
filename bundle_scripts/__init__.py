"""Sources that export.py writes into an exported MONAI Bundle's scripts/ folder."""

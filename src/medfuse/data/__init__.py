"""Data stage: download (manifest + base URL), prepare (pairing, colour, validation), datasets."""

"""medfuse: reproducible multimodal medical image fusion (W-DUALMINE and its peers)."""

__version__ = "0.1.0"

"""Tiny model sizes shared by the tests: the same code paths as the paper sizes, at 32 x 32."""

TINY_PEER_BACKBONE = {
    "stem_channels": 8,
    "widths": [8, 8, 8, 8],
    "patch_size": 4,
    "embed_dim": 16,
    "num_heads": 2,
    "head_channels": 4,
}

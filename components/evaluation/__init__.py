"""DreamBench evaluation: scoring generated images (DINO, CLIP-I, CLIP-T) and reporting them."""

"""What the tests share and are not tests themselves: helpers they import, and scripts they run
under `accelerate launch` (dist_*_check.py)."""

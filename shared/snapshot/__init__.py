"""The deployable snapshot, torch-free for devices: its format and signatures (format), its inference path (inference)."""

"""Camera-world data: generation, reading and validation, augmentation."""

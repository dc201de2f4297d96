"""fedcam server package."""

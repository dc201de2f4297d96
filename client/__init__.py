"""fedcam client package."""

"""fedcam client/runtime package."""

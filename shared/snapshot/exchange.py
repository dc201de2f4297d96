"""Names both sides of the per-camera snapshot exchange use when its steps ride on train messages."""

from __future__ import annotations

# The train message's ConfigRecord asking for one step (personal, calibrate, score) of the newest global snapshot
# ("base"), and the reply's answer; the personal tensors travel packed in the reply's second ArrayRecord.
RIDE = "fedcam-exchange"
RIDE_ARRAYS = "fedcam-exchange-arrays"
STEPS = ("personal", "calibrate", "score")

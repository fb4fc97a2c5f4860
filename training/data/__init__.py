"""VinDr-SpineXR data: the real layout reader, the synthetic generator, splits and the training cache."""

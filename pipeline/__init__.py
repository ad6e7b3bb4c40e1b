"""DFR anomaly-segmentation batch pipeline."""

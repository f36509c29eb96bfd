"""Data preparation: media files and AudioSet lists to sharded TFRecords."""

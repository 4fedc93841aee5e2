"""The front ends, one per dialect, side by side: none imports another."""

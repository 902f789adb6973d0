"""Tools: Hugging Face export, extrapolation evaluation, run comparison, the end-to-end main job."""
